"""Metrics for the release guardrails, observed at collection time (nothing added to the request path).

Instruments (Prometheus names in brackets):
- `gateway.request.timeouts` counter by endpoint, version, arm: requests whose caller's
  deadline passed or that it cancelled, including answers that were ready too late
  [`gateway_request_timeouts_total`];
- `gateway.feedback.outcomes`, `gateway.feedback.values` counters and `gateway.feedback.value`
  (their sum) by endpoint, version, arm: joined Feedback outcomes, how many carried a business
  value, and the values' sum (value per request = value / values)
  [`gateway_feedback_outcomes_total`, `gateway_feedback_values_total`, `gateway_feedback_value_total`];
- `gateway.guardrail.observed` and `gateway.guardrail.threshold` gauges by endpoint, version
  (the candidate), metric and rule: what the guardian measured at its last tick, and the
  rule's threshold (PSI, KS, drops, rates, MB) [`gateway_guardrail_observed`,
  `gateway_guardrail_threshold`];
- `process.memory.usage` gauge, bytes: the process's resident memory, as the memory_growth
  rule sees it [`process_memory_usage_bytes`].

Counters come from the sliding windows' running totals (per series); the arm is the one the
current routes give the version (`pinned` for pinned traffic).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Mapping

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from gateway.telemetry.memory import MemoryWindow
from gateway.telemetry.windows import WindowStore


class GuardrailGauges:
    """The guardian's last observed value and threshold per (endpoint, candidate, metric, rule)."""

    def __init__(self) -> None:
        self._values: dict[tuple[str, str, str, str], tuple[float, float]] = {}
        self._lock = threading.Lock()

    def publish(self, values: Mapping[tuple[str, str, str, str], tuple[float, float]]) -> None:
        """Replace the values with one tick's (NaN observations are left out)."""
        kept = {key: pair for key, pair in values.items() if not math.isnan(pair[0])}
        with self._lock:
            self._values = kept

    def items(self) -> list[tuple[tuple[str, str, str, str], tuple[float, float]]]:
        """(endpoint, candidate, metric, rule) -> (observed, threshold)."""
        with self._lock:
            return list(self._values.items())


def register(
    meter: Meter,
    windows: WindowStore,
    gauges: GuardrailGauges,
    memory: MemoryWindow,
    arm_of: Callable[[str, str], str],
) -> None:
    """Create the observable instruments on `meter`."""

    def running(*names: str) -> list[tuple[dict[str, str], tuple[float, ...]]]:
        out = []
        for key in windows.keys():  # noqa: SIM118 - a WindowStore, not a dict
            arm = "pinned" if key.pinned else arm_of(key.endpoint, key.version)
            out.append(
                ({"endpoint": key.endpoint, "version": key.version, "arm": arm}, windows.window(key).running(*names))
            )
        return out

    def counter(index: int, *names: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(values[index], attributes) for attributes, values in running(*names) if values[0]]

        return observe

    meter.create_observable_counter(
        "gateway.request.timeouts",
        [counter(0, "timeouts")],
        unit="{request}",
        description="Requests whose caller's deadline passed or that it cancelled, by endpoint, version and arm",
    )
    meter.create_observable_counter(
        "gateway.feedback.outcomes",
        [counter(0, "outcomes")],
        unit="{outcome}",
        description="Feedback outcomes joined to the version and arm that served the request",
    )
    meter.create_observable_counter(
        "gateway.feedback.values",
        [counter(0, "values")],
        unit="{value}",
        description="Feedback outcomes that carried a business value",
    )
    meter.create_observable_counter(
        "gateway.feedback.value",
        [counter(1, "values", "value_sum")],
        description="Sum of the business values sent with Feedback (value per request = this / values)",
    )

    def rule_values(index: int) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [
                Observation(pair[index], {"endpoint": e, "version": v, "metric": m, "rule": r})
                for (e, v, m, r), pair in gauges.items()
            ]

        return observe

    meter.create_observable_gauge(
        "gateway.guardrail.observed",
        [rule_values(0)],
        description="What the guardian measured for a rule and candidate at its last tick",
    )
    meter.create_observable_gauge(
        "gateway.guardrail.threshold", [rule_values(1)], description="The rule's threshold, in the observed unit"
    )

    def observe_memory(options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(memory.latest() or memory.sample())]

    meter.create_observable_gauge(
        "process.memory.usage", [observe_memory], unit="By", description="Resident memory of the gateway process"
    )
