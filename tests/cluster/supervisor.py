"""Runs one lab process (a node's engine, its Ray node, the gateway) and reaps its orphans.

    python supervisor.py SUPERVISOR_CGROUP_PROCS CHILD_CGROUP_PROCS -- CMD ARGS...

Daemons double-fork (containerd's shims) and Ray's raylet leaves its workers behind when
it is killed; their orphans would otherwise go to the machine's init, which here does not
reap them. This process is a child subreaper: every orphan of CMD's tree becomes its
child and is reaped, and it exits only when the last one has gone, with CMD's status.
It puts itself in one cgroup and CMD in another, so the lab can kill CMD's whole tree by
cgroup and then see the supervisor leave on its own. SIGTERM and SIGINT go on to CMD.
Standalone on purpose: it runs as a script and imports nothing from the project.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

PR_SET_CHILD_SUBREAPER = 36


def _join(cgroup_procs: str) -> None:
    with open(cgroup_procs, "w") as f:
        f.write(str(os.getpid()))


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    own_cgroup, child_cgroup, command = argv[0], argv[1], argv[3:]
    _join(own_cgroup)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print("supervisor: prctl(PR_SET_CHILD_SUBREAPER) failed", file=sys.stderr)
        return 1
    child = os.fork()
    if child == 0:
        try:
            _join(child_cgroup)
            os.execvp(command[0], command)
        finally:
            os._exit(127)

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    while True:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            return status
        if pid == child:
            status = os.waitstatus_to_exitcode(wait_status)
            status = status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
