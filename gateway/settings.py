"""`GatewaySettings`: every setting of a `gateway serve` process, typed, in one object.

Where a value comes from, highest first:

1. a command-line flag (`gateway serve --guardian-tick 2`);
2. an environment variable: `GATEWAY_` + the field name in capitals (`GATEWAY_GUARDIAN_TICK=2`;
   nested shadow settings as `GATEWAY_SHADOW__WORKERS=2`), and for the OpenTelemetry settings
   also their standard names (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_TRACES_SAMPLER[_ARG]`,
   `OTEL_TRACES_EXPORTER`, `OTEL_METRICS_EXPORTER`);
3. the route file's `server:` section (same field names);
4. the defaults below.

Each field's docstring is its documentation: `gateway serve --help` shows it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gateway.errors import ConfigError, InvalidInput
from gateway.guardrails.rules import parse_duration

#: Where `gateway serve` and the batch tools keep state unless told otherwise.
DEFAULT_STORE_URL = "sqlite:///var/gateway.db"
DEFAULT_ROUTE_FILE = Path("models/gateway.yaml")
ENV_PREFIX = "GATEWAY_"


def _duration(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return parse_duration(value, bare_seconds=True)
    except InvalidInput as err:
        raise ValueError(err.message) from None


def _optional_path(value: Any) -> Any:
    return None if value == "" else value


Seconds = Annotated[int, BeforeValidator(_duration)]


def _compression(value: Any) -> Any:
    """OpenTelemetry's spelling: any case, and empty for none."""
    return (value.strip().lower() or "none") if isinstance(value, str) else value


