"""`gateway` command line: parsing and printing only; the work happens in the core.

`gateway COMMAND --help` shows each command's options; `build_parser` registers them all.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from gateway import __version__
from gateway.cli import admin, batch, gameday, predict, report, rollout, runbook, serve
from gateway.cli.output import fail
from gateway.errors import GatewayError
from gateway.logs import configure_logging


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="gateway", description="A gRPC model gateway for safe ML releases.")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    parser.add_argument(
        "--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="lowest level logged (default INFO)"
    )
    parser.add_argument(
        "--log-format", choices=["text", "json"], help="text (default) or one JSON object per line, for log shippers"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.register(commands)
    predict.register(commands)
    admin.register(commands)
    report.register(commands)
    rollout.register(commands)
    runbook.register(commands)
    gameday.register(commands)
    batch.register(commands)
    return parser


#: The exit status of a command whose reader went away (a shell reports SIGPIPE as 128 + 13).
CLOSED_PIPE = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gateway` console script."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `serve --workers N` passes them on to its workers
    configure_logging(args.log_level or "INFO", args.log_format or "text")
    try:
        code: int = args.handler(args)
        sys.stdout.flush()
    except GatewayError as err:  # a bad option found late (an unreadable --tls-ca file): one line, no traceback
        return fail(err.message, 2)
    except BrokenPipeError:
        # `gateway ... | head`: the reader has what it wanted. Quietly, as `git log | head` does:
        # point stdout at /dev/null so the interpreter's final flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return CLOSED_PIPE
    return code
