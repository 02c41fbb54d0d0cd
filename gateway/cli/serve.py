"""`gateway serve`: run the gateway until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path
from typing import Any

from gateway.app import Gateway, ServerLimits
from gateway.auth import ENV_TOKENS, AdminTokens
from gateway.cli.output import fail
from gateway.errors import GatewayError, InvalidInput
from gateway.guardrails.rules import parse_duration
from gateway.routing import format_traffic
from gateway.shadow.runner import ShadowSettings
from gateway.state import DEFAULT_STORE_URL, open_store
from gateway.telemetry.setup import TelemetrySettings, build_telemetry
from gateway.telemetry.tracing import Sampler

log = logging.getLogger("gateway")

DEFAULT_CONFIG = "models/gateway.yaml"
DEFAULT_LISTEN = "127.0.0.1:8001"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:8002"


def register(commands: Any) -> None:
    """Add the `serve` subcommand."""
    serve = commands.add_parser("serve", help="serve the models of a route file over gRPC")
    serve.add_argument("--config", default=DEFAULT_CONFIG, help=f"route file (default {DEFAULT_CONFIG})")
    serve.add_argument("--listen", default=DEFAULT_LISTEN, help="HOST:PORT for inference; port 0 picks one")
    serve.add_argument(
        "--admin-listen", default=DEFAULT_ADMIN_LISTEN, help="HOST:PORT for the admin API (default loopback)"
    )
    serve.add_argument(
        "--admin-tokens-file",
        type=Path,
        help=f"NAME=TOKEN lines for admin callers (default: ${ENV_TOKENS}, comma-separated)",
    )
    serve.add_argument(
        "--store",
        default=DEFAULT_STORE_URL,
        help="state store: sqlite:///relative/path.db or sqlite:////absolute/path.db (default %(default)s)",
    )
    serve.add_argument(
        "--metrics-listen",
        default="",
        help="HOST:PORT for the Prometheus /metrics endpoint (off when not set)",
    )
    serve.add_argument(
        "--otlp-endpoint",
        default="",
        help="OTLP/gRPC collector for traces and metrics (default $OTEL_EXPORTER_OTLP_ENDPOINT; else off)",
    )
    serve.add_argument(
        "--trace-sample",
        type=float,
        default=None,
        help="share of requests traced, 0..1 (default: $OTEL_TRACES_SAMPLER[_ARG], else 1.0)",
    )
    serve.add_argument("--shadow-workers", type=int, default=1, help="threads that run shadow copies (default 1)")
    serve.add_argument(
        "--shadow-queue",
        type=int,
        default=1024,
        help="shadow copies waiting at most; more are dropped and counted",
    )
    serve.add_argument(
        "--shadow-log-dir",
        default="var/shadow",
        help="shadow diff log directory (JSON lines, rotated); empty turns it off (default %(default)s)",
    )
    serve.add_argument(
        "--shadow-cpu-share",
        type=float,
        default=0.1,
        help="most CPU per shadow worker (share of a core); past it copies wait or are shed (default 0.1)",
    )
    serve.add_argument("--shadow-log-max-bytes", type=int, default=10 * 1024 * 1024, help="rotate the diff log here")
    serve.add_argument(
        "--shadow-keep-divergent",
        type=int,
        default=0,
        help="keep the inputs of the N most divergent shadowed requests (.npz, for replay; default off)",
    )
    serve.add_argument(
        "--guardian-tick", type=float, default=1.0, help="seconds between guardrail evaluations (default 1)"
    )
    serve.add_argument(
        "--window-history",
        default="30m",
        help="how far back the guardrail windows reach; a rule's window may not be longer (default %(default)s)",
    )
    serve.add_argument("--max-message-bytes", type=int, default=4 * 1024 * 1024)
    serve.add_argument("--grace", type=float, default=5.0, help="seconds to finish in-flight calls on stop")
    serve.set_defaults(handler=run)


async def _serve(args: argparse.Namespace) -> int:
    from gateway.grpc.server import start_admin_server, start_inference_server

    tokens = AdminTokens.load(args.admin_tokens_file)
    try:
        history = parse_duration(args.window_history, bare_seconds=True)
    except InvalidInput as err:
        raise InvalidInput(f"--window-history: {err.message}") from None
    sampler = Sampler(ratio=args.trace_sample) if args.trace_sample is not None else None
    runtime = build_telemetry(
        TelemetrySettings(
            metrics_listen=args.metrics_listen,
            otlp_endpoint=args.otlp_endpoint,
            window_horizon_seconds=history,
            sampler=sampler,
        )
    )
    store = open_store(args.store)
    try:
        gateway = Gateway.from_file(
            Path(args.config),
            store,
            limits=ServerLimits(args.max_message_bytes),
            telemetry=runtime.telemetry,
            shadow_settings=ShadowSettings(
                queue_size=args.shadow_queue,
                workers=args.shadow_workers,
                log_dir=Path(args.shadow_log_dir) if args.shadow_log_dir else None,
                log_max_bytes=args.shadow_log_max_bytes,
                keep_divergent=args.shadow_keep_divergent,
                max_cpu_share=args.shadow_cpu_share,
            ),
        )
        revision = await asyncio.to_thread(gateway.start)
        gateway.guardian.tick_seconds = args.guardian_tick
        gateway.guardian.start()
        inference = await start_inference_server(gateway, args.listen)
        admin = await start_admin_server(gateway, args.admin_listen, tokens)
    except BaseException:
        store.close()
        runtime.shutdown()
        raise
    if not tokens.names:
        log.warning("no admin tokens configured (%s or --admin-tokens-file): admin calls will be refused", ENV_TOKENS)
    host = args.listen.rsplit(":", 1)[0]
    admin_host = args.admin_listen.rsplit(":", 1)[0]
    summary = "; ".join(
        f"{name} {format_traffic(routes.weights)}" for name, routes in gateway.router.table.endpoints.items()
    )
    metrics = (
        f", metrics on {args.metrics_listen.rsplit(':', 1)[0]}:{runtime.metrics_port}" if runtime.prometheus else ""
    )
    print(
        f"gateway ready: inference on {host}:{inference.port}, admin on {admin_host}:{admin.port}{metrics} "
        f"(revision {revision}; {summary})",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await asyncio.gather(inference.stop(grace=args.grace), admin.stop(grace=args.grace))
    gateway.close()
    runtime.shutdown()
    return 0


def run(args: argparse.Namespace) -> int:
    """Start the gateway and serve until SIGINT/SIGTERM."""
    try:
        return asyncio.run(_serve(args))
    except GatewayError as err:
        return fail(err.message, 2)
