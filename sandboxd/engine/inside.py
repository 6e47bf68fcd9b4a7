"""What the Docker adapter runs inside a sandbox and reads back from its runtime: the script
that kills an exec's processes, and the runtime's own text to keep from clients."""

from __future__ import annotations

import re

#: Processes that started this long before an exec's start was seen count as its own (the
#: exec's first process starts a little after it is asked for).
KILL_SLACK_SECONDS = 0.5
#: Run inside the sandbox as `sh -c SCRIPT NAME TAG KEEP`, AGO on stdin: kills the processes
#: tagged TAG, and those that started since the exec (AGO hundredths of a second before this
#: script, or the oldest tagged process if earlier) and descend neither from this script nor
#: from a process tagged with one of KEEP (tags joined by "|": the execs to spare); the
#: container's command (the oldest child of pid 1, its init; orphans are younger) stays. Clock
#: ticks are hundredths (USER_HZ is 100 on Linux and in gVisor). Two greps a pass and shell
#: builtins otherwise: a fork is slow under gVisor, and the sandbox may be full of processes.
KILL_SCRIPT = r"""
me=$$ tag=$1 keep=$2
read -r ago
read -r st < "/proc/$me/stat"; set -- ${st##*) }; eval "since=\$(( \${20} - ago ))"
cmd=0 oldest=
for d in /proc/[0-9]*; do
  read -r st 2>/dev/null < "$d/stat" || continue
  set -- ${st##*) }
  [ "$2" = 1 ] || continue
  eval "s=\${20}"
  if [ -z "$oldest" ] || [ "$s" -lt "$oldest" ]; then oldest=$s cmd=${d#/proc/}; fi
done
for _ in 1 2 3; do
  for f in $(grep -lsa "SANDBOXD_EXEC=$tag" /proc/[0-9]*/environ); do
    d=${f%/environ}
    if read -r st 2>/dev/null < "$d/stat"; then
      set -- ${st##*) }; eval "[ \${20} -lt $since ] && since=\${20}"
    fi
    kill -9 "${d#/proc/}" 2>/dev/null
  done
  kept=" "
  if [ -n "$keep" ]; then
    for f in $(grep -lsaE "SANDBOXD_EXEC=($keep)" /proc/[0-9]*/environ); do
      p=${f#/proc/}; kept="$kept${p%/environ} "
    done
  fi
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    [ "$p" = 1 ] || [ "$p" = "$me" ] || [ "$p" = "$cmd" ] && continue
    read -r st 2>/dev/null < "$d/stat" || continue
    set -- ${st##*) }
    eval "start=\${20}"
    [ "$start" -ge "$since" ] 2>/dev/null || continue
    q=$p
    while [ "$q" -gt 1 ]; do
      case "$kept" in *" $q "*) break ;; esac
      [ "$q" = "$me" ] && break
      read -r st 2>/dev/null < "/proc/$q/stat" || { q=2; break; }
      set -- ${st##*) }; q=$2
    done
    [ "$q" -le 1 ] 2>/dev/null && kill -9 "$p" 2>/dev/null
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
