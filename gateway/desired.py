"""The desired state the control plane manages.

Per endpoint: its versions (with artifact references), weights, labels and policy.
Immutable values, serialised to JSON for the store, compiled into a `RouteTable` for the
data plane, and compared into human-readable diffs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gateway.config import (
    BatchingConfig,
    EndpointConfig,
    GatewayConfig,
    ShadowCompareConfig,
    load_config,
    parse_config,
)
from gateway.errors import ConfigError, InvalidInput, NotFound
from gateway.faults import Fault
from gateway.guardrails.rules import RuleSet
from gateway.repository import Artifact, ModelRepository
from gateway.routing import EndpointRoutes, RouteTable, unknown_label, unknown_version, version_sort_key

FORMAT = 1


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class EndpointState:
    """Desired state of one endpoint."""

    name: str
    artifacts: Mapping[str, Artifact]  # version -> artifact, in load order
    weights: Mapping[str, int]
    labels: Mapping[str, str] = field(default_factory=dict)
    max_batch_size: int = 256
    nan_policy: str = "allow"
    intra_op_threads: int = 1
    shadows: Mapping[str, int] = field(default_factory=dict)
    compare: ShadowCompareConfig = field(default_factory=ShadowCompareConfig)
    guardrails: RuleSet = field(default_factory=RuleSet)
    faults: Mapping[str, Fault] = field(default_factory=dict)
    #: Reference rows for the drift bins, relative to the model root ("": learnt from stable's traffic).
    drift_reference: str = ""
    #: Default deadline of the endpoint's requests, milliseconds (None: the gateway's `default_deadline`).
    deadline_ms: int | None = None
    #: Merge concurrent requests to a version into one run (None: off).
    batching: BatchingConfig | None = None
    #: Where model runs happen: `auto` (by measured cost), `inline` or `pool`.
    runner: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "artifacts", _frozen(self.artifacts))
        object.__setattr__(self, "weights", _frozen({v: w for v, w in self.weights.items() if w}))
        object.__setattr__(self, "labels", _frozen(self.labels))
        object.__setattr__(self, "shadows", _frozen({v: p for v, p in self.shadows.items() if p}))
        object.__setattr__(self, "faults", _frozen(self.faults))

    @property
    def versions(self) -> tuple[str, ...]:
        """Versions in load order."""
        return tuple(self.artifacts)

    def routes(self) -> EndpointRoutes:
        """The validated routes (raises InvalidInput naming the field)."""
        return EndpointRoutes(
            name=self.name,
            versions=self.versions,
            weights=dict(self.weights),
            labels=dict(self.labels),
            max_batch_size=self.max_batch_size,
            reject_nan=self.nan_policy == "reject",
            shadows=dict(self.shadows),
            deadline=None if self.deadline_ms is None else self.deadline_ms / 1000,
            batching=self.batching,
            runner=self.runner,
        )

    def require_version(self, version: str) -> None:
        """NotFound listing the versions when `version` is not one of them."""
        if version not in self.artifacts:
            raise unknown_version(self.name, version, self.versions)

    def label_of(self, label: str) -> str:
        """The version a label points at, or NotFound listing the labels."""
        target = self.labels.get(label)
        if target is None:
            raise unknown_label(self.name, label, self.labels)
        return target

    def with_(self, **changes: Any) -> EndpointState:
        """A copy with some fields replaced."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (versions as {version: {path, sha256}} in load order)."""
        return {
            "versions": {v: {"path": a.path, "sha256": a.sha256} for v, a in self.artifacts.items()},
            "traffic": dict(self.weights),
            "labels": dict(sorted(self.labels.items())),
            "max_batch_size": self.max_batch_size,
            "nan_policy": self.nan_policy,
            "intra_op_threads": self.intra_op_threads,
            "shadows": dict(sorted(self.shadows.items())),
            "shadow_compare": self.compare.model_dump(),
            "guardrails": self.guardrails.to_dict(),
            "faults": {v: f.to_dict() for v, f in sorted(self.faults.items())},
            **({"drift_reference": self.drift_reference} if self.drift_reference else {}),
            **({"deadline_ms": self.deadline_ms} if self.deadline_ms is not None else {}),
            "batching": self.batching.model_dump(mode="json") if self.batching else None,
            "runner": self.runner,
        }

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> EndpointState:
        """Inverse of `to_dict`."""
        return cls(
            name=name,
            artifacts={v: Artifact(name, v, str(a["path"]), str(a["sha256"])) for v, a in data["versions"].items()},
            weights={str(k): int(w) for k, w in data.get("traffic", {}).items()},
            labels={str(k): str(v) for k, v in data.get("labels", {}).items()},
            max_batch_size=int(data.get("max_batch_size", 256)),
            nan_policy=str(data.get("nan_policy", "allow")),
            intra_op_threads=int(data.get("intra_op_threads", 1)),
            shadows={str(k): int(p) for k, p in data.get("shadows", {}).items()},
            compare=ShadowCompareConfig.model_validate(data.get("shadow_compare", {})),
            guardrails=_rule_set(data.get("guardrails", {})),
            faults={str(v): Fault(**f) for v, f in data.get("faults", {}).items()},
            drift_reference=str(data.get("drift_reference", "")),
            deadline_ms=None if data.get("deadline_ms") is None else int(data["deadline_ms"]),
            batching=BatchingConfig.model_validate(data["batching"]) if data.get("batching") else None,
            runner=str(data.get("runner", "auto")),
        )


