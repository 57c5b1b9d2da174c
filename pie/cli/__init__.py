"""The `pie` command: serve the daemon, run programs on it, mint tokens, query it.

    pie serve [DAEMON OPTIONS]            run the daemon in the foreground (twistd pie)
    pie run PROGRAM [-- ARGS...]          upload if missing, launch, stream events, exit with the outcome
    pie run --server PORT PROGRAM [-- ARGS...]   serve a server inferlet on 127.0.0.1:PORT until Ctrl-C
    pie token [--role Admin]              print a JWT signed with the daemon's secret
    pie query SUBJECT [RECORD]            program_exists HASH | model_status
    pie model ... / pie worker ... / pie sandbox ...   model registry, remote worker, sandbox build

`run` and `query` find a token in --token, then $PIE_TOKEN, then mint one from
the daemon's secret (--config, --secret-file, or HOME/auth_secret) when that is
readable; with none, they connect unauthenticated (fine for `serve --no-auth`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from twisted.internet.defer import Deferred

from pie import config as pieconfig

DEFAULT_URL = "ws://127.0.0.1:8080"
NORMAL_FINISH = "instance normally finished"

# `pie NAME ARGV` for the subcommands that parse their own arguments: NAME -> module.run
SUBCOMMANDS = ("model", "worker", "sandbox")


class CliError(Exception):
    """A failure to report in one line, exit status 2."""


# ---------------------------------------------------------------------------- tokens


def _secret(args: argparse.Namespace, required: bool) -> str | None:
    """The daemon's HS256 secret, from the same settings the daemon reads."""
    file_values = pieconfig.load_config_file(args.config) if args.config else {}
    cli = {"auth_secret_file": args.secret_file, "home": args.home}
    settings = pieconfig.resolve(cli, file_values)
    if settings["auth_secret"]:
        return settings["auth_secret"]
    path = Path(settings["auth_secret_file"] or os.path.join(settings["home"], "auth_secret"))
    if path.exists():
        return path.read_text().strip()
    if required:
        raise CliError(
            f"no secret: {path} does not exist (start the daemon once, or pass --config/--secret-file)"
        )
    return None


def _token(args: argparse.Namespace) -> str | None:
    from pie.server.auth import issue_token

    if args.token:
        return args.token
    if os.environ.get("PIE_TOKEN"):
        return os.environ["PIE_TOKEN"]
    secret = _secret(args, required=False)
    return issue_token(secret, subject="default") if secret else None


def token_command(args: argparse.Namespace, out: TextIO) -> int:
    from pie.server.auth import issue_token

    secret = _secret(args, required=True)
    token = issue_token(secret, args.subject, args.role, lifetime_seconds=int(args.days * 86400))
    print(token, file=out)
    return 0


# ---------------------------------------------------------------------------- client commands


async def _session(args: argparse.Namespace, reactor: Any) -> Any:
    from pie.client.tx import connect

    try:
        client = await connect(args.url, reactor=reactor)
    except Exception as e:
        raise CliError(f"cannot connect to {args.url}: {e}") from None
    token = _token(args)
    if token is not None:
        await client.authenticate(token)
    return client


async def run_program(
    args: argparse.Namespace,
    reactor: Any,
    out: TextIO,
    err: TextIO,
    interrupted: Deferred | None = None,
) -> int:
    """`pie run`: messages go to `out`, progress and the end reason to `err`.

    With --server, the program is launched as a server instance on PORT, its URL
    goes to `out`, and it runs until `interrupted` fires (Ctrl-C): then it is
    terminated and the command waits for the daemon to say it stopped (status 0).
    """
    from pie.server.uploads import hash_program

    try:
        program = Path(args.program).expanduser().read_bytes()
    except OSError as e:
        raise CliError(f"cannot read {args.program}: {e.strerror}") from None
    client = await _session(args, reactor)
    try:
        program_hash = hash_program(program)
        if not await client.program_exists(program_hash):
            await client.upload_program(program)
            print(f"uploaded {args.program} ({program_hash})", file=err)
        if args.server is None:
            instance = await client.launch_instance(program_hash, args.arguments)
            print(f"instance {instance.instance_id}", file=err)
        else:
            instance = await client.launch_server_instance(
                program_hash, args.server, args.arguments
            )
            print(f"http://127.0.0.1:{args.server}/", file=out, flush=True)
            print(f"server instance {instance.instance_id}; Ctrl-C stops it", file=err, flush=True)
            stopping: list[bool] = []
            if interrupted is not None:
                interrupted.addCallback(lambda _: stopping.append(True) or instance.terminate())
        async for event, message in instance:
            if event == "message":
                print(message, file=out, flush=True)
            elif event == "terminated":
                print(f"terminated: {message}", file=err)
                if args.server is not None and stopping:
                    return 0
                return 0 if message == NORMAL_FINISH else 1
        return 1
    finally:
        if client.state == client.STATE_OPEN:
            await client.close()


async def query_command(args: argparse.Namespace, reactor: Any, out: TextIO) -> int:
    client = await _session(args, reactor)
    try:
        print(await client.query(args.subject, args.record), file=out)
        return 0
    finally:
        await client.close()


# ---------------------------------------------------------------------------- serve and hooks


