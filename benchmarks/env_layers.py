"""What a change to one distribution costs: the environment's image chain rebuilt.

Run from a project directory with the local daemon reachable:
    python benchmarks/env_layers.py
Prints the cached chain's time, then the time and the images built after one file
changes in a small distribution and in a large one (nothing is installed or changed
on disk; the change exists only in the build context).
"""

from __future__ import annotations

import time
from pathlib import Path

from pytest_sandbox import environment, snapshot
from sandboxd.client import SandboxClient
from sandboxd.connection import connect


def chain(client: SandboxClient, snap: snapshot.Snapshot) -> tuple[float, int]:
    """(seconds, images built) for the whole environment chain."""
    base, built, started = "", 0, time.monotonic()
    for fragment, files in snap.environment(""):
        result = client.build_image(
            fragment, base=base, context_files=files, label="pytest-sandbox-env"
        )
        base, built = result.image.tag, built + (not result.cache_hit)
    return time.monotonic() - started, built


def changed(dists: dict[str, environment.ContextFiles], name: str) -> snapshot.Snapshot:
    files = dict(dists[name])
    rel = next(r for r in sorted(files) if r.endswith(".py"))
    files[rel] = (files[rel][0] + f"\n# changed {time.time()}\n".encode(), files[rel][1])
    return snapshot.Snapshot({}, False, tuple(environment.layers({**dists, name: files})))


def main() -> None:
    dists = environment.distributions(Path.cwd())
    client = connect(None).client
    snap = snapshot.Snapshot({}, False, tuple(environment.layers(dists)))
    seconds, built = chain(client, snap)
    print(f"{len(dists)} distributions, {len(snap.layers)} layers")
    print(f"unchanged: {seconds:.2f}s, {built} images built")
    sizes = {n: sum(len(d) for d, _ in f.values()) for n, f in dists.items() if f}
    small = min((n for n in sizes if any(r.endswith(".py") for r in dists[n])), key=sizes.get)
    large = max(sizes, key=lambda n: sizes[n] if any(r.endswith(".py") for r in dists[n]) else 0)
    for name in (small, large):
        seconds, built = chain(client, changed(dists, name))
        print(
            f"one file changed in {name}: {seconds:.2f}s, {built} of {len(snap.layers) + 1} built"
        )


if __name__ == "__main__":
    main()
