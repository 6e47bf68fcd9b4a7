"""What a fragment's instructions do to an image's run configuration, and COPY's archive.

The builder (`sandboxd.builder`) runs RUN steps in sandboxes and commits them; everything
else an instruction changes is this state, committed with the next layer. Docker's own
meaning is kept where a fragment can tell: variables expand in ENV, ARG, LABEL, WORKDIR,
USER, EXPOSE, STOPSIGNAL and COPY paths; ENTRYPOINT drops a CMD the fragment did not set;
COPY creates files owned by root unless `--chown` says otherwise.
"""

from __future__ import annotations

import fnmatch
import io
import posixpath
import re
import tarfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sandboxd.errors import BuildFailed
from sandboxd.fragments import Instruction, expand

DEFAULT_SHELL = ("/bin/sh", "-c")
_NUMERIC_OWNER = re.compile(r"^(\d+)(?::(\d+))?$")
_HEREDOC_ONLY = re.compile(r"^\s*<<-?[\"']?(\w+)[\"']?\s*$")


def fail(instruction: Instruction, why: str) -> BuildFailed:
    """A build failure that names the fragment's line."""
    return BuildFailed(f"fragment line {instruction.line}: {why}: {instruction.text[:200]}")


@dataclass
class BuildState:
    """The run configuration as the fragment has left it so far (mutable, one build)."""

    env: dict[str, str] = field(default_factory=dict)
    args: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str = ""
    shell: tuple[str, ...] = DEFAULT_SHELL
    cmd: list[str] | None = None
    cmd_set: bool = False
    entrypoint: list[str] | None = None
    labels: dict[str, str] = field(default_factory=dict)
    exposed: dict[str, dict[str, Any]] = field(default_factory=dict)
    stop_signal: str = ""

    @classmethod
    def of_image(cls, config: Mapping[str, Any]) -> BuildState:
        """The state an image's configuration starts a build with."""
        env = dict(e.partition("=")[::2] for e in config.get("Env") or [])
        return cls(
            env=env,
            workdir=config.get("WorkingDir") or "/",
            user=config.get("User") or "",
            shell=tuple(config.get("Shell") or DEFAULT_SHELL),
            cmd=config.get("Cmd"),
            entrypoint=config.get("Entrypoint"),
            labels=dict(config.get("Labels") or {}),
            exposed=dict(config.get("ExposedPorts") or {}),
            stop_signal=config.get("StopSignal") or "",
        )

    def variables(self) -> dict[str, str]:
        """What `$NAME` means in this instruction: ENV over ARG, as in Docker."""
        return {**self.args, **self.env}

    def commit_config(self, labels: Mapping[str, str]) -> dict[str, Any]:
        """The engine's image configuration for a commit: every field given, so nothing of
        the build container's own (its keep-alive entrypoint) leaks into the image."""
        return {
            "Env": [f"{k}={v}" for k, v in self.env.items()],
            "Cmd": self.cmd,
            "Entrypoint": self.entrypoint or [],
            "WorkingDir": self.workdir,
            "User": self.user,
            "Labels": {**self.labels, **labels},
            "ExposedPorts": self.exposed,
            "StopSignal": self.stop_signal or None,
            "Shell": list(self.shell) if self.shell != DEFAULT_SHELL else None,
        }

    def apply(self, ins: Instruction) -> None:
        """Apply a metadata instruction (not RUN, COPY or ADD).

        Raises:
            BuildFailed: a malformed instruction (the message names its line).
        """
        words = [expand(a, self.variables()) for a in ins.args] if not ins.json else []
        if ins.keyword in ("ENV", "LABEL"):
            if len(ins.args) % 2:
                raise fail(ins, f"{ins.keyword} needs NAME=value pairs")
            target = self.env if ins.keyword == "ENV" else self.labels
            for name, value in zip(words[::2], words[1::2], strict=True):
                target[name] = value
        elif ins.keyword == "ARG":
            for word in words:
                name, _, default = word.partition("=")
                self.args.setdefault(name, default)
        elif ins.keyword == "WORKDIR":
            self.workdir = posixpath.normpath(posixpath.join(self.workdir, words[0]))
        elif ins.keyword == "USER":
            self.user = words[0]
        elif ins.keyword == "EXPOSE":
            for port in words:
                self.exposed[port if "/" in port else f"{port}/tcp"] = {}
        elif ins.keyword == "STOPSIGNAL":
            self.stop_signal = words[0]
        else:
            self._apply_command(ins)

    def _apply_command(self, ins: Instruction) -> None:
        if ins.keyword == "SHELL":
            if not ins.json:
                raise fail(ins, 'SHELL takes a JSON array, e.g. SHELL ["/bin/bash", "-c"]')
            self.shell = ins.args
            return
        argv = list(ins.args) if ins.json else [*self.shell, ins.args[0]]
        if ins.keyword == "CMD":
            self.cmd, self.cmd_set = argv, True
        else:
            self.entrypoint = argv
            if not self.cmd_set:
                self.cmd = None

    def run_argv(self, ins: Instruction) -> list[str]:
        """The command a RUN instruction runs."""
        if ins.json:
            return list(ins.args)
        if not ins.args:
            raise fail(ins, "RUN needs a command")
        script = ins.args[0]
        if ins.heredocs:
            only = _HEREDOC_ONLY.match(script)
            if only and len(ins.heredocs) == 1:
                return [*self.shell, ins.heredocs[0][1]]
            bodies = "".join(f"{content}{name}\n" for name, content in ins.heredocs)
            script = f"{script}\n{bodies}"
        return [*self.shell, script]


