"""The YAML route file: typed, validated, with errors that name the field and what is valid.

    model_root: .            # relative to this file; holds <endpoint>/<version>/
    endpoints:
      ctr-ranker:
        versions: ["1.12", "1.13", "1.14"]   # loaded side by side
        traffic: {"1.12": 90, "1.13": 10}     # integer percent, sums to 100
        labels: {stable: "1.12", canary: "1.13"}
        max_batch_size: 256
        nan_policy: allow                     # allow | reject
        batching: {max_batch_size: 32, max_delay_ms: 2}   # merge concurrent requests (off when absent)
        runner: auto                          # auto | inline | pool: where model runs happen

Versions are strings. YAML reads `1.10` as the number 1.1, so this loader keeps every
unquoted decimal as the text that was written (`1.10` stays "1.10").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from gateway.errors import ConfigError, InvalidInput
from gateway.guardrails.rules import RuleSet, parse_rule
from gateway.limits import MAX_DOCUMENT_BYTES, MAX_DOCUMENT_DEPTH


class _TextDecimalLoader(yaml.SafeLoader):
    """SafeLoader without the float resolver: `1.10` stays the string "1.10"."""


_TextDecimalLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class ShadowCompareConfig(BaseModel):
    """How shadow outputs are compared: the score threshold for decisions, top-k for classes.

    The one type for these settings: the route file, the desired state and the comparison all use it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    threshold: float = 0.5
    top_k: StrictInt = Field(default=0, ge=0, le=1000)


