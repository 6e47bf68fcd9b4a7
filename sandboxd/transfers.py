"""Moving files in and out of sandboxes: tar streams unpacked and packed by `tar` running
inside as the sandbox user (the engine's copy API does not see tmpfs mounts on a
read-only root), bounded by the sandbox's scratch size."""

from __future__ import annotations

import shlex
import tempfile
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass

from sandboxd.api import ExecOutcome, ExecRequest, Output
from sandboxd.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from sandboxd.execs import Executor
from sandboxd.models import SandboxRecord
from sandboxd.paths import check_sandbox_path, check_tar

#: Marks a collect path the shell found missing, on the collecting command's stderr.
_MISSING = "sandboxd-missing:"


@dataclass(frozen=True)
class Collected:
    """What a Run collected: one tar archive, and the asked-for paths that did not exist."""

    tar: bytes
    missing: tuple[str, ...]


def _drain_into(
    sink: bytearray, chunks: Generator[bytes, None, tuple[bool, str]]
) -> tuple[bool, str]:
    """Append every chunk to `sink`; return the generator's own return value."""
    while True:
        try:
            sink.extend(next(chunks))
        except StopIteration as stop:
            result: tuple[bool, str] = stop.value
            return result


class Transfers:
    """File transfer for the executor's sandboxes."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor

    def put_files(
        self, sandbox_id: str, path: str, chunks: Iterable[bytes], owner: str = ""
    ) -> tuple[int, int]:
        """Unpack a tar stream under `path` (inside a writable dir); return (files, bytes).

        Raises:
            InvalidArgument: a bad path or tar member; ResourceExhausted: above the scratch size.
        """
        record = self.executor.manager.get(sandbox_id, owner)
        dest = check_sandbox_path(path, workdir=record.workdir, writable=(record.workdir, "/tmp"))
        limit = record.limits.scratch_bytes
        with tempfile.SpooledTemporaryFile(max_size=8 << 20) as spool:
            received = 0
            for chunk in chunks:
                received += len(chunk)
                if received > limit + (1 << 20):
                    raise ResourceExhausted(
                        f"tar stream is larger than the sandbox's scratch space ({limit} bytes)"
                    )
                spool.write(chunk)
            spool.seek(0)
            files, size = check_tar(spool)
            if size > limit:
                raise ResourceExhausted(
                    f"the files add up to {size} bytes, above the sandbox's scratch space "
                    f"({limit} bytes)"
                )
            spool.seek(0)
            quoted = shlex.quote(dest)
            script = f"mkdir -p {quoted} && exec tar -x --no-same-owner -m -C {quoted}"
            data = spool.read()
        outcome, _, err = self._run_with_stdin(record, ["sh", "-c", script], data)
        if outcome.judgement.verdict != "ok":
            detail = err.decode("utf-8", "replace").strip()[-500:]
            if "No space left" in detail or "Cannot write" in detail:
                raise ResourceExhausted(f"not enough scratch space in the sandbox: {detail}")
            raise FailedPrecondition(
                f"unpacking into {dest} failed: {detail or outcome.judgement.message}"
            )
        return files, size

    def _run_with_stdin(
        self, record: SandboxRecord, argv: list[str], data: bytes
    ) -> tuple[ExecOutcome, bytes, bytes]:
        out, err = bytearray(), bytearray()
        outcome: ExecOutcome | None = None
        timeout = max(record.limits.timeout_seconds, 300.0)
        # Transfers skip the per-exec checks: they are bounded by the scratch size instead.
        req = ExecRequest(argv=argv, stdin=data, timeout_seconds=timeout)
        for event in self.executor.run_record(record, req, timeout, 1 << 20):
            if isinstance(event, Output):
                (out if event.stream == 1 else err).extend(event.data[-4096:])
            else:
                outcome = event
        assert outcome is not None
        return outcome, bytes(out), bytes(err)

    def get_files(
        self, sandbox_id: str, path: str, max_bytes: int, owner: str = ""
    ) -> Iterator[bytes]:
        """Yield a tar stream of `path`.

        Raises:
            InvalidArgument: bad path; NotFound: no such path; ResourceExhausted: above max_bytes.
        """
        record = self.executor.manager.get(sandbox_id, owner)
        full = check_sandbox_path(path, workdir=record.workdir, writable=(record.workdir, "/tmp"))
        if max_bytes < 0:
            raise InvalidArgument("max_bytes: must not be negative")
        cap = record.limits.scratch_bytes * 2
        limit = min(max_bytes, cap) if max_bytes else cap
        parent, _, name = full.rstrip("/").rpartition("/")
        argv = ["tar", "-c", "-C", parent or "/", name or "."]
        ok, err = yield from self._tar(record, argv, limit, full)
        if ok:
            return
        if "No such file" in err:
            raise NotFound(f"{full} does not exist in the sandbox")
        raise FailedPrecondition(f"reading {full} failed: {err}")

    def collect_paths(self, sandbox_id: str, paths: Iterable[str], owner: str = "") -> list[str]:
        """The absolute paths `collect` would take, checked before a Run starts its command.

        Raises:
            InvalidArgument: a path with "..", or outside the writable dirs.
        """
        record = self.executor.manager.get(sandbox_id, owner)
        writable = (record.workdir, "/tmp")
        return [
            check_sandbox_path(p, workdir=record.workdir, writable=writable, field="collect")
            for p in paths
        ]

    def collect(self, sandbox_id: str, paths: Iterable[str], owner: str = "") -> Collected:
        """One tar of every path that exists (each under its own name, as GetFiles gives
        it), and the paths that do not: a missing output is a fact about the run, not a
        reason to lose its result.

        Raises:
            InvalidArgument: a bad path; ResourceExhausted: above twice the scratch size.
        """
        record = self.executor.manager.get(sandbox_id, owner)
        full = self.collect_paths(sandbox_id, paths, owner)
        if not full:  # nothing asked for: no exec, and no 10 KiB of tar padding
            return Collected(b"", ())
        # One tar with a -C per path; the shell reports the missing ones on stderr.
        lines = ["set --"]
        for path in full:
            parent, _, name = path.rstrip("/").rpartition("/")
            q = shlex.quote(path)
            lines.append(
                f'if [ -e {q} ] || [ -h {q} ]; then set -- "$@" -C {shlex.quote(parent or "/")} '
                f"{shlex.quote(name or '.')}; else printf '{_MISSING}%s\\n' {q} >&2; fi"
            )
        lines.append('exec tar -c -f - "$@" -T /dev/null')
        argv = ["sh", "-c", "\n".join(lines)]
        data = bytearray()
        tar = self._tar(record, argv, record.limits.scratch_bytes * 2, "the collected files")
        ok, err = _drain_into(data, tar)
        missing = [line[len(_MISSING) :] for line in err.splitlines() if line.startswith(_MISSING)]
        if not ok:
            rest = "\n".join(line for line in err.splitlines() if not line.startswith(_MISSING))
            raise FailedPrecondition(f"collecting {', '.join(full)} failed: {rest}")
        return Collected(bytes(data), tuple(missing))

    def _tar(
        self, record: SandboxRecord, argv: list[str], limit: int, what: str
    ) -> Generator[bytes, None, tuple[bool, str]]:
        """Yield the stdout of a tar command in the sandbox; return whether it succeeded,
        and its stderr (or the verdict's sentence when it failed silently).

        Raises:
            ResourceExhausted: the archive is larger than `limit`.
        """
        timeout = max(record.limits.timeout_seconds, 300.0)
        req = ExecRequest(argv=argv, timeout_seconds=timeout)
        sent = 0
        err = bytearray()
        for event in self.executor.run_record(record, req, timeout, limit + 1):
            if isinstance(event, Output):
                if event.stream == 2:
                    err.extend(event.data[-2048:])
                    continue
                sent += len(event.data)
                if sent > limit:
                    raise ResourceExhausted(f"{what} is larger than {limit} bytes; ask for less")
                yield event.data
            elif event.judgement.verdict == "output_truncated":
                raise ResourceExhausted(f"{what} is larger than {limit} bytes; ask for less")
            else:
                text = err.decode("utf-8", "replace").strip()
                ok = event.judgement.verdict == "ok"
                return ok, text if ok else text or event.judgement.message
        return False, "the command ended without a result"