def copy_archive(
    ins: Instruction, state: BuildState, files: Mapping[str, tuple[bytes, int]], into_dir: bool
) -> bytes:
    """The tar to unpack at `/` for a COPY or ADD of context files.

    `into_dir`: the destination is a directory (ends in `/`, exists as one, or several
    sources), so files keep their names under it.

    Raises:
        BuildFailed: a source matching no context file, an archive given to ADD, or an
            owner that is not numeric.
    """
    variables = state.variables()
    words = [expand(a, variables) for a in ins.args]
    dest = posixpath.join(state.workdir, words[-1])
    uid, gid = _owner(ins, expand(ins.flag("chown") or "", variables))
    chmod = ins.flag("chmod")
    matched: list[tuple[str, str]] = []
    for source in words[:-1]:
        found, whole_dir = _matches(source, files)
        if not found:
            raise fail(ins, f"no context file matches {source!r}")
        into_dir = into_dir or whole_dir or len(words) > 2 or len(found) > 1
        matched.extend(found)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, relative in matched:
            content, mode = files[path]
            if ins.keyword == "ADD" and _is_archive(content):
                raise fail(ins, "ADD does not unpack archives here; COPY it and unpack it "
                           "in a RUN step")  # fmt: skip
            target = posixpath.join(dest, relative) if into_dir else dest
            info = tarfile.TarInfo(target.lstrip("/"))
            info.size, info.uid, info.gid = len(content), uid, gid
            info.mtime = int(time.time())
            info.mode = int(chmod, 8) if chmod else (mode or 0o644)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def _matches(
    source: str, files: Mapping[str, tuple[bytes, int]]
) -> tuple[list[tuple[str, str]], bool]:
    """(context path, path under the destination) of every file a COPY source names, and
    whether the source is a directory (its files go under the destination)."""
    source = posixpath.normpath(source.lstrip("/")) if source.strip("./") else "."
    if source == ".":
        return [(p, p) for p in sorted(files)], True
    if source in files:
        return [(source, posixpath.basename(source))], False
    prefix = source + "/"
    under = [(p, p[len(prefix) :]) for p in sorted(files) if p.startswith(prefix)]
    if under:
        return under, True
    globbed = [p for p in sorted(files) if fnmatch.fnmatchcase(p, source)]
    return [(p, posixpath.basename(p)) for p in globbed], False


def _owner(ins: Instruction, chown: str) -> tuple[int, int]:
    if not chown or chown in ("root", "root:root"):
        return 0, 0
    match = _NUMERIC_OWNER.match(chown)
    if match is None:
        raise fail(ins, "--chown takes numeric ids here (uid or uid:gid)")
    uid = int(match.group(1))
    return uid, int(match.group(2) or uid)


def _is_archive(content: bytes) -> bool:
    try:
        with tarfile.open(fileobj=io.BytesIO(content), mode="r:*") as tar:
            return tar.next() is not None
    except (tarfile.TarError, EOFError, OSError):
        return False
