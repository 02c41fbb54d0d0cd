"""`gateway admin batching` and `gateway admin runner`: how an endpoint's requests are executed.

Registered under `gateway admin` (which owns the connection, the mutation dispatch and the
output); kept apart so the routing commands stay in one screenful.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from gateway.config import RUNNER_MODES
from gateway.pb.gateway.v1 import admin_pb2 as pb


def register(sub: Any, common: argparse.ArgumentParser, mutating: argparse.ArgumentParser) -> None:
    """Add `batching` and `runner` to the admin subcommands."""
    batching = sub.add_parser(
        "batching", parents=[common, mutating], help="merge concurrent requests into one model run (or --off)"
    )
    batching.add_argument("endpoint", help="the endpoint whose requests are merged")
    batching.add_argument("--max-batch-size", type=int, help="rows of one merged run at most")
    batching.add_argument("--max-delay-ms", type=float, help="longest a request waits for batch-mates")
    batching.add_argument("--preferred", type=int, nargs="+", metavar="N", help="row counts to dispatch at at once")
    batching.add_argument("--off", action="store_true", help="turn batching off")
    runner = sub.add_parser("runner", parents=[common, mutating], help="where model runs happen: auto, inline or pool")
    runner.add_argument("endpoint", help="the endpoint whose model runs move")
    runner.add_argument(
        "runner",
        choices=RUNNER_MODES,
        help="auto: by the cost measured at load; inline: on the event loop; pool: threads",
    )


def mutations(args: argparse.Namespace, common: dict[str, Any]) -> dict[str, Callable[[], tuple[str, Any]]]:
    """The RPC and request of each of these subcommands."""
    return {
        "batching": lambda: (
            "SetBatching",
            pb.SetBatchingRequest(
                endpoint=args.endpoint,
                off=args.off,
                batching=None
                if args.off
                else pb.Batching(
                    max_batch_size=args.max_batch_size,
                    max_delay_ms=args.max_delay_ms,
                    preferred_batch_sizes=args.preferred or [],
                ),
                **common,
            ),
        ),
        "runner": lambda: ("SetRunner", pb.SetRunnerRequest(endpoint=args.endpoint, runner=args.runner, **common)),
    }


def usage_problem(args: argparse.Namespace) -> str:
    """What is missing from a `batching` command line (empty when nothing)."""
    if args.admin_command != "batching":
        return ""
    if not args.off and (args.max_batch_size is None or args.max_delay_ms is None):
        return "give --max-batch-size N and --max-delay-ms MS (and optionally --preferred N ...), or --off"
    if args.off and (args.max_batch_size or args.max_delay_ms or args.preferred):
        return "--off turns batching off: give no other batching option"
    return ""


def to_json(endpoint: pb.EndpointRoutes) -> dict[str, Any]:
    """An endpoint's execution settings, for `gateway admin routes --json`."""
    batching = None
    if endpoint.HasField("batching"):
        batching = {
            "max_batch_size": endpoint.batching.max_batch_size,
            "max_delay_ms": endpoint.batching.max_delay_ms,
            "preferred_batch_sizes": list(endpoint.batching.preferred_batch_sizes),
        }
    return {"batching": batching, "runner": endpoint.runner}


def lines(name: str, settings: dict[str, Any]) -> list[str]:
    """`batching ranker-xl: max_batch_size 32, max_delay_ms 2` (and the runner when not auto)."""
    out = []
    batching = settings["batching"]
    if batching:
        preferred = "/".join(map(str, batching["preferred_batch_sizes"]))
        out.append(
            f"batching {name}: max_batch_size {batching['max_batch_size']}, max_delay_ms {batching['max_delay_ms']:g}"
            + (f", preferred {preferred}" if preferred else "")
        )
    if settings["runner"] not in ("", "auto"):
        out.append(f"runner {name}: {settings['runner']}")
    return out
