"""The immutable route table and the sticky weighted choice of a version per request.

`RouteTable` is built once per route revision and never mutated; the data plane reads the
current table with one attribute read (`Router.table`) and a change swaps the whole table.

Sticky, monotone weighted choice: the routing key is hashed with the endpoint name into
10,000 buckets, and each version with traffic owns one contiguous bucket range. Ranges are
laid out bottom-up in a fixed order: the `stable` version first, then the others in
ascending version order. When a newer version ramps 5% -> 25% -> 50% at the expense of
stable, its range only grows downwards, so every key that was on it stays on it. Without a
routing key the bucket is drawn at random per request.
"""

from __future__ import annotations

import enum
import hashlib
import random
import re
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from gateway.config import RUNNER_MODES, BatchingConfig
from gateway.errors import InvalidInput, NotFound

BUCKETS = 10_000
TOTAL_WEIGHT = 100
STABLE = "stable"
CANARY = "canary"
PINNED_ARM = "pinned"

ENDPOINT_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
LABEL_NAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")


class RoutingReason(enum.Enum):
    """Why a request went to its version."""

    WEIGHT = "weight"  # random draw by weights (no routing key)
    STICKY = "sticky"  # weights, hashed routing key
    PINNED = "pinned"  # name@version
    LABEL = "label"  # name:label


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """The version chosen for one request, the arm it counts under and why."""

    version: str
    arm: str
    reason: RoutingReason


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A parsed `model` field: `name`, `name@version` or `name:label`."""

    endpoint: str
    version: str = ""
    label: str = ""

    @classmethod
    def parse(cls, model: str) -> ModelRef:
        """Split `name@version` / `name:label`; the name itself is checked by the route lookup."""
        if "@" in model:
            endpoint, _, version = model.partition("@")
            if not version:
                raise InvalidInput(f"model {model!r} has an empty version after '@'; write name@version")
            return cls(endpoint, version=version)
        if ":" in model:
            endpoint, _, label = model.partition(":")
            if not label:
                raise InvalidInput(f"model {model!r} has an empty label after ':'; write name:label")
            return cls(endpoint, label=label)
        if not model:
            raise InvalidInput("model is empty; give an endpoint name (name, name@version or name:label)")
        return cls(model)


def version_sort_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural order for versions: 1.9 < 1.10 < 1.12 < 2.0; numeric parts before text parts."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[._-]", version))


def format_traffic(weights: Mapping[str, int]) -> str:
    """Weights as people read them: `1.12 90%, 1.13 10%` (versions in natural order)."""
    return ", ".join(f"{v} {weights[v]}%" for v in sorted(weights, key=version_sort_key)) or "(none)"


def labels_on(version: str, labels: Mapping[str, str]) -> list[str]:
    """The labels that point at `version`, sorted."""
    return sorted(label for label, target in labels.items() if target == version)


def unknown_version(endpoint: str, version: str, versions: Iterable[str]) -> NotFound:
    """The error for a version an endpoint does not have, listing the ones it has."""
    return NotFound(f"{endpoint} has no version {version!r}; versions: {', '.join(versions) or '(none)'}")


def unknown_label(endpoint: str, label: str, labels: Mapping[str, str]) -> NotFound:
    """The error for a label an endpoint does not have, listing its labels and their versions."""
    valid = ", ".join(f"{k} -> {v}" for k, v in sorted(labels.items())) or "(none)"
    return NotFound(f"{endpoint} has no label {label!r}; labels: {valid}")


def _arm_name(version: str, labels: Mapping[str, str]) -> str:
    names = labels_on(version, labels)
    for preferred in (STABLE, CANARY):
        if preferred in names:
            return preferred
    return names[0] if names else version


@dataclass(frozen=True)
class EndpointRoutes:
    """Desired routing of one endpoint (weights, labels, policy), validated, plus its compiled choice."""

    name: str
    versions: tuple[str, ...]
    weights: Mapping[str, int]
    labels: Mapping[str, str] = field(default_factory=dict)
    max_batch_size: int = 256
    reject_nan: bool = False
    #: version -> percent of (non-pinned) requests mirrored to it.
    shadows: Mapping[str, int] = field(default_factory=dict)
    #: Seconds a request may take when its caller sets no shorter deadline (None: the gateway's default).
    deadline: float | None = None
    #: Merge concurrent requests to one version into one run (None: each request runs alone).
    batching: BatchingConfig | None = None
    #: Where model runs happen: `auto` (by their measured cost), `inline` (event loop) or `pool`.
    runner: str = "auto"
    #: (version, fraction) for the request path's draw.
    mirror: tuple[tuple[str, float], ...] = field(init=False, repr=False, compare=False)
    _bounds: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _sticky: tuple[RouteDecision, ...] = field(init=False, repr=False, compare=False)
    _random: tuple[RouteDecision, ...] = field(init=False, repr=False, compare=False)
    _pins: Mapping[str, RouteDecision] = field(init=False, repr=False, compare=False)
    _by_label: Mapping[str, RouteDecision] = field(init=False, repr=False, compare=False)
    _salt: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._validate()
        weights = {v: w for v, w in self.weights.items() if w > 0}
        stable = self.labels.get(STABLE)
        order = sorted(weights, key=lambda v: (v != stable, version_sort_key(v)))
        bounds, sticky, drawn, upper = [], [], [], 0
        for version in order:
            upper += weights[version] * (BUCKETS // TOTAL_WEIGHT)
            arm = _arm_name(version, self.labels)
            bounds.append(upper)
            sticky.append(RouteDecision(version, arm, RoutingReason.STICKY))
            drawn.append(RouteDecision(version, arm, RoutingReason.WEIGHT))
        # Upper bounds are exclusive; bisect_right on [0, BUCKETS) picks the owning range.
        set_ = object.__setattr__
        set_(self, "versions", tuple(self.versions))
        set_(self, "weights", MappingProxyType(dict(self.weights)))
        set_(self, "labels", MappingProxyType(dict(self.labels)))
        set_(self, "shadows", MappingProxyType(dict(self.shadows)))
        set_(self, "mirror", tuple((v, p / 100) for v, p in sorted(self.shadows.items()) if p > 0))
        set_(self, "_bounds", tuple(bounds[:-1]))
        set_(self, "_sticky", tuple(sticky))
        set_(self, "_random", tuple(drawn))
        set_(self, "_pins", {v: RouteDecision(v, PINNED_ARM, RoutingReason.PINNED) for v in self.versions})
        set_(
            self,
            "_by_label",
            {lbl: RouteDecision(v, PINNED_ARM, RoutingReason.LABEL) for lbl, v in self.labels.items()},
        )
        set_(self, "_salt", self.name.encode() + b"\x00")

    def _require_known(self, version: str, field_name: str) -> None:
        if version not in self.versions:
            raise InvalidInput(
                f"endpoints.{self.name}.{field_name}: version {version!r} is not a version of {self.name}; "
                f"versions: {', '.join(self.versions) or '(none)'}",
                field=f"endpoints.{self.name}.{field_name.split('.', maxsplit=1)[0]}",
            )

    @staticmethod
    def _percent(value: object, what: str, field_name: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= TOTAL_WEIGHT:
            raise InvalidInput(f"{what}: {value!r} must be an integer percent from 0 to 100", field=field_name)

    def _validate(self) -> None:
        where = f"endpoints.{self.name}"
        if not ENDPOINT_NAME.match(self.name):
            raise InvalidInput(
                f"endpoint name {self.name!r} is invalid: use lower-case letters, digits, '.', '_' or '-' "
                "(no '@' or ':', which select versions and labels)",
                field="endpoints",
            )
        for version in self.versions:
            if not VERSION_NAME.match(version):
                raise InvalidInput(
                    f"{where}.versions: {version!r} is not a valid version "
                    "(letters, digits, '.', '_' or '-', starting with a letter or digit)",
                    field=f"{where}.versions",
                )
        for version, weight in self.weights.items():
            self._require_known(version, "traffic")
            self._percent(weight, f"{where}.traffic.{version}: weight", f"{where}.traffic")
        total = sum(self.weights.values())
        if total != TOTAL_WEIGHT:
            raise InvalidInput(
                f"{where}.traffic: weights sum to {total}; they must sum to {TOTAL_WEIGHT}",
                field=f"{where}.traffic",
            )
        for label, version in self.labels.items():
            if not LABEL_NAME.match(label):
                raise InvalidInput(
                    f"{where}.labels: {label!r} is not a valid label (lower-case letters, digits and '-')",
                    field=f"{where}.labels",
                )
            self._require_known(version, f"labels.{label}")
        for version, percent in self.shadows.items():
            self._require_known(version, "shadows")
            self._percent(percent, f"{where}.shadows.{version}: share of requests", f"{where}.shadows")
        if not 1 <= self.max_batch_size <= 1 << 20:
            raise InvalidInput(
                f"{where}.max_batch_size: {self.max_batch_size} must be between 1 and {1 << 20}",
                field=f"{where}.max_batch_size",
            )
        if self.runner not in RUNNER_MODES:
            raise InvalidInput(
                f"{where}.runner: {self.runner!r} is not a runner; valid: {', '.join(RUNNER_MODES)}",
                field=f"{where}.runner",
            )

    def bucket(self, routing_key: str) -> int:
        """The sticky bucket of a routing key on this endpoint, in [0, BUCKETS)."""
        digest = hashlib.blake2b(self._salt + routing_key.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") % BUCKETS

    def choose(self, routing_key: str) -> RouteDecision:
        """Weighted choice: sticky by routing key, random per request without one."""
        if routing_key:
            return self._sticky[bisect_right(self._bounds, self.bucket(routing_key))]
        return self._random[bisect_right(self._bounds, int(random.random() * BUCKETS))]

    def pin(self, version: str) -> RouteDecision:
        """An explicit version; NotFound lists the endpoint's versions."""
        decision = self._pins.get(version)
        if decision is None:
            raise unknown_version(self.name, version, self.versions)
        return decision

    def by_label(self, label: str) -> RouteDecision:
        """The version a label points at; NotFound lists the endpoint's labels."""
        decision = self._by_label.get(label)
        if decision is None:
            raise unknown_label(self.name, label, self.labels)
        return decision

    def resolve(self, ref: ModelRef, routing_key: str) -> RouteDecision:
        """The decision for a parsed model reference."""
        if ref.version:
            if ref.version not in self._pins and ref.version in self._by_label:
                return self._by_label[ref.version]  # `model_version: canary` on the Open Inference Protocol
            return self.pin(ref.version)
        if ref.label:
            return self.by_label(ref.label)
        return self.choose(routing_key)

    def arm_of(self, version: str) -> str:
        """The arm name a version's weighted traffic is counted under."""
        return _arm_name(version, self.labels)


@dataclass(frozen=True)
class RouteTable:
    """Every endpoint's routes at one revision. Immutable: a change builds a new table."""

    revision: int
    endpoints: Mapping[str, EndpointRoutes]

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoints", MappingProxyType(dict(self.endpoints)))

    def endpoint(self, name: str) -> EndpointRoutes:
        """One endpoint's routes, or NotFound listing the served endpoints."""
        routes = self.endpoints.get(name)
        if routes is None:
            raise NotFound(f"no endpoint {name!r}; served endpoints: {', '.join(sorted(self.endpoints)) or '(none)'}")
        return routes


class Router:
    """Holds the current `RouteTable`. Reads are one attribute read; `swap` replaces it whole."""

    def __init__(self, table: RouteTable) -> None:
        self.table = table

    def swap(self, table: RouteTable) -> RouteTable:
        """Install a new table; returns the previous one."""
        previous, self.table = self.table, table
        return previous
