"""`sandboxd serve | daemon | build | run | shell | exec | grade | info | gc | bootstrap-image`.

Size: past the house's ~450 lines on purpose: each subcommand is a parser function and a
command function, and keeping them in one module keeps the CLI's reference in one place.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sandboxd import errors, terminal
from sandboxd.config import DEFAULT_BASE_IMAGE, ServerConfig, load_config
from sandboxd.engine import ENGINES
from sandboxd.limits import parse_size

if TYPE_CHECKING:
    from sandboxd.api import ExecResult, Sandbox
    from sandboxd.client import SandboxClient

log = logging.getLogger("sandboxd")
#: Where `serve` listens by default, and so where `shell` and `exec` look first.
DEFAULT_LISTEN = "unix:/run/sandboxd/sandboxd.sock"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sandboxd", description="Run code in throwaway, limited containers."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    p.add_argument("--config", type=Path, help="TOML config file (defaults, caps, profiles)")
    p.add_argument(
        "--engine",
        choices=ENGINES,
        help="container engine for the sandboxes (default: the config's, else docker)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_daemon(sub)
    _add_bootstrap_image(sub)
    _add_build(sub)
    _add_gc(sub)
    _add_run(sub)
    _add_shell(sub)
    _add_exec(sub)
    _add_info(sub)
    _add_grade(sub)
    _add_port_forward(sub)
    return p


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser("serve", help="serve the gRPC API")
    serve.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        help="unix:PATH or HOST:PORT (default %(default)s)",
    )
    serve.add_argument(
        "--grace", type=float, default=10.0, help="seconds running calls get at shutdown"
    )
    serve.add_argument(
        "--tokens", type=Path, help="bearer tokens for TCP callers: 'TOKEN CLIENT_NAME' per line"
    )
    serve.add_argument("--tls-cert", type=Path, help="server certificate (PEM) for TCP")
    serve.add_argument("--tls-key", type=Path, help="server private key (PEM) for TCP")
    serve.add_argument(
        "--tls-client-ca", type=Path, help="require client certificates signed by this CA (mTLS)"
    )


def _add_daemon(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    daemon = sub.add_parser("daemon", help="the per-user local sandboxd (pytest --sandbox, run)")
    daemon.add_argument("action", choices=("start", "status", "stop", "run"), help="run: here")
    daemon.add_argument("--socket", type=Path, help="default: $SANDBOXD_SOCKET, else per user")
    daemon.add_argument(
        "--idle-exit", type=float, metavar="S", help="exit after S seconds without clients"
    )


def _add_bootstrap_image(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    boot = sub.add_parser("bootstrap-image", help="make the offline base image (debootstrap)")
    boot.add_argument("--tag", default=DEFAULT_BASE_IMAGE)
    boot.add_argument("--mirror", default="http://deb.debian.org/debian")
    boot.add_argument("--suite", default="bookworm")


def _add_build(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    build = sub.add_parser("build", help="build an image from a Dockerfile fragment")
    build.add_argument(
        "--dockerfile", default="", help="fragment text, or @FILE to read it from a file"
    )
    build.add_argument("--base", default="", help="base image (default: the server's)")
    build.add_argument("--address", help="use a running sandboxd instead of an embedded one")
    _add_tls(build)


def _add_gc(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gc = sub.add_parser("gc", help="remove sandbox containers left by dead instances")
    gc.add_argument("--all", action="store_true", help="also of live instances, and kept ones")
    gc.add_argument("--images", action="store_true", help="also remove the cached images")


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser("run", help="run one command in a fresh sandbox")
    run.add_argument("--dockerfile", default="", help="fragment text, or @FILE")
    run.add_argument("--image", default="", help="image key or reference (default: base image)")
    run.add_argument("--cpus", type=float, default=0.0)
    run.add_argument("--memory", default="", help="e.g. 512m, 1g")
    run.add_argument("--pids", type=int, default=0)
    run.add_argument("--timeout", type=float, default=0.0, help="wall seconds")
    run.add_argument("--network", action="store_true")
    run.add_argument("--profile", default="", help="security profile: default or untrusted")
    run.add_argument("--runtime", default="", help="container runtime, e.g. runsc")
    run.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    run.add_argument("--json", action="store_true", help="print a JSON result as the last line")
    run.add_argument("--address", help="use this sandboxd instead of the local daemon")
    run.add_argument("--embedded", action="store_true", help="a service in this process")
    _add_tls(run)
    run.add_argument("argv", nargs=argparse.REMAINDER, help="-- CMD ARGS...")


def _add_session_options(parser: argparse.ArgumentParser) -> None:
    """Options `shell` and `exec` share: where the sandbox is, and the command's deadline."""
    parser.add_argument(
        "--address",
        default=os.environ.get("SANDBOXD_ADDRESS") or DEFAULT_LISTEN,
        help="the sandboxd that made the sandbox (default: $SANDBOXD_ADDRESS, else %(default)s)",
    )
    _add_tls(parser)
    parser.add_argument(
        "--timeout", type=float, default=0.0, help="wall seconds (default: the sandbox's)"
    )
    parser.add_argument("--workdir", default="", help="working directory inside the sandbox")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")