def _rule_set(data: Mapping[str, Any]) -> RuleSet:
    # Revisions written before the rename call observe-only "dry_run".
    observe_only = data.get("observe_only", data.get("dry_run", False))
    return RuleSet.parse(list(data.get("rules", [])), int(data.get("at_least", 1)), bool(observe_only))


@dataclass(frozen=True)
class DesiredState:
    """Every endpoint's desired state."""

    endpoints: Mapping[str, EndpointState]

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoints", _frozen(self.endpoints))

    def endpoint(self, name: str) -> EndpointState:
        """One endpoint, or NotFound listing the endpoints."""
        state = self.endpoints.get(name)
        if state is None:
            raise NotFound(f"no endpoint {name!r}; endpoints: {', '.join(sorted(self.endpoints)) or '(none)'}")
        return state

    def replace_endpoint(self, state: EndpointState) -> DesiredState:
        """A copy with one endpoint replaced (or added)."""
        return DesiredState({**self.endpoints, state.name: state})

    def update(self, name: str, change: Callable[[EndpointState], EndpointState]) -> DesiredState:
        """A copy with `change` applied to one endpoint."""
        return self.replace_endpoint(change(self.endpoint(name)))

    def route_table(self, revision: int) -> RouteTable:
        """Compile the data plane's table (validates every endpoint)."""
        return RouteTable(revision, {name: ep.routes() for name, ep in self.endpoints.items()})

    def artifacts(self) -> Iterator[tuple[EndpointState, Artifact]]:
        """Every (endpoint, artifact) pair."""
        for endpoint in self.endpoints.values():
            for artifact in endpoint.artifacts.values():
                yield endpoint, artifact

    def to_json(self) -> str:
        """Canonical JSON (stable key order) for the store."""
        body = {"format": FORMAT, "endpoints": {n: e.to_dict() for n, e in sorted(self.endpoints.items())}}
        return json.dumps(body, sort_keys=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> DesiredState:
        """Inverse of `to_json`."""
        body = json.loads(text)
        if body.get("format") != FORMAT:
            raise InvalidInput(f"stored state has format {body.get('format')!r}; this gateway reads {FORMAT}")
        return cls({name: EndpointState.from_dict(name, data) for name, data in body["endpoints"].items()})


@dataclass(frozen=True, slots=True)
class Change:
    """One field that differs between two desired states."""

    path: str
    before: Any
    after: Any

    def render(self) -> str:
        """`ctr-ranker traffic 1.13: 10 -> 25`."""
        absent = "(none)"
        before = absent if self.before is None else json.dumps(self.before)
        after = absent if self.after is None else json.dumps(self.after)
        return f"{self.path}: {before} -> {after}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"path": self.path, "before": self.before, "after": self.after}


def _flatten(state: DesiredState) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, endpoint in state.endpoints.items():
        body = endpoint.to_dict()
        for version, artifact in body.pop("versions").items():
            flat[f"{name} version {version}"] = f"{artifact['path']} sha256:{artifact['sha256'][:12]}"
        body.pop("traffic")
        for version in endpoint.versions:
            flat[f"{name} traffic {version}"] = endpoint.weights.get(version, 0)
        for label, version in body.pop("labels").items():
            flat[f"{name} label {label}"] = version
        for version, percent in body.pop("shadows").items():
            flat[f"{name} shadow {version}"] = percent
        compare = body.pop("shadow_compare")
        flat[f"{name} shadow_compare threshold"] = compare["threshold"]
        flat[f"{name} shadow_compare top_k"] = compare["top_k"]
        guardrails = body.pop("guardrails")
        for index, rule in enumerate(guardrails["rules"]):
            flat[f"{name} guardrail {index + 1}"] = rule
        if guardrails["rules"]:
            flat[f"{name} guardrails at_least"] = guardrails["at_least"]
            flat[f"{name} guardrails observe_only"] = guardrails["observe_only"]
        for version, fault in body.pop("faults").items():
            flat[f"{name} fault {version}"] = fault
        for key, value in (body.pop("batching") or {}).items():
            if value != []:  # no preferred sizes: nothing to show
                flat[f"{name} batching {key}"] = value
        for key, value in body.items():
            flat[f"{name} {key}"] = value
    return flat


def diff(before: DesiredState, after: DesiredState) -> list[Change]:
    """Field-level changes from `before` to `after`, in a stable, readable order."""
    old, new = _flatten(before), _flatten(after)

    def order(path: str) -> tuple[Any, ...]:
        parts = path.split(" ")
        return (parts[0], parts[1], version_sort_key(parts[2]) if len(parts) > 2 else ())

    return [
        Change(path, old.get(path), new.get(path))
        for path in sorted(old.keys() | new.keys(), key=order)
        if old.get(path) != new.get(path)
    ]


def endpoint_from_config(name: str, config: EndpointConfig, artifacts: Mapping[str, Artifact]) -> EndpointState:
    """The desired state of one route-file endpoint, given its versions' artifacts."""
    return EndpointState(
        name=name,
        artifacts={v: artifacts[v] for v in config.versions},
        weights=dict(config.traffic),
        labels=dict(config.labels),
        max_batch_size=config.max_batch_size,
        nan_policy=config.nan_policy,
        intra_op_threads=config.intra_op_threads,
        shadows=dict(config.shadows),
        compare=config.shadow_compare,
        guardrails=config.rule_set(),
        drift_reference=config.drift_reference or "",
        deadline_ms=config.deadline_ms,
        batching=config.batching,
        runner=config.runner,
    )


def desired_from_config(config: GatewayConfig, repository: ModelRepository) -> DesiredState:
    """The desired state a route file describes; artifacts come from the versions' manifests."""
    return DesiredState(
        {
            name: endpoint_from_config(
                name, endpoint, {v: repository.from_manifest(name, v) for v in endpoint.versions}
            )
            for name, endpoint in config.endpoints.items()
        }
    )


def check_routes(config: GatewayConfig, source: str) -> GatewayConfig:
    """`config` when every endpoint's routes compile; ConfigError naming the source and field otherwise."""
    for name, endpoint in config.endpoints.items():
        placeholders = {v: Artifact(name, v, "", "") for v in endpoint.versions}
        try:
            endpoint_from_config(name, endpoint, placeholders).routes()
        except InvalidInput as err:
            raise ConfigError(f"{source}: {err.message}", field=err.field) from None
    return config


def parse_route_file(text: str, *, source: str = "<route file>", base_dir: Path | None = None) -> GatewayConfig:
    """Route-file text, with its schema and its routes checked (ConfigError names the field)."""
    return check_routes(parse_config(text, source=source, base_dir=base_dir), source)


def load_route_file(path: Path) -> GatewayConfig:
    """A route file, with its schema and its routes checked (ConfigError names the file and field)."""
    return check_routes(load_config(path), str(path))
