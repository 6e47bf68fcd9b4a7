"""Regenerate the committed gRPC stubs from protos/; `--check` fails when they are stale."""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "sandboxd" / "_proto"
PACKAGE = "sandboxd._proto"


def generate(dest: Path) -> None:
    from grpc_tools import protoc

    # protoc finds the mypy plugins next to the interpreter running this script.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={dest}",
        f"--grpc_python_out={dest}",
        f"--mypy_out={dest}",
        f"--mypy_grpc_out={dest}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # protoc writes imports relative to the proto root; make them package-absolute.
    for path in dest.rglob("*.py*"):
        text = path.read_text()
        text = re.sub(
            r"^from sandbox\.v1 import", f"from {PACKAGE}.sandbox.v1 import", text, flags=re.M
        )
        text = re.sub(r"^import sandbox\.v1\.", f"import {PACKAGE}.sandbox.v1.", text, flags=re.M)
        path.write_text(text)
    for d in [dest, *(p for p in dest.rglob("*") if p.is_dir())]:
        (d / "__init__.py").touch()


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): p.read_text()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="fail if the committed stubs are stale"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "_proto"
        fresh.mkdir()
        generate(fresh)
        if args.check:
            old, new = snapshot(OUT) if OUT.exists() else {}, snapshot(fresh)
            if old != new:
                for name in sorted(set(old) | set(new)):
                    if old.get(name) != new.get(name):
                        sys.stdout.writelines(
                            difflib.unified_diff(
                                old.get(name, "").splitlines(True),
                                new.get(name, "").splitlines(True),
                                f"committed/{name}",
                                f"generated/{name}",
                                n=1,
                            )
                        )
                print("generated stubs are stale: run scripts/gen_protos.py", file=sys.stderr)
                return 1
            print("generated stubs are fresh")
            return 0
        if OUT.exists():
            shutil.rmtree(OUT)
        shutil.copytree(fresh, OUT)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