class BatchingConfig(BaseModel):
    """Adaptive batching of one endpoint: concurrent requests to one version merged into one run.

    A request to an idle version runs at once; requests that arrive while it is busy form a
    batch, dispatched when its rows reach `max_batch_size` or one of `preferred_batch_sizes`,
    or when its oldest request has waited `max_delay_ms`. The one type for these settings: the
    route file, the desired state, the admin API and the data plane all use it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    max_batch_size: StrictInt = Field(ge=1, le=1 << 16)
    max_delay_ms: float = Field(ge=0, le=10_000)
    preferred_batch_sizes: tuple[StrictInt, ...] = ()

    @field_validator("preferred_batch_sizes")
    @classmethod
    def _preferred_fit(cls, sizes: tuple[int, ...], info: ValidationInfo) -> tuple[int, ...]:
        largest = info.data.get("max_batch_size")
        if largest is not None and any(not 1 <= size <= largest for size in sizes):
            raise ValueError(f"{list(sizes)}: each must be between 1 and max_batch_size {largest}")
        if list(sizes) != sorted(set(sizes)):
            raise ValueError(f"{list(sizes)}: list each size once, in increasing order")
        return sizes

    def describe(self) -> str:
        """`max_batch_size 32, max_delay_ms 2, preferred 8/16` for logs and messages."""
        sizes = self.preferred_batch_sizes
        preferred = f", preferred {'/'.join(map(str, sizes))}" if sizes else ""
        return f"max_batch_size {self.max_batch_size}, max_delay_ms {self.max_delay_ms:g}{preferred}"

    @classmethod
    def checked(cls, source: str, **fields: object) -> BatchingConfig:
        """Settings from an API call, validated as the route file is (ConfigError names the field)."""
        try:
            return cls.model_validate(fields)
        except ValidationError as err:
            raise ConfigError(_format_validation_error(err, source)) from None


#: Where an endpoint's model runs happen: decided by the measured cost, or always one way.
RunnerMode = Literal["auto", "inline", "pool"]
RUNNER_MODES: tuple[str, ...] = ("auto", "inline", "pool")


class GuardrailsConfig(BaseModel):
    """Guardrail rules and how they combine (a plain list means: any one rule)."""

    model_config = ConfigDict(extra="forbid")

    rules: list[str] = Field(default_factory=list)
    at_least: StrictInt = Field(default=1, ge=1)
    observe_only: StrictBool = False


class BatchGatesConfig(BaseModel):
    """Validation gates for batch runs of this endpoint (see `gateway batch validate`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    ks_max: float = Field(default=0.1, gt=0, le=1)
    #: With `mean_shift: relative` (the default) a share of the published run's mean score
    #: (0.05: the mean may move by 5%); with `absolute`, in the score's own units.
    mean_shift_max: float = Field(default=0.05, gt=0)
    mean_shift: Literal["relative", "absolute"] = "relative"
    input_null_rate_max: float | None = Field(default=None, ge=0, le=1)

    def overridden(self, source: str, **changes: float) -> BatchGatesConfig:
        """These gates with `changes`, validated as the route file is (ConfigError names the field)."""
        try:
            return BatchGatesConfig.model_validate({**self.model_dump(), **changes})
        except ValidationError as err:
            raise ConfigError(_format_validation_error(err, source)) from None


class EndpointConfig(BaseModel):
    """One endpoint in the route file."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    # Strict integers: YAML `true` is not a weight of 1, and `1.5` is not 1.
    versions: list[str] = Field(min_length=1)
    traffic: dict[str, StrictInt]
    labels: dict[str, str] = Field(default_factory=dict)
    max_batch_size: StrictInt = Field(default=256, ge=1, le=1 << 20)
    nan_policy: Literal["allow", "reject"] = "allow"
    intra_op_threads: StrictInt = Field(default=1, ge=1, le=64)
    shadows: dict[str, StrictInt] = Field(default_factory=dict)
    shadow_compare: ShadowCompareConfig = Field(default_factory=ShadowCompareConfig)
    guardrails: GuardrailsConfig | list[str] = Field(default_factory=list)
    batch_gates: BatchGatesConfig = Field(default_factory=BatchGatesConfig)
    #: Reference inputs that place the drift rules' bins, relative to the model root: a `.npy`
    #: of rows [rows, features] in the model's feature order, or a `.npz` with `features` (and
    #: optionally `scores`). Without it the bins are learnt from stable's first served rows.
    drift_reference: str | None = None

    @field_validator("drift_reference")
    @classmethod
    def _reference(cls, value: str | None) -> str | None:
        if value is not None and not value.endswith((".npy", ".npz")):
            raise ValueError(
                f"{value!r} must be a .npy file of reference rows or a .npz with 'features' (and 'scores')"
            )
        return value

    #: Default deadline of this endpoint's requests (a caller's shorter deadline wins).
    deadline_ms: StrictInt | None = Field(default=None, ge=1, le=3_600_000)
    batching: BatchingConfig | None = None
    runner: RunnerMode = "auto"

    @field_validator("versions")
    @classmethod
    def _unique(cls, versions: list[str]) -> list[str]:
        duplicates = sorted({v for v in versions if versions.count(v) > 1})
        if duplicates:
            raise ValueError(f"versions are listed twice: {', '.join(duplicates)}")
        return versions

    def rule_set(self) -> RuleSet:
        """The endpoint's guardrails, parsed."""
        guardrails = self.guardrails
        if isinstance(guardrails, list):
            return RuleSet.parse(guardrails)
        return RuleSet.parse(guardrails.rules, guardrails.at_least, guardrails.observe_only)

    @field_validator("guardrails")
    @classmethod
    def _rules_parse(cls, value: GuardrailsConfig | list[str]) -> GuardrailsConfig | list[str]:
        lines = value if isinstance(value, list) else value.rules
        for index, line in enumerate(lines):
            try:
                parse_rule(line)
            except InvalidInput as err:
                raise ValueError(f"rule {index + 1}: {err.message}") from None
        if isinstance(value, GuardrailsConfig) and value.rules and not 1 <= value.at_least <= len(value.rules):
            raise ValueError(f"at_least {value.at_least} must be between 1 and {len(value.rules)} (the rules)")
        return value


class GatewayConfig(BaseModel):
    """The whole route file."""

    model_config = ConfigDict(extra="forbid")

    model_root: Path = Path(".")
    endpoints: dict[str, EndpointConfig] = Field(min_length=1)
    #: Process settings (`gateway serve --help` lists them), below flags and environment variables
    #: in precedence; read when a gateway starts (`gateway.settings`), ignored by Apply.
    server: dict[str, Any] = Field(default_factory=dict)


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for problem in err.errors():
        location = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown field"
        elif problem["type"] == "missing":
            message = "required field is missing"
        lines.append(f"{source}: {location}: {message}")
    return "\n".join(lines)


def _check_size_and_depth(text: str, source: str) -> None:
    """Refuse documents too large, or nested too deep for the recursive YAML composer, before composing them.

    The event parser is iterative, so counting nesting on its events is safe for any input.
    """
    if len(text) > MAX_DOCUMENT_BYTES:
        raise ConfigError(f"{source}: {len(text)} characters; a route file may have at most {MAX_DOCUMENT_BYTES}")
    depth = 0
    try:
        for event in yaml.parse(text, Loader=_TextDecimalLoader):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DOCUMENT_DEPTH:
                    raise ConfigError(
                        f"{source}: nested more than {MAX_DOCUMENT_DEPTH} levels deep; "
                        "a route file needs about 4 (endpoints, an endpoint, a field, a mapping)"
                    )
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
            elif isinstance(event, yaml.AliasEvent):
                # A few nested aliases expand to billions of nodes when validated: write values out.
                raise ConfigError(f"{source}: YAML aliases (*name) are not accepted in a route file; write values out")
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None


def parse_config(text: str, *, source: str = "<route file>", base_dir: Path | None = None) -> GatewayConfig:
    """Parse route-file text and check its schema; `model_root` becomes absolute against `base_dir`.

    The routes themselves (weights, labels, shadows) are checked where they are compiled:
    `gateway.desired.parse_route_file` does both.
    """
    _check_size_and_depth(text, source)
    try:
        raw = yaml.load(text, Loader=_TextDecimalLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: must be a mapping with 'endpoints'")
    try:
        config = GatewayConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
    if base_dir is not None and not config.model_root.is_absolute():
        config = config.model_copy(update={"model_root": (base_dir / config.model_root).resolve()})
    return config


def load_config(path: Path) -> GatewayConfig:
    """Read and validate a route file."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read route file {path}: {err.strerror}") from None
    return parse_config(text, source=str(path), base_dir=path.resolve().parent)
