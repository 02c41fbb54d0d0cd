"""Rules -> verdicts. Pure: windows' statistics in, a verdict per rule out.

A candidate (the canary, or a shadow) is compared with the baseline (stable) over the same
window. A rule without enough samples in either arm is `inconclusive`, never `pass`. The
drift rules read the candidate's and the baseline's histograms (`gateway/telemetry/drift.py`),
value_drop its running sequential test, memory_growth the guardian's attribution of process
memory growth (`memory.py`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.guardrails.drift import ks, psi
from gateway.guardrails.rules import Metric, Rule, RuleSet, Statistic
from gateway.guardrails.sequential import (
    CtrExperiment,
    Moments,
    SequentialDropTest,
    SequentialMeanDropTest,
    ValueExperiment,
)
from gateway.orchestration.memory import MemoryEvidence
from gateway.telemetry.drift import FEATURE_BINS, HistogramStats
from gateway.telemetry.windows import WindowStats


class Status(enum.Enum):
    """A rule's outcome at one tick."""

    PASS = "pass"
    BREACH = "breach"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class Verdict:
    """One rule evaluated for one candidate: what was seen, against what, on what evidence."""

    rule: Rule
    candidate: str
    baseline: str
    status: Status
    observed: float
    samples: dict[str, int]
    p_value: float | None = None
    detail: str = ""
    values: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (incident records)."""
        return {
            "rule": self.rule.text,
            "metric": self.rule.metric.value,
            "candidate": self.candidate,
            "baseline": self.baseline,
            "status": self.status.value,
            "observed": None if math.isnan(self.observed) else self.observed,
            "threshold": self.rule.threshold,
            "window_seconds": self.rule.window_seconds,
            "samples": self.samples,
            "p_value": self.p_value,
            "detail": self.detail,
            "values": {k: (None if math.isnan(v) else v) for k, v in self.values.items()},
        }


def _verdict(rule: Rule, candidate: str, baseline: str, observed: float, samples: dict[str, int], **kw: Any) -> Verdict:
    enough = all(n >= rule.min_samples for n in samples.values())
    if not enough or math.isnan(observed):
        need = ", ".join(f"{arm} {n}/{rule.min_samples}" for arm, n in samples.items())
        kw["detail"] = kw.get("detail") or f"not enough samples ({need})"
        return Verdict(rule, candidate, baseline, Status.INCONCLUSIVE, observed, samples, **kw)
    status = Status.BREACH if observed > rule.threshold else Status.PASS
    p_value = kw.get("p_value")
    if status is Status.BREACH and rule.alpha is not None and (p_value is None or p_value >= rule.alpha):
        # Over the threshold but not significant yet: hold (a rollout does not advance), do not act.
        status = Status.INCONCLUSIVE
        shown = "n/a" if p_value is None else f"{p_value:.3g}"
        kw["detail"] = kw.get("detail") or f"drop not significant yet (p = {shown} >= {rule.alpha})"
    return Verdict(rule, candidate, baseline, status, observed, samples, **kw)


@dataclass(frozen=True)
class Comparison:
    """A candidate's and its baseline's windows, side by side, for one rule."""

    rule: Rule
    candidate: str
    baseline: str
    c: WindowStats
    feature_names: Sequence[str] = ()
    ctr_test: CtrExperiment | None = None
    value_test: ValueExperiment | None = None
    histograms: tuple[HistogramStats | None, HistogramStats | None] = (None, None)
    drift_note: str = ""
    memory: MemoryEvidence | None = None

    def verdict(self, observed: float, samples: dict[str, int], **kw: Any) -> Verdict:
        """A verdict on an observed value."""
        return _verdict(self.rule, self.candidate, self.baseline, observed, samples, **kw)


def evaluate(
    rule: Rule,
    candidate: str,
    baseline: str,
    candidate_stats: WindowStats,
    baseline_stats: WindowStats | None,
    *,
    feature_names: Sequence[str] = (),
    ctr_test: CtrExperiment | None = None,
    value_test: ValueExperiment | None = None,
    histograms: tuple[HistogramStats | None, HistogramStats | None] = (None, None),
    drift_note: str = "",
    memory: MemoryEvidence | None = None,
) -> Verdict:
    """Evaluate one rule on the candidate's and the baseline's windows.

    `ctr_test` and `value_test` are the candidate's running experiments (the guardian keeps one
    per candidate and share); without them ctr_drop and value_drop take one look at the
    windows' counts. `histograms` are the candidate's and the baseline's over the rule's window
    (a shadow's baseline is None: it is compared with its primary's scores on the same
    requests), `drift_note` why there are none; `memory` the process's growth and to whom the
    guardian attributes it.
    """
    problem = rule.history_problem(candidate_stats.seconds)
    if problem:  # the window was cut to the history kept: never judge on less than the rule says
        return Verdict(rule, candidate, baseline, Status.INCONCLUSIVE, math.nan, {}, detail=problem)
    comparison = Comparison(
        rule, candidate, baseline, candidate_stats, feature_names, ctr_test, value_test, histograms, drift_note, memory
    )
    if rule.metric in _ABSOLUTE:
        return _ABSOLUTE[rule.metric](comparison)
    if rule.metric is Metric.SCORE_DRIFT and baseline_stats is None and histograms[0] is not None:
        return _shadow_score_drift(comparison)
    if baseline_stats is None:
        return Verdict(
            rule,
            candidate,
            baseline,
            Status.INCONCLUSIVE,
            math.nan,
            {},
            detail="no stable version to compare with",
        )
    return _RELATIVE[rule.metric](comparison, baseline_stats)


def _shadow(x: Comparison) -> Verdict:
    observed = 1 - x.c.agreement_rate if x.c.compared else math.nan
    return _verdict(x.rule, x.candidate, "primary", observed, {x.candidate: x.c.compared})


def _error_rate(x: Comparison) -> Verdict:
    values = {"candidate_errors": float(x.c.errors), "candidate_requests": float(x.c.requests)}
    return x.verdict(x.c.error_rate if x.c.requests else math.nan, {x.candidate: x.c.requests}, values=values)


def _latency_ms(x: Comparison) -> Verdict:
    return x.verdict(x.c.quantile(0.95) * 1000, {x.candidate: x.c.requests})


def _latency_ratio(x: Comparison, b: WindowStats) -> Verdict:
    q = 0.95 if x.rule.metric is Metric.LATENCY_P95_RATIO else 0.99
    cq, bq = x.c.quantile(q), b.quantile(q)
    ratio = cq / bq if bq > 0 else math.nan
    samples = {x.candidate: x.c.requests, x.baseline: b.requests}
    return x.verdict(ratio, samples, values={"candidate_ms": cq * 1000, "baseline_ms": bq * 1000})


def _features(rule: Rule, names: list[str]) -> range | str:
    """The features a rule judges (all, or the one it names), or why it names none of them."""
    if not rule.feature:
        return range(len(names))
    if rule.feature not in names:
        listed = ", ".join(names[:8]) + ("..." if len(names) > 8 else "")
        return f"no feature {rule.feature!r}; features: {listed}"
    index = names.index(rule.feature)
    return range(index, index + 1)


def _null_rate(x: Comparison, b: WindowStats) -> Verdict:
    c = x.c
    samples = {x.candidate: c.rows, x.baseline: b.rows}
    counted = min(len(c.nan_counts), len(b.nan_counts))
    if not counted or not c.rows or not b.rows:
        detail = "no NaN counts per feature in the window" if c.rows and b.rows else ""
        return x.verdict(math.nan, samples, detail=detail)
    names = list(x.feature_names) or [str(i) for i in range(len(c.nan_counts))]
    chosen = _features(x.rule, names)
    if isinstance(chosen, str):
        return Verdict(x.rule, x.candidate, x.baseline, Status.INCONCLUSIVE, math.nan, samples, detail=chosen)
    indices = range(chosen.start, min(chosen.stop, counted)) if x.rule.feature else range(counted)
    best, worst = math.nan, -1
    for i in indices:
        delta = c.nan_rate(i) - b.nan_rate(i)
        if math.isnan(best) or delta > best:
            best, worst = delta, i
    feature = names[worst] if 0 <= worst < len(names) else ""
    values = {"candidate_null_rate": c.nan_rate(worst) if worst >= 0 else 0.0}
    values["baseline_null_rate"] = b.nan_rate(worst) if worst >= 0 else 0.0
    return x.verdict(best, samples, detail=f"feature {feature}" if feature else "", values=values)


def _ctr(x: Comparison, b: WindowStats) -> Verdict:
    c = x.c
    if x.ctr_test is not None:
        result = x.ctr_test.update()
    else:
        result = SequentialDropTest().update(c.outcome_sum, c.outcomes, b.outcome_sum, b.outcomes)
    samples = {x.candidate: result.canary_n, x.baseline: result.stable_n}
    if not result.canary_n or not result.stable_n:
        return x.verdict(math.nan, samples)
    values = {"candidate_ctr": result.canary_rate, "baseline_ctr": result.stable_rate}
    return x.verdict(result.relative_drop, samples, p_value=result.p_value, values=values)


def _timeout_rate(x: Comparison) -> Verdict:
    values = {"candidate_timeouts": float(x.c.timeouts), "candidate_requests": float(x.c.requests)}
    return x.verdict(x.c.timeout_rate if x.c.requests else math.nan, {x.candidate: x.c.requests}, values=values)


def _value(x: Comparison, b: WindowStats) -> Verdict:
    c = x.c
    if x.value_test is not None:
        result = x.value_test.update()
    else:
        result = SequentialMeanDropTest().update(
            Moments(c.values, c.value_sum, c.value_squares), Moments(b.values, b.value_sum, b.value_squares)
        )
    samples = {x.candidate: result.canary_n, x.baseline: result.stable_n}
    if not result.canary_n or not result.stable_n:
        return x.verdict(math.nan, samples, detail="no Feedback values yet (FeedbackRequest.value)")
    values = {"candidate_value_per_request": result.canary_rate, "baseline_value_per_request": result.stable_rate}
    return x.verdict(result.relative_drop, samples, p_value=result.p_value, values=values)


def _distance(rule: Rule, baseline: np.ndarray, candidate: np.ndarray) -> float:
    if rule.statistic is Statistic.KS:
        return ks(baseline[:-1], candidate[:-1])  # the last bin holds missing values: no place in an order
    return psi(baseline, candidate)


def _no_histograms(x: Comparison) -> Verdict:
    detail = x.drift_note or "no histograms in the window yet"
    return Verdict(x.rule, x.candidate, x.baseline, Status.INCONCLUSIVE, math.nan, {}, detail=detail)


def _feature_drift(x: Comparison, b: WindowStats) -> Verdict:
    ch, bh = x.histograms
    if ch is None or bh is None:
        return _no_histograms(x)
    samples = {x.candidate: ch.rows, x.baseline: bh.rows}
    count = min(len(ch.features), len(bh.features))
    names = list(x.feature_names[:count]) or [str(i) for i in range(count)]
    indices = _features(x.rule, names)
    if isinstance(indices, str):
        return Verdict(x.rule, x.candidate, x.baseline, Status.INCONCLUSIVE, math.nan, samples, detail=indices)
    drifts = sorted(((_distance(x.rule, bh.features[i], ch.features[i]), i) for i in indices), reverse=True)
    drifts = [(d, i) for d, i in drifts if not math.isnan(d)]
    if not drifts:
        return x.verdict(math.nan, samples)
    worst, index = drifts[0]
    statistic = x.rule.statistic.value if x.rule.statistic else "psi"
    values = {f"{statistic} {names[i]}": d for d, i in drifts[:3]}
    values[f"candidate_null_share {names[index]}"] = float(ch.features[index][FEATURE_BINS]) / max(ch.rows, 1)
    return x.verdict(worst, samples, detail=f"feature {names[index]}", values=values)


def _score_drift(x: Comparison, b: WindowStats) -> Verdict:
    ch, bh = x.histograms
    if ch is None or bh is None:
        return _no_histograms(x)
    samples = {x.candidate: ch.scored, x.baseline: bh.scored}
    return x.verdict(_distance(x.rule, bh.scores, ch.scores) if ch.scored and bh.scored else math.nan, samples)


def _shadow_score_drift(x: Comparison) -> Verdict:
    ch = x.histograms[0]
    assert ch is not None
    samples = {x.candidate: ch.scored, "primary": ch.paired}
    observed = _distance(x.rule, ch.paired_scores, ch.scores) if ch.scored and ch.paired else math.nan
    return _verdict(
        x.rule, x.candidate, "primary", observed, samples, detail="on the same mirrored requests as the primary"
    )


def _memory(x: Comparison) -> Verdict:
    m = x.memory
    if m is None:
        return Verdict(x.rule, x.candidate, x.baseline, Status.INCONCLUSIVE, math.nan, {}, detail="no memory samples")
    samples = {"process": m.samples}
    if not m.attributed:
        return Verdict(
            x.rule, x.candidate, x.baseline, Status.INCONCLUSIVE, m.grown_mb, samples, detail=m.detail, values=m.values
        )
    return x.verdict(m.grown_mb, samples, detail=m.detail, values=m.values)


_ABSOLUTE = {
    Metric.SHADOW_DISAGREEMENT: _shadow,
    Metric.ERROR_RATE: _error_rate,
    Metric.TIMEOUT_RATE: _timeout_rate,
    Metric.LATENCY_P95_MS: _latency_ms,
    Metric.MEMORY_GROWTH: _memory,
}
_RELATIVE = {
    Metric.LATENCY_P95_RATIO: _latency_ratio,
    Metric.LATENCY_P99_RATIO: _latency_ratio,
    Metric.FEATURE_NULL_RATE_DELTA: _null_rate,
    Metric.CTR_DROP: _ctr,
    Metric.VALUE_DROP: _value,
    Metric.FEATURE_DRIFT: _feature_drift,
    Metric.SCORE_DRIFT: _score_drift,
}


def needs_baseline(rule: Rule) -> bool:
    """Whether the rule compares the candidate with a baseline (else it judges the candidate alone)."""
    return rule.metric in _RELATIVE


def combine(rules: RuleSet, verdicts: Sequence[Verdict]) -> bool:
    """Whether the breaches are enough to act: at least `at_least` rules breaching."""
    return sum(v.status is Status.BREACH for v in verdicts) >= rules.at_least
