"""`gateway` command line: parsing and printing only; the work happens in the core.

gateway serve ...                 run the gateway
gateway predict ...               one prediction
gateway admin ...                 change and inspect routes (authenticated)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from gateway import __version__
from gateway.cli import admin, batch, gameday, predict, report, rollout, serve


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="gateway", description="A gRPC model gateway for safe ML releases.")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.register(commands)
    predict.register(commands)
    admin.register(commands)
    report.register(commands)
    rollout.register(commands)
    gameday.register(commands)
    batch.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gateway` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    code: int = args.handler(args)
    return code