class ShadowSettings(BaseModel):
    """How shadow copies run: workers, their queue, their CPU budget and the diff log."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    workers: int = Field(default=1, ge=1, le=64)
    """Threads that run shadow copies."""
    queue_size: int = Field(default=1024, ge=1, json_schema_extra={"flag": "--shadow-queue"})
    """Shadow copies waiting at most; more are dropped and counted."""
    log_dir: Annotated[Path | None, BeforeValidator(_optional_path)] = Path("var/shadow")
    """Shadow diff log directory (JSON lines, rotated); empty turns it off."""
    log_max_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    """Rotate the diff log at this size."""
    log_backups: int = Field(default=3, ge=0, le=100)
    """Rotated diff log files kept."""
    keep_divergent: int = Field(default=0, ge=0)
    """Keep the inputs of the N most divergent shadowed requests (.npz, for replay); 0 is off."""
    keep_divergent_max_bytes: int = Field(default=50 * 1024 * 1024, ge=0)
    """Most bytes of kept divergent inputs."""
    max_cpu_share: float = Field(default=0.1, ge=0, le=1, json_schema_extra={"flag": "--shadow-cpu-share"})
    """Most CPU per shadow worker (share of a core); past it copies wait or are shed; 0 is no limit."""
    records: int = Field(default=100_000, ge=1, json_schema_extra={"flag": None})
    """Comparison records kept in memory for reports."""
    batch_size: int = Field(default=64, ge=1, json_schema_extra={"flag": None})
    """Copies run as one onnxruntime batch when they queue up together."""
    poll_seconds: float = Field(default=0.005, gt=0, le=1, json_schema_extra={"flag": None})
    """How often idle workers look for queued copies (the longest a copy waits when idle)."""


class GatewaySettings(BaseSettings):
    """Settings of one gateway process: listeners, store, telemetry, guardian, shadow, limits, logs."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        populate_by_name=True,
    )

    config: Path = DEFAULT_ROUTE_FILE
    """Route file: endpoints, versions, traffic; it seeds an empty store (then the store is the truth)."""
    listen: str = "127.0.0.1:8001"
    """HOST:PORT for inference (Predict, Open Inference Protocol, health, reflection); port 0 picks one."""
    admin_listen: str = "127.0.0.1:8002"
    """HOST:PORT for the admin API (loopback by default)."""
    admin_tokens: SecretStr = Field(default=SecretStr(""), json_schema_extra={"flag": None})
    """Admin callers as NAME=TOKEN,NAME=TOKEN (environment only: GATEWAY_ADMIN_TOKENS; never a flag)."""
    admin_tokens_file: Annotated[Path | None, BeforeValidator(_optional_path)] = None
    """File of NAME=TOKEN lines for admin callers (instead of GATEWAY_ADMIN_TOKENS)."""
    tls_cert: Annotated[Path | None, BeforeValidator(_optional_path)] = None
    """PEM certificate (chain) of both listeners; with tls_key, they serve TLS only. Reloaded on SIGHUP."""
    tls_key: Annotated[Path | None, BeforeValidator(_optional_path)] = None
    """PEM private key of tls_cert (keep it readable by the gateway only)."""
    tls_client_ca: Annotated[Path | None, BeforeValidator(_optional_path)] = None
    """PEM CA certificate(s): clients must show a certificate it signed (mutual TLS); admin still needs a token."""
    store: str = DEFAULT_STORE_URL
    """State store: sqlite:///relative/path.db, sqlite:////absolute/path.db, or etcd://HOST:PORT[,...][/prefix]."""
    metrics_listen: str = ""
    """HOST:PORT for the Prometheus /metrics endpoint; off when empty."""
    otlp_endpoint: str = Field(
        default="",
        validation_alias=AliasChoices("otlp_endpoint", "GATEWAY_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"),
    )
    """OTLP/gRPC collector for traces and metrics (also OTEL_EXPORTER_OTLP_ENDPOINT); off when empty."""
    traces_exporter: Literal["otlp", "none"] = Field(
        default="otlp",
        validation_alias=AliasChoices("traces_exporter", "GATEWAY_TRACES_EXPORTER", "OTEL_TRACES_EXPORTER"),
        json_schema_extra={"flag": None},
    )
    """`none` turns trace export off while an OTLP endpoint is set (OTEL_TRACES_EXPORTER)."""
    metrics_exporter: Literal["otlp", "none"] = Field(
        default="otlp",
        validation_alias=AliasChoices("metrics_exporter", "GATEWAY_METRICS_EXPORTER", "OTEL_METRICS_EXPORTER"),
        json_schema_extra={"flag": None},
    )
    """`none` turns OTLP metric export off while an OTLP endpoint is set (OTEL_METRICS_EXPORTER)."""
    otlp_headers: SecretStr = Field(
        default=SecretStr(""),
        validation_alias=AliasChoices(
            "otlp_headers", "GATEWAY_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"
        ),
        json_schema_extra={"flag": None},
    )
    """Headers on every OTLP export, KEY=VALUE,KEY=VALUE (environment only: they often carry credentials)."""
    otlp_certificate: Annotated[Path | None, BeforeValidator(_optional_path)] = Field(
        default=None,
        validation_alias=AliasChoices(
            "otlp_certificate",
            "GATEWAY_OTLP_CERTIFICATE",
            "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
            "OTEL_EXPORTER_OTLP_CERTIFICATE",
        ),
    )
    """PEM CA certificate(s) an https:// collector is checked against; unset: the system's roots."""
    otlp_timeout_ms: int = Field(
        default=10_000,
        ge=1,
        le=600_000,
        validation_alias=AliasChoices(
            "otlp_timeout_ms",
            "GATEWAY_OTLP_TIMEOUT_MS",
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        ),
    )
    """Milliseconds one OTLP export may take (OTEL_EXPORTER_OTLP_TIMEOUT)."""
    otlp_compression: Annotated[Literal["none", "gzip"], BeforeValidator(_compression)] = Field(
        default="none",
        validation_alias=AliasChoices(
            "otlp_compression",
            "GATEWAY_OTLP_COMPRESSION",
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
            "OTEL_EXPORTER_OTLP_COMPRESSION",
        ),
    )
    """`gzip` compresses OTLP exports (OTEL_EXPORTER_OTLP_COMPRESSION)."""
    trace_sampler: str = Field(
        default="parentbased_always_on",
        validation_alias=AliasChoices("trace_sampler", "GATEWAY_TRACE_SAMPLER", "OTEL_TRACES_SAMPLER"),
        json_schema_extra={"flag": None},
    )
    """always_on, always_off, traceidratio, or parentbased_ + one of them (OTEL_TRACES_SAMPLER)."""
    trace_sample: float | None = Field(
        default=None,
        ge=0,
        le=1,
        validation_alias=AliasChoices("trace_sample", "GATEWAY_TRACE_SAMPLE", "OTEL_TRACES_SAMPLER_ARG"),
    )
    """Share of requests traced, 0..1 (OTEL_TRACES_SAMPLER_ARG); unset traces every request."""
    guardian_tick: float = Field(default=1.0, gt=0, le=3600)
    """Seconds between guardrail evaluations."""
    window_history: Seconds = Field(default=1800, ge=60, le=7 * 86400)
    """How far back the guardrail windows reach (30m, 2h, or seconds); a rule's window may not be longer."""
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=1 << 31)
    """Largest request or response message on every listener; larger ones get RESOURCE_EXHAUSTED."""
    server_name: str = Field(default="model-gateway", min_length=1, max_length=64)
    """Name in the Open Inference Protocol's ServerMetadata; `triton` for clients that check for Triton."""
    max_model_bytes: int = Field(default=2 << 30, ge=1024, le=1 << 40)
    """Largest model file loaded; a larger one is refused from its size, before it is read (RESOURCE_EXHAUSTED)."""
    max_concurrent_per_version: int = Field(default=64, ge=1, le=100_000)
    """Requests in flight per model version; more are shed with RESOURCE_EXHAUSTED and a retry hint."""
    default_deadline: float = Field(default=30.0, gt=0, le=3600)
    """Seconds a request may take when neither its caller nor its endpoint (deadline_ms) sets a shorter deadline."""
    grace: float = Field(default=5.0, ge=0, le=3600)
    """Seconds to finish in-flight calls on SIGTERM/SIGINT before the process exits."""
    workers: int = Field(default=1, ge=1, le=256)
    """Gateway processes sharing the listen addresses and the store, e.g. one per core."""
    runner_threads: int = Field(default=0, ge=0, le=256)
    """Threads per process that run costly model calls off the event loop; 0: the cores over the workers."""
    inline_run_max_us: float = Field(default=200.0, ge=0, le=1_000_000)
    """Model runs measured to cost more than this (microseconds) leave the event loop for the runner threads."""
    reuse_port: bool = False
    """Share the listen ports with other gateway processes (SO_REUSEPORT); --workers sets it for its workers."""
    fleet_listen: str = "127.0.0.1:0"
    """HOST:PORT the other processes of this gateway reach this one on (the guardian leader pulls its counts)."""
    fleet_advertise: str = ""
    """Host others reach this process at (a pod IP); empty: --fleet-listen's host (this machine's name for 0.0.0.0)."""
    fleet_lease: Seconds = Field(default=10, ge=2, le=600)
    """Seconds a process stays a fleet member unrenewed; a dead guardian leader is replaced within about this."""
    fleet_tls_ca: Annotated[Path | None, BeforeValidator(_optional_path)] = None
    """PEM CA certificate(s) the other processes' tls_cert is checked against (with TLS on); unset: default roots."""
    fleet_tls_server_name: str = ""
    """Name expected in the other processes' certificates when it is not the host they advertise."""
    log_format: Literal["text", "json"] = "text"
    """`json`: one JSON object per log line, for log shippers."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Lowest level logged."""
    shadow: ShadowSettings = Field(default_factory=ShadowSettings)
    """Shadow runner settings (flags --shadow-*, environment GATEWAY_SHADOW__*)."""

    @field_validator("guardian_tick", "grace", "default_deadline")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number of seconds")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags (passed as init values), then the environment, then the route file's `server:` section."""
        return init_settings, env_settings, RouteFileSettings(settings_cls)

    @classmethod
    def plain(cls, **values: Any) -> GatewaySettings:
        """Defaults and `values` only: no environment, no route file (embedding, tests)."""
        return cls.model_validate(values)

    @classmethod
    def load(cls, flags: dict[str, Any] | None = None) -> GatewaySettings:
        """Settings from flags, environment and route file; ConfigError names what is wrong."""
        from pydantic import ValidationError

        try:
            return cls(**(flags or {}))
        except ValidationError as err:
            problems = []
            for problem in err.errors():
                where = ".".join(str(part) for part in problem["loc"])
                flag = next((f for f, dotted, _ in setting_flags() if dotted == where), "")
                sources = [flag] if flag else []
                sources += [f"${ENV_PREFIX}{where.upper().replace('.', '__')}", f"server.{where} in the route file"]
                message = str(problem["msg"]).removeprefix("Value error, ")
                problems.append(f"setting {where} ({', '.join(sources)}): {message}")
            raise ConfigError("; ".join(problems)) from None