def _add_shell(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    shell = sub.add_parser(
        "shell", help="an interactive shell (or CMD) in a running sandbox, on this terminal"
    )
    _add_session_options(shell)
    shell.add_argument("sandbox_id", metavar="SANDBOX_ID")
    shell.add_argument("argv", nargs=argparse.REMAINDER, help="CMD ARGS... (default /bin/sh)")


def _add_exec(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ex = sub.add_parser("exec", help="run a command in a running sandbox (docker exec's options)")
    ex.add_argument("-i", "--interactive", action="store_true", help="pass stdin on")
    ex.add_argument("-t", "--tty", action="store_true", help="on a terminal (stdin must be one)")
    _add_session_options(ex)
    ex.add_argument("sandbox_id", metavar="SANDBOX_ID")
    ex.add_argument("argv", nargs=argparse.REMAINDER, help="CMD ARGS...")


def _add_info(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    info = sub.add_parser("info", help="print what the server offers (caps, profiles...) as JSON")
    info.add_argument("--address", help="ask a running sandboxd instead of an embedded one")
    _add_tls(info)


def _add_grade(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    grade = sub.add_parser("grade", help="run a course's tests against every submission")
    grade.add_argument(
        "--tests", type=Path, required=True, help="the course's tests dir (course.toml optional)"
    )
    grade.add_argument(
        "--submissions", type=Path, required=True, help="one sub-folder or .zip per submission"
    )
    grade.add_argument("--profile", default="untrusted", help="security profile (%(default)s)")
    grade.add_argument("--runtime", default="", help="container runtime (default: the profile's)")
    grade.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="submissions at once (default: two per core here, at most the server's slots)",
    )
    grade.add_argument(
        "--cpu-time", type=float, default=10.0, help="CPU seconds per submission (%(default)s)"
    )
    grade.add_argument(
        "--timeout", type=float, default=60.0, help="wall seconds per submission (%(default)s)"
    )
    grade.add_argument("--memory", default="256m", help="memory per submission (%(default)s)")
    grade.add_argument(
        "--test-timeout",
        type=float,
        help="seconds per test, each under its own limits (default: course.toml's, else "
        "5, at most half of --cpu-time; 0: one run for the whole suite)",
    )
    grade.add_argument("--out", type=Path, help="results JSON (default: stdout)")
    grade.add_argument(
        "--reports",
        type=Path,
        help="also write gradebook.csv, report.html and gradescope/NAME/results.json here",
    )
    grade.add_argument("--address", help="use a running sandboxd instead of an embedded one")
    _add_tls(grade)


def _add_port_forward(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    forward = sub.add_parser("port-forward", help="reach a port inside a sandbox from 127.0.0.1")
    forward.add_argument("sandbox_id", help="the sandbox's id")
    forward.add_argument("ports", help="LOCAL_PORT:SANDBOX_PORT (LOCAL_PORT 0: any free one)")
    forward.add_argument("--address", help="the sandboxd that holds the sandbox")
    _add_tls(forward)


def _fragment(value: str) -> str:
    if value.startswith("@"):
        try:
            return Path(value[1:]).read_text()
        except OSError as exc:
            raise errors.InvalidArgument(f"--dockerfile {value}: {exc.strerror}") from None
    return value


def _add_tls(parser: argparse.ArgumentParser) -> None:
    """TLS options of the client commands (else SANDBOXD_TLS_CA/_CERT/_KEY apply)."""
    parser.add_argument("--tls-ca", type=Path, help="CA (PEM) that signed the server's cert")
    parser.add_argument("--tls-cert", type=Path, help="client certificate (PEM) for mTLS")
    parser.add_argument("--tls-key", type=Path, help="client private key (PEM) for mTLS")


@contextlib.contextmanager
def _client(
    args: argparse.Namespace, config: ServerConfig, *, local: bool = False
) -> Iterator[SandboxClient]:
    """Without --address: the local daemon when `local` (and not --embedded), else a
    service embedded in this process."""
    from sandboxd import daemon
    from sandboxd.channels import tls_credentials

    given = (args.tls_ca, args.tls_cert, args.tls_key)
    credentials = tls_credentials(*given) if any(given) else None
    local = local and not getattr(args, "embedded", False)
    with daemon.open_connection(
        args.address, config=config, credentials=credentials, local=local, config_path=args.config
    ) as connection:
        yield connection.client


def cmd_daemon(args: argparse.Namespace, config: ServerConfig) -> int:
    from sandboxd import daemon

    paths = daemon.DaemonPaths(args.socket) if args.socket else daemon.default_paths()
    idle = args.idle_exit if args.idle_exit is not None else config.daemon_idle_seconds
    if args.action == "run":
        return daemon.Daemon(config, paths, idle).run()
    code, message = daemon.control(args.action, paths, args.config, args.idle_exit)
    print(message)
    return code


def cmd_serve(args: argparse.Namespace, config: ServerConfig) -> int:
    from sandboxd import daemon

    with daemon.quiet_collector():
        from sandboxd.server import create_server, serve_forever

        service, bound = create_server(config, args.listen)
    print(f"sandboxd listening on {bound}", file=sys.stderr, flush=True)
    serve_forever(service, args.grace)
    return 0


def cmd_bootstrap(args: argparse.Namespace, config: ServerConfig) -> int:
    from sandboxd.bootstrap import make_base_image
    from sandboxd.engine import make_engine

    image = make_base_image(
        make_engine(config),
        tag=args.tag,
        mirror=args.mirror,
        suite=args.suite,
        on_log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(image)
    return 0


def cmd_build(args: argparse.Namespace, config: ServerConfig) -> int:
    with _client(args, config) as client:
        result = client.build_image(
            _fragment(args.dockerfile),
            base=args.base,
            on_log=lambda line: print(line, file=sys.stderr, flush=True),
        )
    print(
        json.dumps(
            {
                "key": result.image.key,
                "digest": result.image.digest,
                "tag": result.image.tag,
                "cache_hit": result.cache_hit,
                "build_seconds": round(result.build_seconds, 3),
            }
        )
    )
    return 0


def cmd_gc(args: argparse.Namespace, config: ServerConfig) -> int:
    from sandboxd import reaping
    from sandboxd.engine import make_engine
    from sandboxd.engine.base import LABEL_KEY

    engine = make_engine(config)
    removed = 0
    for info in reaping.LeftoverRule("all" if args.all else "orphans").find(engine, time.time()):
        engine.remove_container(info.id)
        removed += 1
    images = 0
    if args.images:
        for image_id, _, _, _ in engine.list_images(LABEL_KEY):
            engine.remove_image(image_id)
            images += 1
    print(f"removed {removed} containers, {images} images")
    return 0


def _env(items: list[str]) -> dict[str, str]:
    """Raises: InvalidArgument: an item is not NAME=VALUE."""
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise errors.InvalidArgument(f"--env {item!r}: expected NAME=VALUE")
        env[name] = value
    return env


def _command(given: list[str], hint: str) -> list[str]:
    """The command after an optional "--".

    Raises:
        InvalidArgument: none was given (`hint` says how).
    """
    argv = given[1:] if given and given[0] == "--" else list(given)
    if not argv:
        raise errors.InvalidArgument(hint)
    return argv


def _show(stream: str, data: bytes) -> None:
    out = sys.stdout if stream == "stdout" else sys.stderr
    out.buffer.write(data)
    out.flush()


def cmd_run(args: argparse.Namespace, config: ServerConfig) -> int:
    from sandboxd.api import SandboxRequest, requested_limits

    argv = _command(args.argv, "give the command after --, e.g. sandboxd run -- python3 -V")
    limits = requested_limits(
        cpus=args.cpus,
        memory_bytes=parse_size(args.memory, field="--memory") if args.memory else 0,
        pids=args.pids,
        timeout_seconds=args.timeout,
        network=args.network,
    )
    env = _env(args.env)
    fragment = _fragment(args.dockerfile)
    with _client(args, config, local=True) as client:
        image = args.image
        digest = ""
        if fragment:
            built = client.build_image(
                fragment,
                base=args.image,
                on_log=lambda line: (
                    print(line, file=sys.stderr, flush=True) if args.verbose else None
                ),
            )
            image, digest = built.image.key, built.image.digest
        request = SandboxRequest(
            image=image, limits=limits, env=env, profile=args.profile, runtime=args.runtime
        )
        with client.sandbox(request) as box:
            result = box.exec(argv, on_output=_show)
        sandbox = box.sandbox
    code = _exit_code(result)
    if args.json:
        summary = _run_summary(result, sandbox, code, image or config.base_image, digest)
        sys.stdout.write("\n" + json.dumps(summary) + "\n")
    return code


def _exit_code(result: ExecResult) -> int:
    """This command's exit code for `result` (a limit's own code, else the command's);
    a limit kill is also said on stderr."""
    info = result.info
    own = result.exit_code if result.exit_code >= 0 else 1
    if not info.finished:
        print(f"sandboxd: {result.message}", file=sys.stderr)
    return info.cli_exit if info.cli_exit is not None else own


def cmd_shell(args: argparse.Namespace, config: ServerConfig) -> int:
    argv = list(args.argv) or ["/bin/sh"]
    on_tty = terminal.is_terminal(0)
    return _interactive(args, config, argv, tty=on_tty, forward_stdin=True)


def cmd_exec(args: argparse.Namespace, config: ServerConfig) -> int:
    """Raises: InvalidArgument: no command, or -t without a terminal on stdin."""
    argv = _command(args.argv, "give the command, e.g. sandboxd exec -it SANDBOX_ID sh")
    if args.tty and not terminal.is_terminal(0):
        raise errors.InvalidArgument("-t: stdin is not a terminal (leave -t out)")
    return _interactive(args, config, argv, tty=args.tty, forward_stdin=args.interactive)


def _interactive(
    args: argparse.Namespace,
    config: ServerConfig,
    argv: list[str],
    *,
    tty: bool,
    forward_stdin: bool,
) -> int:
    """Attach this terminal to `argv` in the sandbox; exit with its exit code."""
    with _client(args, config) as client:
        session = client.exec_session(
            args.sandbox_id,
            argv,
            tty=tty,
            window=terminal.window(0) if tty else None,
            timeout=args.timeout,
            env=_env(args.env),
            workdir=args.workdir,
        )
        result = terminal.attach(session, tty_mode=tty, forward_stdin=forward_stdin)
    return _exit_code(result)


def _run_summary(
    result: ExecResult, sandbox: Sandbox, code: int, image: str, digest: str
) -> dict[str, object]:
    """The JSON object `run --json` prints as its last line."""
    applied = sandbox.limits
    return {
        "exit_code": code,
        "command_exit_code": result.exit_code,
        "signal": result.signal,
        "verdict": result.verdict,
        "message": result.message,
        "wall_seconds": round(result.wall_seconds, 4),
        "cpu_seconds": round(result.cpu_seconds, 4),
        "peak_memory_bytes": result.peak_memory_bytes,
        "output_truncated": result.output_truncated,
        "image": image,
        "image_digest": digest or sandbox.image_digest,
        "limits": {
            "cpus": applied.cpus,
            "memory_bytes": applied.memory_bytes,
            "pids": applied.pids,
            "timeout_seconds": applied.timeout_seconds,
            "network": applied.network,
        },
    }


def cmd_info(args: argparse.Namespace, config: ServerConfig) -> int:
    with _client(args, config) as client:
        info = client.server_info()
    print(json.dumps(dataclasses.asdict(info), indent=2, sort_keys=True))
    return 0


def cmd_grade(args: argparse.Namespace, config: ServerConfig) -> int:
    from sandboxd import grade_reports, grading
    from sandboxd.gradebook import load_course
    from sandboxd.submissions import load_submissions

    settings = grading.GradeSettings(
        profile=args.profile,
        runtime=args.runtime,
        cpu_seconds=args.cpu_time,
        timeout_seconds=args.timeout,
        memory_bytes=parse_size(args.memory, field="--memory"),
        jobs=args.jobs,
    )
    course = load_course(args.tests, test_timeout=args.test_timeout)
    submissions = load_submissions(args.submissions)
    if not submissions:
        raise errors.InvalidArgument(
            f"--submissions {args.submissions}: no sub-folders or .zip files to grade"
        )
    print(f"grading {len(submissions)} submissions", file=sys.stderr, flush=True)
    with _client(args, config) as client:
        document = grading.grade_all(
            client,
            args.tests,
            submissions,
            settings,
            args.reports / "junit" if args.reports else grading.junit_dir_for(args.out),
            progress=lambda line: print(line, file=sys.stderr, flush=True),
            course=course,
        )
    grading.write_results(document, args.out)
    if args.reports is not None:
        for path in grade_reports.write_reports(document, args.reports):
            print(f"wrote {path}", file=sys.stderr, flush=True)
    return 0


def cmd_port_forward(args: argparse.Namespace, config: ServerConfig) -> int:
    from sandboxd.tunnels import Tunnel, parse_ports

    local, remote = parse_ports(args.ports)
    say = functools.partial(print, file=sys.stderr, flush=True)
    with _client(args, config) as client:
        client.get_sandbox(args.sandbox_id)  # a wrong id fails here, not at a connection
        tunnel = Tunnel(lambda up: client.port_forward(args.sandbox_id, remote, up), local)
        say(f"Forwarding from 127.0.0.1:{tunnel.port} -> {args.sandbox_id}:{remote}")
        try:
            tunnel.serve_forever(on_error=lambda message: say(f"sandboxd: {message}"))
        finally:
            tunnel.close()
    return 0


COMMANDS = {
    "serve": cmd_serve,
    "daemon": cmd_daemon,
    "bootstrap-image": cmd_bootstrap,
    "build": cmd_build,
    "gc": cmd_gc,
    "run": cmd_run,
    "shell": cmd_shell,
    "exec": cmd_exec,
    "grade": cmd_grade,
    "info": cmd_info,
    "port-forward": cmd_port_forward,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG
        if args.verbose
        else logging.WARNING
        if args.command in ("run", "shell", "exec", "grade", "info")
        or (args.command == "daemon" and args.action != "run")
        else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        overrides = {"engine": args.engine}
        if args.command == "serve":
            overrides |= {
                "tokens_file": args.tokens,
                "tls_cert": args.tls_cert,
                "tls_key": args.tls_key,
                "tls_client_ca": args.tls_client_ca,
            }
        config = load_config(args.config, **overrides)
        return COMMANDS[args.command](args, config)
    except errors.SandboxError as exc:
        print(f"sandboxd: error: {exc.message}", file=sys.stderr)
        return 2 if isinstance(exc, errors.InvalidArgument) else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
