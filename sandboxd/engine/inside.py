"""What the Docker adapter runs inside a sandbox and reads back from its runtime: the script
that kills an exec's processes, and the runtime's own text to keep from clients."""

from __future__ import annotations

import re

#: Processes that started this long before an exec's start was seen count as its own.
KILL_SLACK_SECONDS = 0.5
#: Run inside the sandbox as `sh -c SCRIPT NAME TAG AGO KEEP`: kills the processes tagged
#: TAG, and those started less than AGO hundredths of a second ago that descend neither from
#: this script nor from a process tagged with one of KEEP (the execs to spare). Clock ticks
#: are hundredths (USER_HZ 100 on Linux and in gVisor).
KILL_SCRIPT = r"""
me=$$ tag=$1 ago=$2 keep=$3
tagged() {
  for k in $2; do grep -qsa "SANDBOXD_EXEC=$k" "/proc/$1/environ" && return 0; done
  return 1
}
spared() {
  q=$1
  while [ "$q" -gt 1 ]; do
    [ "$q" = "$me" ] && return 0
    tagged "$q" "$keep" && return 0
    read -r st 2>/dev/null < "/proc/$q/stat" || return 1
    set -- ${st##*) }; q=$2
  done
  return 1
}
for _ in 1 2 3; do
  read -r up _ < /proc/uptime
  frac=${up#*.}; frac=${frac#0}
  since=$(( ${up%.*} * 100 + ${frac:-0} - ago ))
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    [ "$p" = 1 ] || [ "$p" = "$me" ] && continue
    if tagged "$p" "$tag"; then kill -9 "$p" 2>/dev/null; continue; fi
    read -r st 2>/dev/null < "$d/stat" || continue
    set -- ${st##*) }
    eval "start=\${20}"
    [ "$start" -ge "$since" ] 2>/dev/null || continue
    spared "$p" || kill -9 "$p" 2>/dev/null
  done
done
echo killed
"""
#: What gVisor writes to an exec's stderr when its sandbox dies under it (e.g. killed for
#: memory): its internal RPC error naming the container. The verdict says what happened.
RUNSC_NOISE = re.compile(
    rb'[^\n]*(?:in sandbox "[0-9a-f]{64}"|urpc method "containerManager\.)[^\n]*\n?'
)
#: A full 64-hex engine id (not an image digest): shortened to Docker's 12-digit form.
_LONG_ID = re.compile(r"(?<![0-9a-f:])([0-9a-f]{12})[0-9a-f]{52}(?![0-9a-f])")


def scrub(text: str) -> str:
    """The engine's text without its 64-hex ids (shortened) or gVisor's internal errors."""
    text = RUNSC_NOISE.sub(b"", text.encode()).decode().strip() or text
    return _LONG_ID.sub(r"\1", text)