class RouteFileSettings(PydanticBaseSettingsSource):
    """The `server:` section of the route file the higher-priority sources name (or the default one)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """Unused: `__call__` reads the whole section at once."""
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        """The section's values (empty when the file or section is missing; the route file loader reports those)."""
        path = Path(self.current_state.get("config") or DEFAULT_ROUTE_FILE)
        try:
            document = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            return {}
        section = document.get("server") if isinstance(document, dict) else None
        if section is None:
            return {}
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: server: must be a mapping of settings (see `gateway serve --help`)")
        return section


def setting_flags() -> list[tuple[str, str, FieldInfo]]:
    """(flag, dotted field name, field) for every setting that has a command-line flag."""
    flags = []
    for name, info in GatewaySettings.model_fields.items():
        if name == "shadow":
            for sub, sub_info in ShadowSettings.model_fields.items():
                flag = _flag_of(sub_info, f"--shadow-{sub.replace('_', '-')}")
                if flag:
                    flags.append((flag, f"shadow.{sub}", sub_info))
            continue
        flag = _flag_of(info, f"--{name.replace('_', '-')}")
        if flag:
            flags.append((flag, name, info))
    return flags


def _flag_of(info: FieldInfo, default: str) -> str:
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    flag = extra.get("flag", default)
    return str(flag) if flag else ""