def serve(argv: list[str]) -> int:
    """Run `twistd -n pie ARGV` in this process, finding the plugin even without an install.

    Exits 1 with the reason when the daemon stopped because its model could not be loaded.
    """
    from twisted.application import app, service
    from twisted.plugin import getPlugins
    from twisted.scripts.twistd import ServerOptions, runApp

    from pie import tap
    from pie.service.local import LocalModelService

    made: list[service.IService] = []

    class Maker(service.ServiceMaker):
        """The pie tap, keeping the tree it made so the load outcome can be read after the run."""

        def makeService(self, options: Any) -> service.IService:
            made.append(tap.makeService(options))
            return made[-1]

    maker = Maker("pie", "pie.tap", "the pie daemon", "pie")

    def plugins(interface: Any, package: Any = None) -> Any:
        if interface is service.IServiceMaker:
            return [maker]
        return getPlugins(interface, package)

    class PieServerOptions(ServerOptions):
        _getPlugins = staticmethod(plugins)

    sys.argv = ["pie serve", "--nodaemon", "--pidfile=", "pie", *argv]
    app.run(runApp, PieServerOptions)
    failures = [s.failure for s in made[0] if isinstance(s, LocalModelService) and s.failure]
    if failures:  # (twistd has redirected sys.stderr into its log by now)
        reason = failures[0].getErrorMessage()
        print(f"pie serve: the model could not be loaded: {reason}", file=sys.__stderr__)
        return 1
    return 0


def dispatch(name: str, argv: list[str]) -> int:
    """`pie model|worker|sandbox ARGV`: each parses its own arguments."""
    if name == "model":
        from pie.cli.model import main as run
    elif name == "sandbox":
        from pie.cli.sandbox import main as run
    else:
        from pie.remote.worker import run
    return run(argv) or 0


# ---------------------------------------------------------------------------- parsing


def _connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL, help=f"daemon address [{DEFAULT_URL}]")
    parser.add_argument("--token", help="JWT to authenticate with (else $PIE_TOKEN, else minted)")
    _secret_options(parser)


def _secret_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="the daemon's TOML config (for its secret and home)")
    parser.add_argument("--secret-file", help="file holding the daemon's HS256 secret")
    parser.add_argument("--home", help="pie home holding auth_secret [$PIE_HOME or ~/.cache/pie]")


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1..65535, not {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pie", description="Programmable LLM inference engine.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("serve", help="run the daemon (options: pie serve --help)", add_help=False)
    run = commands.add_parser("run", help="run a program and stream its output")
    run.add_argument(
        "--server",
        type=_port,
        metavar="PORT",
        help="launch PROGRAM as a server inferlet on 127.0.0.1:PORT; print its URL, "
        "serve until Ctrl-C",
    )
    run.add_argument("program", help="inferlet source (.py) or archive")
    run.add_argument("arguments", nargs="*", help="arguments for the program (after --)")
    _connection_options(run)
    token = commands.add_parser("token", help="print a token signed with the daemon's secret")
    token.add_argument("--subject", default="default")
    token.add_argument("--role", choices=["User", "Admin"], default="User")
    token.add_argument("--days", type=float, default=365.0, help="validity [365]")
    _secret_options(token)
    query = commands.add_parser(
        "query",
        help="ask the daemon: program_exists HASH | model_status | kv_exports | kv_unexport JSON",
    )
    query.add_argument("subject")
    query.add_argument("record", nargs="?", default="")
    _connection_options(query)
    for name in SUBCOMMANDS:
        commands.add_parser(name, help=f"(see pie {name} --help)", add_help=False)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse, with everything after the first `--` going verbatim to the program."""
    head, tail = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    )
    args = build_parser().parse_args(head)
    if tail:
        if args.command != "run":
            build_parser().error("only `pie run` takes program arguments after --")
        args.arguments = [*args.arguments, *tail]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        return serve(argv[1:])
    if argv and argv[0] in SUBCOMMANDS:
        return dispatch(argv[0], argv[1:])
    args = parse_args(argv)
    try:
        if args.command == "token":
            return token_command(args, sys.stdout)
        return _react(args)
    except (CliError, pieconfig.ConfigError) as e:
        print(f"pie {args.command}: {e}", file=sys.stderr)
        return 2


STOP_WAIT_S = 10
"""After Ctrl-C, the longest `pie run --server` waits for the daemon to stop the server."""


def _on_stop(reactor: Any) -> tuple[Deferred, Deferred]:
    """(interrupted, finished): interrupted fires when the reactor is asked to stop (Ctrl-C,
    SIGTERM) before the command has finished; the stop then waits for `finished` (at most
    STOP_WAIT_S), so what the interruption starts (terminating a server) gets done."""
    interrupted: Deferred = Deferred()
    finished: Deferred = Deferred()

    def stopping() -> Deferred | None:
        if finished.called:
            return None
        interrupted.callback(None)
        cap = reactor.callLater(STOP_WAIT_S, lambda: finished.called or finished.callback(None))
        finished.addBoth(lambda r: cap.cancel() if cap.active() else None)
        return finished

    reactor.addSystemEventTrigger("before", "shutdown", stopping)
    return interrupted, finished


def _react(args: argparse.Namespace) -> int:
    from twisted.internet import task

    from pie.client import ConnectionClosed, RequestFailed

    status = [2]

    async def body(reactor: Any) -> None:
        # only a server is stopped on Ctrl-C; a plain run ends with its connection, as before
        serving = args.command == "run" and args.server is not None
        interrupted, finished = _on_stop(reactor) if serving else (None, Deferred())
        try:
            if args.command == "run":
                status[0] = await run_program(args, reactor, sys.stdout, sys.stderr, interrupted)
            else:
                status[0] = await query_command(args, reactor, sys.stdout)
        except (CliError, RequestFailed, ConnectionClosed) as e:
            print(f"pie {args.command}: {e}", file=sys.stderr)
        finally:
            finished.callback(None)

    try:
        task.react(lambda reactor: Deferred.fromCoroutine(body(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            return int(e.code)
    return status[0]


if __name__ == "__main__":
    sys.exit(main())
