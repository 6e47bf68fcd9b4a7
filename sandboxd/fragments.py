"""Dockerfile fragments read with Docker's own grammar, and what a fragment may not say.

The `dockerfile` package wraps the official parser (moby/buildkit's), so line
continuations, any letter case, parser directives (`# escape=`) and heredocs are read
exactly as the engine would read them: a check cannot be fooled by `F\\`-newline-`ROM`.
A fragment is untrusted input on a server with tenants; what it could use to reach
another image (FROM, `COPY --from`, `RUN --mount=from=`, ONBUILD), the host's network
(remote ADD) or the host's disk (VOLUME) is refused here, naming the line.

`parse_fragment` is the whole API; the builder executes the instructions it returns.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

import dockerfile

from sandboxd.errors import InvalidArgument

#: Instructions a fragment may use; each is executed by `sandboxd.builder`.
Keyword = Literal[
    "RUN", "COPY", "ADD", "ENV", "ARG", "WORKDIR", "USER", "LABEL",
    "CMD", "ENTRYPOINT", "EXPOSE", "STOPSIGNAL", "SHELL",
]  # fmt: skip
KEYWORDS: frozenset[str] = frozenset(get_args(Keyword))

#: Refused instructions and why, in the words the client reads.
_REFUSED = {
    "FROM": "the base image is given by the request's `base`, not by the fragment",
    "ONBUILD": "it would run steps in another build",
    "VOLUME": "an image volume would be kept on the host's disk, outside the scratch limit",
    "HEALTHCHECK": "sandboxes do not run health checks",
    "MAINTAINER": "use LABEL instead",
}
#: Flags each instruction may carry; any other flag is refused.
_FLAGS: Mapping[str, frozenset[str]] = {
    "COPY": frozenset({"chown", "chmod"}),
    "ADD": frozenset({"chown", "chmod"}),
}
_FLAG_WHY = {
    "from": "it reads files from another image",
    "mount": "a build step gets no mounts",
    "network": "the build's network is the server's policy",
    "security": "a build step gets no extra privileges",
}
_REMOTE = re.compile(r"^(?:[a-z][a-z0-9+.-]*://|git@)", re.IGNORECASE)


@dataclass(frozen=True)
class Instruction:
    """One parsed instruction of a fragment."""

    keyword: Keyword
    #: The instruction's words, as written (quotes and variables not yet processed).
    args: tuple[str, ...]
    #: `--name=value` flags, names without dashes.
    flags: tuple[tuple[str, str], ...]
    #: Exec (JSON array) form rather than shell form.
    json: bool
    #: First line of the instruction in the fragment, counting from 1.
    line: int
    #: Heredoc bodies, in order: (name, content).
    heredocs: tuple[tuple[str, str], ...]
    #: The instruction as written, continuations joined (for logs and messages).
    text: str

    def flag(self, name: str) -> str | None:
        return next((v for k, v in self.flags if k == name), None)


@functools.lru_cache(maxsize=256)
def parse_fragment(fragment: str) -> tuple[Instruction, ...]:
    """The fragment's instructions, refusing any it may not contain. Remembered: a cache
    hit repeats its fragment, and a call into the Go parser can stall for its runtime.

    Raises:
        InvalidArgument: unparseable, or a refused instruction, flag or source (the
            message names the fragment's line).
    """
    try:
        commands = dockerfile.parse_string(fragment)
    except dockerfile.GoParseError as exc:
        if str(exc) == "file with no instructions":
            return ()  # an empty fragment: the base image as it is
        raise InvalidArgument(f"fragment: {exc}") from None
    return tuple(_checked(c) for c in commands)


def _checked(command: dockerfile.Command) -> Instruction:
    keyword = command.cmd.upper()
    line = command.start_line
    shown = command.original.splitlines()[0][:120] if command.original else keyword

    def refuse(why: str) -> InvalidArgument:
        return InvalidArgument(f"fragment line {line}: {why}: {shown}")

    if keyword in _REFUSED:
        raise refuse(f"{keyword} is not allowed in a fragment ({_REFUSED[keyword]})")
    if keyword not in KEYWORDS:
        raise refuse(f"unknown instruction {keyword} (or one a fragment cannot use)")
    flags = tuple(_flag(f) for f in command.flags)
    allowed = _FLAGS.get(keyword, frozenset())
    for name, _ in flags:
        if name not in allowed:
            why = _FLAG_WHY.get(name, "not supported in a fragment")
            raise refuse(f"{keyword} --{name} is not allowed ({why})")
    if keyword == "ADD" and any(_REMOTE.match(src) for src in command.value[:-1]):
        raise refuse(
            "ADD from a URL is not allowed (the build has no path to the network but the "
            "server's policy); fetch it in a RUN step or send it as a context file"
        )
    if keyword in ("COPY", "ADD") and command.heredocs:
        raise refuse(f"{keyword} from a heredoc is not supported; send a context file")
    if keyword != "RUN" and not command.value:
        raise refuse(f"{keyword} needs arguments")
    return Instruction(
        keyword=keyword,
        args=tuple(command.value),
        flags=flags,
        json=command.json,
        line=line,
        heredocs=tuple((h.name, h.content) for h in command.heredocs),
        text=command.original,
    )


def _flag(text: str) -> tuple[str, str]:
    name, _, value = text.lstrip("-").partition("=")
    return name.lower(), value


_VAR = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<op>[-+])(?P<word>[^}]*))?\}"
                  r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")  # fmt: skip


def expand(word: str, env: Mapping[str, str]) -> str:
    """One word as Docker's builder reads it: quotes removed, `$VAR`, `${VAR}`,
    `${VAR:-default}` and `${VAR:+alternative}` replaced; single quotes keep `$`."""
    out: list[str] = []
    i, quote = 0, ""
    while i < len(word):
        ch = word[i]
        if ch == "\\" and i + 1 < len(word) and quote != "'":
            out.append(word[i + 1])
            i += 2
        elif ch in "'\"" and quote in ("", ch):
            quote = "" if quote else ch
            i += 1
        elif ch == "$" and quote != "'":
            match = _VAR.match(word, i)
            if match is None:
                out.append(ch)
                i += 1
                continue
            out.append(_variable(match, env))
            i = match.end()
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _variable(match: re.Match[str], env: Mapping[str, str]) -> str:
    name = match.group("braced") or match.group("plain")
    value = env.get(name, "")
    if match.group("op") == "-":
        return value or match.group("word")
    if match.group("op") == "+":
        return match.group("word") if value else ""
    return value
