"""Edits of one endpoint's desired state, one per admin change.

Each function returns an `Edit`: a pure function from the endpoint as it is to the endpoint
as the change makes it, raising a domain error (naming what is valid) when the change does
not fit. They touch no store, registry or route table: `ControlPlane` applies an edit under
its lock, validates the result and commits it, so every edit gets the same dry run, audit
entry and compare-and-swap.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from gateway.config import BatchingConfig
from gateway.desired import EndpointState
from gateway.errors import FailedPrecondition, NotFound
from gateway.faults import Fault
from gateway.guardrails.rules import RuleSet
from gateway.repository import Artifact
from gateway.routing import CANARY, STABLE, labels_on

Edit = Callable[[EndpointState], EndpointState]


def set_weights(weights: Mapping[str, int], labels: Mapping[str, str] | None = None) -> Edit:
    """Replace the weights (versions not named get 0); optionally set labels in the same step."""

    def edit(ep: EndpointState) -> EndpointState:
        for version in weights:
            ep.require_version(version)
        return ep.with_(weights=dict(weights), labels={**ep.labels, **(labels or {})})

    return edit


def set_label(label: str, version: str) -> Edit:
    """Point `label` at `version`; an empty version removes the label."""

    def edit(ep: EndpointState) -> EndpointState:
        labels = dict(ep.labels)
        if version:
            ep.require_version(version)
            labels[label] = version
        elif labels.pop(label, None) is None:
            ep.label_of(label)  # raises NotFound listing the labels
        return ep.with_(labels=labels)

    return edit


def set_shadow(version: str, percent: int) -> Edit:
    """Mirror `percent` of requests to `version`; 0 turns that shadow off."""

    def edit(ep: EndpointState) -> EndpointState:
        ep.require_version(version)
        shadows = dict(ep.shadows)
        if percent:
            shadows[version] = percent
        elif shadows.pop(version, None) is None:
            raise NotFound(f"{ep.name} {version} is not a shadow; shadows: {', '.join(ep.shadows) or '(none)'}")
        return ep.with_(shadows=shadows)

    return edit


def set_guardrails(rules: RuleSet) -> Edit:
    """Replace the guardrail rules."""
    return lambda ep: ep.with_(guardrails=rules)


def set_fault(version: str, fault: Fault | None) -> Edit:
    """Inject a fault on `version`; None (or a fault that does nothing) clears it."""

    def edit(ep: EndpointState) -> EndpointState:
        ep.require_version(version)
        faults = dict(ep.faults)
        if fault is None or (not fault.error_rate and not fault.latency_ms):
            faults.pop(version, None)
        else:
            faults[version] = fault
        return ep.with_(faults=faults)

    return edit


def set_batching(batching: BatchingConfig | None) -> Edit:
    """Merge concurrent requests into one run with these settings; None turns batching off."""
    return lambda ep: ep.with_(batching=batching)


def set_runner(runner: str) -> Edit:
    """Where model runs happen: auto, inline or pool (checked when the routes compile)."""
    return lambda ep: ep.with_(runner=runner)


def promote(ep: EndpointState) -> EndpointState:
    """The canary becomes stable and takes 100%; the canary label is cleared."""
    canary = ep.label_of(CANARY)
    labels = {k: v for k, v in ep.labels.items() if k != CANARY}
    labels[STABLE] = canary
    return ep.with_(weights={canary: 100}, labels=labels)


def switch_to(version: str) -> Edit:
    """Blue-green: 100% to `version`, labelled canary so promote and rollback work as usual."""
    return lambda ep: ep.with_(weights={version: 100}, labels={**ep.labels, CANARY: version})


def all_traffic_to(version: str = "") -> Edit:
    """100% to `version`, or to whatever `stable` points at when no version is given."""

    def edit(ep: EndpointState) -> EndpointState:
        target = version or ep.label_of(STABLE)
        ep.require_version(target)
        return ep.with_(weights={target: 100})

    return edit


def restore(past: EndpointState, revision: int) -> Edit:
    """The weights and labels the endpoint had at `revision`; its versions must still be loaded."""

    def edit(ep: EndpointState) -> EndpointState:
        for version in past.weights:
            if version not in ep.artifacts:
                raise FailedPrecondition(
                    f"revision {revision} sends traffic to {ep.name} {version}, which is no longer loaded; "
                    "load it again first"
                )
        labels = {k: v for k, v in past.labels.items() if v in ep.artifacts}
        return ep.with_(weights=dict(past.weights), labels=labels)

    return edit


def add_version(artifact: Artifact) -> Edit:
    """Register a new artifact; it takes no traffic until weights name it."""

    def edit(ep: EndpointState) -> EndpointState:
        if artifact.version in ep.artifacts:
            raise FailedPrecondition(f"{ep.name} {artifact.version} was registered meanwhile")
        return ep.with_(artifacts={**ep.artifacts, artifact.version: artifact})

    return edit


def remove_version(version: str) -> Edit:
    """Forget a version that takes no traffic, shadows nothing and no label points at."""

    def edit(ep: EndpointState) -> EndpointState:
        ep.require_version(version)
        if ep.weights.get(version, 0):
            raise FailedPrecondition(
                f"{ep.name} {version} takes {ep.weights[version]}% of traffic; move its traffic first"
            )
        if ep.shadows.get(version, 0):
            raise FailedPrecondition(
                f"{ep.name} {version} is a shadow ({ep.shadows[version]}% of requests); turn the shadow off first"
            )
        labels = labels_on(version, ep.labels)
        if labels:
            raise FailedPrecondition(
                f"{ep.name} {version} is the target of label {', '.join(labels)}; point the label elsewhere first"
            )
        return ep.with_(artifacts={v: a for v, a in ep.artifacts.items() if v != version})

    return edit
