"""Guardrail rules: one line a person can write at 2am, parsed into a typed rule.

Grammar (whitespace-separated; case-insensitive keywords):

    METRIC[FEATURE] > THRESHOLD[UNIT] [p < ALPHA] for DURATION [min N] [action ACTION]

    METRIC     error_rate | latency_p95_ratio | latency_p99_ratio | latency_p95_ms | ctr_drop
               | feature_null_rate_delta | shadow_disagreement | timeout_rate | value_drop
               | feature_drift | score_drift | memory_growth
    FEATURE    for feature_null_rate_delta and feature_drift: a feature name in brackets,
               e.g. feature_drift[features[7]]; without it (or with [any]), the worst feature
    THRESHOLD  a number; UNIT % (per cent), pt (percentage points), ms, x (a ratio), psi or ks
               (the drift statistic: population stability index or Kolmogorov-Smirnov
               distance; `0.2 psi` may be written apart), MB, GB, MiB or GiB (memory)
    p < ALPHA  for ctr_drop and value_drop (default 0.05): the always-valid p-value must be
               below ALPHA too
    DURATION   30s, 5m, 2h, 1d: the sliding window the metric is measured over (at most
               the history the gateway keeps, `gateway serve --window-history`); ctr_drop and
               value_drop count every outcome since the candidate's share last changed
               instead, which their always-valid tests need
    min N      samples each compared arm needs in the window (default 100; 1000 for the
               drift metrics and value_drop, 60 seconds of samples for memory_growth); fewer
               is "inconclusive", never "pass"
    ACTION     rollback (default) | pause | alert-only

Examples: `error_rate > 2% for 5m min 500`, `latency_p95_ratio > 1.3 for 10m`,
`ctr_drop > 5% p < 0.05 for 30m`, `value_drop > 3% p < 0.05 for 30m`,
`feature_null_rate_delta > 1pt for 10m`, `feature_drift[any] > 0.2 psi for 10m`,
`score_drift > 0.1 ks for 10m`, `timeout_rate > 1% for 5m`, `memory_growth > 200MB for 10m`,
`shadow_disagreement > 3% for 15m action alert-only`.

Every rule can say itself in words (`Rule.describe`), for runbooks and incident notes.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from gateway.errors import InvalidInput


class Metric(enum.Enum):
    """What a rule measures."""

    ERROR_RATE = "error_rate"
    LATENCY_P95_RATIO = "latency_p95_ratio"
    LATENCY_P99_RATIO = "latency_p99_ratio"
    LATENCY_P95_MS = "latency_p95_ms"
    CTR_DROP = "ctr_drop"
    FEATURE_NULL_RATE_DELTA = "feature_null_rate_delta"
    SHADOW_DISAGREEMENT = "shadow_disagreement"
    TIMEOUT_RATE = "timeout_rate"
    VALUE_DROP = "value_drop"
    FEATURE_DRIFT = "feature_drift"
    SCORE_DRIFT = "score_drift"
    MEMORY_GROWTH = "memory_growth"


class Action(enum.Enum):
    """What a breach does."""

    ROLLBACK = "rollback"
    PAUSE = "pause"
    ALERT_ONLY = "alert-only"


class Statistic(enum.Enum):
    """How the drift metrics compare two distributions (of fixed-bin histograms)."""

    PSI = "psi"
    KS = "ks"


#: Metrics whose threshold is a share (written with % or pt).
_SHARES = {
    Metric.ERROR_RATE,
    Metric.TIMEOUT_RATE,
    Metric.CTR_DROP,
    Metric.VALUE_DROP,
    Metric.FEATURE_NULL_RATE_DELTA,
    Metric.SHADOW_DISAGREEMENT,
}
#: Metrics judged by an always-valid sequential test on outcomes since the test began.
SEQUENTIAL = frozenset({Metric.CTR_DROP, Metric.VALUE_DROP})
#: Metrics that name a feature in brackets.
_PER_FEATURE = frozenset({Metric.FEATURE_NULL_RATE_DELTA, Metric.FEATURE_DRIFT})
_DRIFT = frozenset({Metric.FEATURE_DRIFT, Metric.SCORE_DRIFT})
#: Metrics judged on the candidate alone (the others compare it with a baseline).
_CANDIDATE_ONLY = frozenset({Metric.ERROR_RATE, Metric.TIMEOUT_RATE, Metric.LATENCY_P95_MS, Metric.SHADOW_DISAGREEMENT})
_DURATION = re.compile(r"\s*(\d+)\s*([smhd]?)\s*")
_NUMBER = re.compile(r"^(\d+(?:\.\d+)?|\.\d+)(%|pt|ms|x|psi|ks|mb|gb|mib|gib)?$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: Memory units, in MB (10^6 bytes).
_MEGABYTES = {"mb": 1.0, "gb": 1000.0, "mib": 1.048576, "gib": 1073.741824}
DEFAULT_MIN_SAMPLES = 100
#: Default `min` where 100 samples are too few: histogram distances are noisy on small samples
#: (the PSI of two samples of 100 from one distribution is about 0.18 with 10 bins), and a mean
#: of heavy-tailed values needs more than a rate.
_DEFAULT_MIN = {Metric.FEATURE_DRIFT: 1000, Metric.SCORE_DRIFT: 1000, Metric.VALUE_DROP: 1000, Metric.MEMORY_GROWTH: 60}
#: Metrics a shadow is judged on (it answers no caller: no errors, latency or outcomes of its own).
_SHADOW_METRICS = frozenset({Metric.SHADOW_DISAGREEMENT, Metric.SCORE_DRIFT, Metric.MEMORY_GROWTH})
#: Per-feature rules without a feature (or with `[any]`) judge the worst feature.
ANY_FEATURE = "any"


def default_min_samples(metric: Metric) -> int:
    """The `min N` a rule of this metric gets when it does not say."""
    return _DEFAULT_MIN.get(metric, DEFAULT_MIN_SAMPLES)


@dataclass(frozen=True)
class Rule:
    """A parsed guardrail rule; `text` is the line it came from."""

    text: str
    metric: Metric
    threshold: float
    window_seconds: int
    min_samples: int = DEFAULT_MIN_SAMPLES
    action: Action = Action.ROLLBACK
    alpha: float | None = None
    feature: str = ""
    statistic: Statistic | None = None

    def history_problem(self, history_seconds: int) -> str:
        """Why the rule cannot be measured with `history_seconds` of kept history ("" when it can)."""
        if self.metric in SEQUENTIAL or self.window_seconds <= history_seconds:
            return ""  # the sequential tests count outcomes since they began, not over the window
        return (
            f"guardrail {self.text!r} looks at {self.window_seconds} s but the gateway keeps "
            f"{history_seconds} s of history; raise `gateway serve --window-history` or shorten the rule"
        )

    def describe(self) -> str:
        """The rule in words: what it watches, against what, over which window, and what a breach does."""
        what = _what(self)
        window = _words(self.window_seconds)
        if self.metric in SEQUENTIAL:
            over = (
                f"with p < {self.alpha:g} (an always-valid sequential test, checked every tick, on every "
                "outcome since the candidate's share last changed)"
            )
            evidence = f"at least {self.min_samples} outcomes per arm"
        elif self.metric is Metric.MEMORY_GROWTH:
            over = f"within {window}"
            evidence = f"at least {self.min_samples} s of samples since the version started serving"
        else:
            over = f"over the last {window}"
            whose = "of the candidate" if self.metric in _CANDIDATE_ONLY else "per compared arm"
            evidence = f"at least {self.min_samples} {_SAMPLES[self.metric]} {whose}"
        return f"{_ACTIONS[self.action]} when {what} {over}; judged on {evidence}, inconclusive with fewer."


def _words(seconds: int) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} seconds"


def _what(rule: Rule) -> str:
    feature = f"feature {rule.feature}" if rule.feature else "any input feature (the worst one)"
    statistic = "Kolmogorov-Smirnov distance" if rule.statistic is Statistic.KS else "population stability index"
    return _DESCRIPTIONS[rule.metric].format(
        share=f"{rule.threshold * 100:g}%",
        points=f"{rule.threshold * 100:g}",
        value=f"{rule.threshold:g}",
        feature=feature,
        statistic=f"{statistic} above {rule.threshold:g}",
    )


_DESCRIPTIONS = {
    Metric.ERROR_RATE: "the candidate's server errors (INTERNAL, UNAVAILABLE, DEADLINE_EXCEEDED) exceed {share} "
    "of its requests",
    Metric.TIMEOUT_RATE: "more than {share} of the candidate's requests time out (DEADLINE_EXCEEDED) "
    "or are cancelled by the caller",
    Metric.LATENCY_P95_RATIO: "the candidate's p95 latency is more than {value}x stable's",
    Metric.LATENCY_P99_RATIO: "the candidate's p99 latency is more than {value}x stable's",
    Metric.LATENCY_P95_MS: "the candidate's p95 latency is above {value} ms",
    Metric.CTR_DROP: "the candidate's click-through rate is more than {share} below stable's",
    Metric.VALUE_DROP: "the candidate's business value per request (the Feedback value) is more than {share} "
    "below stable's",
    Metric.FEATURE_NULL_RATE_DELTA: "the share of missing (NaN) values of {feature} is more than {points} points "
    "above stable's",
    Metric.FEATURE_DRIFT: "the candidate's live inputs of {feature} drift from stable's on the same window "
    "({statistic})",
    Metric.SCORE_DRIFT: "the candidate's output scores drift from stable's on the same window, or a shadow's "
    "from its primary's on the same requests ({statistic})",
    Metric.SHADOW_DISAGREEMENT: "a shadow's decisions disagree with its primary's on more than {share} of the "
    "mirrored requests",
    Metric.MEMORY_GROWTH: "the process's resident memory grows by more than {value} MB while the candidate is "
    "the version that most recently started serving (attribution by timing)",
}
_SAMPLES = {
    Metric.ERROR_RATE: "requests",
    Metric.TIMEOUT_RATE: "requests",
    Metric.LATENCY_P95_RATIO: "requests",
    Metric.LATENCY_P99_RATIO: "requests",
    Metric.LATENCY_P95_MS: "requests",
    Metric.FEATURE_NULL_RATE_DELTA: "rows",
    Metric.FEATURE_DRIFT: "rows",
    Metric.SCORE_DRIFT: "scored rows",
    Metric.SHADOW_DISAGREEMENT: "compared decisions",
}
_ACTIONS = {
    Action.ROLLBACK: "Roll back to stable",
    Action.PAUSE: "Pause the running rollout",
    Action.ALERT_ONLY: "Record an incident (alert only)",
}


def _fail(text: str, problem: str, field: str = "guardrails") -> InvalidInput:
    return InvalidInput(f"guardrail {text!r}: {problem}", field=field)


def parse_duration(text: str, *, bare_seconds: bool = False) -> int:
    """`90s`, `15m`, `2h`, `1d` as seconds; a bare number is seconds only where `bare_seconds`.

    (A rule's `for 5 minutes` must fail on the `5`, not on a later word.)
    """
    match = _DURATION.fullmatch(text.lower())
    if not match or int(match.group(1)) == 0 or not (match.group(2) or bare_seconds):
        raise InvalidInput(f"{text!r} is not a duration; write 30s, 5m, 2h or 1d", field="duration")
    return int(match.group(1)) * _UNITS[match.group(2) or "s"]


def _metric(token: str, text: str) -> tuple[Metric, str]:
    name, _, rest = token.partition("[")
    feature = rest[:-1] if rest.endswith("]") else ""
    try:
        metric = Metric(name.lower())
    except ValueError:
        valid = ", ".join(m.value for m in Metric)
        raise _fail(text, f"unknown metric {name!r}; metrics: {valid}") from None
    if feature and metric not in _PER_FEATURE:
        raise _fail(text, "only feature_null_rate_delta and feature_drift take a [feature]")
    return metric, "" if feature.lower() == ANY_FEATURE else feature


def _threshold(token: str, metric: Metric, text: str) -> tuple[float, Statistic | None]:
    match = _NUMBER.match(token.lower())
    if not match:
        raise _fail(text, f"threshold {token!r} is not a number (with %, pt, ms, x, psi, ks or MB)")
    number, unit = match.group(1), match.group(2) or ""
    value = float(number)
    if metric in _SHARES:
        if unit not in ("%", "pt"):
            raise _fail(text, f"{metric.value} takes a share: write {token}% (or pt for points)")
        return value / 100, None
    if metric in _DRIFT:
        if unit not in ("psi", "ks"):
            raise _fail(text, f"{metric.value} names its statistic: write {number} psi or {number} ks")
        if unit == "ks" and value >= 1:
            raise _fail(text, f"a KS distance is below 1; {number} ks can never breach")
        return value, Statistic(unit)
    if metric is Metric.MEMORY_GROWTH:
        if unit not in _MEGABYTES:
            raise _fail(text, f"{metric.value} is memory: write {number}MB (or GB, MiB, GiB)")
        return value * _MEGABYTES[unit], None
    if metric is Metric.LATENCY_P95_MS:
        if unit not in ("", "ms"):
            raise _fail(text, f"{metric.value} is in milliseconds: write {number}ms")
        return value, None
    if unit not in ("", "x"):
        raise _fail(text, f"{metric.value} is a ratio to stable: write {number} or {number}x")
    return value, None


@dataclass
class _Options:
    alpha: float | None = None
    window: int | None = None
    min_samples: int | None = None
    action: Action = Action.ROLLBACK


def _option(options: _Options, word: str, argument: str, text: str) -> None:
    if word == "for":
        try:
            options.window = parse_duration(argument)
        except InvalidInput as err:
            raise _fail(text, err.message) from None
    elif word == "min":
        if not argument.isdigit() or int(argument) < 1:
            raise _fail(text, f"min {argument!r}: give a whole number of samples per arm")
        options.min_samples = int(argument)
    elif word == "action":
        try:
            options.action = Action(argument)
        except ValueError:
            raise _fail(text, f"unknown action {argument!r}; actions: rollback, pause, alert-only") from None
    else:
        raise _fail(text, f"unexpected {word!r}; after the threshold come: p < ALPHA, for, min, action")


def _options(words: list[str], text: str) -> _Options:
    options = _Options()
    i = 0
    while i < len(words):
        word = words[i]
        argument = words[i + 1] if i + 1 < len(words) else None
        if word == "p" and argument == "<" and i + 2 < len(words):
            try:
                options.alpha = float(words[i + 2])
            except ValueError:
                raise _fail(text, f"p < {words[i + 2]!r}: alpha must be a number such as 0.05") from None
            if not 0 < options.alpha < 1:
                raise _fail(text, f"alpha {options.alpha} must be between 0 and 1")
            i += 3
            continue
        if argument is None:
            raise _fail(text, f"{word!r} needs a value")
        _option(options, word, argument, text)
        i += 2
    return options


def parse_rule(text: str) -> Rule:
    """Parse one rule line; InvalidInput names what is wrong and what is valid."""
    tokens = text.replace(">", " > ").replace("<", " < ").split()
    if len(tokens) < 5 or tokens[1] != ">":
        raise _fail(text, "write METRIC > THRESHOLD for DURATION, e.g. 'error_rate > 2% for 5m'")
    metric, feature = _metric(tokens[0], text)
    threshold_token, rest = tokens[2], tokens[3:]
    if rest and rest[0].lower() in ("psi", "ks", "mb", "gb", "mib", "gib"):  # `0.2 psi`, `200 MB`
        threshold_token, rest = threshold_token + rest[0], rest[1:]
    threshold, statistic = _threshold(threshold_token, metric, text)
    options = _options([t.lower() for t in rest], text)
    if options.window is None:
        raise _fail(text, "missing 'for DURATION' (the window), e.g. 'for 5m'")
    alpha = options.alpha
    if metric in SEQUENTIAL and alpha is None:
        alpha = 0.05
    if alpha is not None and metric not in SEQUENTIAL:
        raise _fail(text, "only ctr_drop and value_drop take 'p < ALPHA'")
    min_samples = options.min_samples if options.min_samples is not None else default_min_samples(metric)
    return Rule(text.strip(), metric, threshold, options.window, min_samples, options.action, alpha, feature, statistic)


@dataclass(frozen=True)
class RuleSet:
    """An endpoint's rules and how they combine: a breach needs `at_least` rules breaching.

    `observe_only` records what would have fired without acting.
    """

    rules: tuple[Rule, ...] = ()
    at_least: int = 1
    observe_only: bool = False

    def __post_init__(self) -> None:
        if self.rules and not 1 <= self.at_least <= len(self.rules):
            raise InvalidInput(
                f"guardrails.at_least: {self.at_least} must be between 1 and {len(self.rules)} (the rules)",
                field="guardrails.at_least",
            )

    @classmethod
    def parse(cls, lines: list[str], at_least: int = 1, observe_only: bool = False) -> RuleSet:
        """Parse rule lines."""
        return cls(tuple(parse_rule(line) for line in lines), at_least, observe_only)

    @property
    def canary_rules(self) -> tuple[Rule, ...]:
        """The rules that compare a weighted candidate with stable (all but shadow_disagreement)."""
        return tuple(r for r in self.rules if r.metric is not Metric.SHADOW_DISAGREEMENT)

    @property
    def shadow_rules(self) -> tuple[Rule, ...]:
        """The rules that check a shadow: against its primary (shadow_disagreement, score_drift), or memory."""
        return tuple(r for r in self.rules if r.metric in _SHADOW_METRICS)

    def uses(self, *metrics: Metric) -> bool:
        """Whether any rule measures one of `metrics`."""
        return any(r.metric in metrics for r in self.rules)

    def check_history(self, history_seconds: int) -> None:
        """InvalidInput when a rule looks further back than the `history_seconds` the gateway keeps."""
        for rule in self.rules:
            problem = rule.history_problem(history_seconds)
            if problem:
                raise InvalidInput(problem, field="guardrails")

    @property
    def longest_window(self) -> int:
        """The longest rule window, seconds (0 without rules)."""
        return max((r.window_seconds for r in self.rules), default=0)

    def describe(self) -> list[str]:
        """Each rule in words, then how they combine."""
        lines = [f"{r.text}: {r.describe()}" for r in self.rules]
        if len(self.rules) > 1:
            lines.append(f"Acts when at least {self.at_least} of these {len(self.rules)} rules breach at once.")
        if self.observe_only:
            lines.append("Observe-only: breaches are recorded as incidents; nothing is changed.")
        return lines

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (the rule lines as written)."""
        return {"rules": [r.text for r in self.rules], "at_least": self.at_least, "observe_only": self.observe_only}
