"""`gateway serve`: run the gateway until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Any, Literal, get_args, get_origin

from gateway.auth import ENV_TOKENS, AdminTokens
from gateway.cli.output import fail
from gateway.cli.workers import follow_supervisor, supervise
from gateway.errors import GatewayError
from gateway.logs import configure_logging
from gateway.routing import format_traffic
from gateway.settings import ENV_PREFIX, GatewaySettings, setting_flags

log = logging.getLogger("gateway")


def register(commands: Any) -> None:
    """Add the `serve` subcommand; its flags are made from `GatewaySettings` (one place for every setting)."""
    serve = commands.add_parser(
        "serve",
        help="serve the models of a route file over gRPC",
        description=(
            "Serve the models of a route file over gRPC. Every setting is a flag, an environment variable "
            f"({ENV_PREFIX}NAME) or a key of the route file's server: section, in that order of precedence."
        ),
    )
    for flag, dotted, info in setting_flags():
        default = info.get_default(call_default_factory=True)
        env = ENV_PREFIX + dotted.upper().replace(".", "__")
        shown = "" if default in (None, "") else f"; default {default}"
        kwargs: dict[str, Any] = {"dest": _dest(dotted), "default": None, "metavar": "VALUE"}
        choices = get_args(info.annotation) if get_origin(info.annotation) is Literal else ()
        if choices:
            kwargs.update(choices=choices, metavar=None)
        serve.add_argument(flag, help=f"{info.description} (${env}{shown})", **kwargs)
    serve.set_defaults(handler=run)


def _flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (nested for shadow.*); unset flags leave lower sources in charge."""
    values: dict[str, Any] = {}
    for _flag, dotted, _info in setting_flags():
        value = getattr(args, _dest(dotted), None)
        if value is None:
            continue
        target = values
        *parents, leaf = dotted.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    for name in ("log_level", "log_format"):  # `gateway --log-level ... serve` works too
        if name not in values and getattr(args, name, None):
            values[name] = getattr(args, name)
    return values


def _dest(dotted: str) -> str:
    # Apart from the top-level namespace: `gateway --log-level` and `serve --log-level` must not collide.
    return "setting__" + dotted.replace(".", "__")


async def _serve(settings: GatewaySettings) -> int:
    # Imported here, not at the top: every other `gateway` command starts without the serving stack.
    from gateway.app import Gateway
    from gateway.grpc.fleet import start_fleet
    from gateway.grpc.server import start_admin_server, start_inference_server
    from gateway.grpc.tls import ServerTls
    from gateway.state import open_store
    from gateway.telemetry.setup import TelemetrySettings, build_telemetry

    tokens = AdminTokens.load(settings.admin_tokens_file, settings.admin_tokens.get_secret_value())
    tls = ServerTls.from_settings(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    runtime = build_telemetry(TelemetrySettings.of(settings))
    store = open_store(settings.store)
    gateway = fleet = inference = None
    try:
        gateway = Gateway.from_file(settings.config, store, settings=settings, telemetry=runtime.telemetry)
        revision = await asyncio.to_thread(gateway.start)
        fleet = await start_fleet(gateway, settings.fleet_listen, settings.fleet_advertise, tls)
        gateway.guardian.start()
        gateway.follower.start()
        inference = await start_inference_server(gateway, settings.listen, tokens, tls)
        admin = await start_admin_server(gateway, settings.admin_listen, tokens, tls, peers=fleet.peers)
    except BaseException:  # stop what started, in reverse order, so a failed start leaves nothing running
        if inference is not None:
            await inference.stop(grace=0)
        if fleet is not None:
            await fleet.stop(grace=0)
        if gateway is not None:
            gateway.close()  # the follower, guardian, fleet membership and shadow workers, and the store
        else:
            store.close()
        runtime.shutdown()
        raise
    if not tokens.names:
        log.warning("no admin tokens configured (%s or --admin-tokens-file): admin calls will be refused", ENV_TOKENS)
    host = settings.listen.rsplit(":", 1)[0]
    admin_host = settings.admin_listen.rsplit(":", 1)[0]
    summary = "; ".join(
        f"{name} {format_traffic(routes.weights)}" for name, routes in gateway.router.table.endpoints.items()
    )
    metrics = (
        f", metrics on {settings.metrics_listen.rsplit(':', 1)[0]}:{runtime.metrics_port}" if runtime.prometheus else ""
    )
    print(
        f"gateway ready: inference on {host}:{inference.port}, admin on {admin_host}:{admin.port}{metrics} "
        f"(revision {revision}; {summary}){'; TLS' if tls else ''}",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if tls is not None:
        loop.add_signal_handler(signal.SIGHUP, tls.request_reload)  # open connections keep their session
    await stop.wait()
    log.info("shutting down")
    await fleet.stop()  # another process leads at once
    await asyncio.gather(inference.stop(grace=settings.grace), admin.stop(grace=settings.grace))
    gateway.close()
    runtime.shutdown()
    return 0


def run(args: argparse.Namespace) -> int:
    """Start the gateway (or `--workers` of them) and serve until SIGINT/SIGTERM."""
    try:
        settings = GatewaySettings.load(_flag_values(args))
        configure_logging(settings.log_level, settings.log_format)
        if settings.workers > 1:
            return supervise(args, settings)
        follow_supervisor()
        return asyncio.run(_serve(settings))
    except GatewayError as err:
        return fail(err.message, 2)
