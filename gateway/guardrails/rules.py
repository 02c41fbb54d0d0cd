"""Guardrail rules: one line a person can write at 2am, parsed into a typed rule.

Grammar (whitespace-separated; case-insensitive keywords):

    METRIC[FEATURE] > THRESHOLD[UNIT] [p < ALPHA] for DURATION [min N] [action ACTION]

    METRIC     error_rate | latency_p95_ratio | latency_p99_ratio | latency_p95_ms
               | ctr_drop | feature_null_rate_delta | shadow_disagreement
    FEATURE    only for feature_null_rate_delta: a feature name in brackets,
               e.g. feature_null_rate_delta[features[7]]; without it, any feature
    THRESHOLD  a number; UNIT % (per cent), pt (percentage points), ms, or x (a ratio)
    p < ALPHA  only for ctr_drop: the always-valid p-value must be below ALPHA too
    DURATION   30s, 5m, 2h, 1d: the sliding window the metric is measured over (at most
               the history the gateway keeps, `gateway serve --window-history`); ctr_drop
               counts every outcome since the candidate's share last changed instead,
               which its always-valid test needs
    min N      samples each compared arm needs in the window (default 100); fewer is
               "inconclusive", never "pass"
    ACTION     rollback (default) | pause | alert-only

Examples: `error_rate > 2% for 5m min 500`, `latency_p95_ratio > 1.3 for 10m`,
`ctr_drop > 5% p < 0.05 for 30m`, `feature_null_rate_delta > 1pt for 10m`,
`shadow_disagreement > 3% for 15m action alert-only`.
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


class Action(enum.Enum):
    """What a breach does."""

    ROLLBACK = "rollback"
    PAUSE = "pause"
    ALERT_ONLY = "alert-only"


#: Metrics whose threshold is a share (written with % or pt).
_SHARES = {Metric.ERROR_RATE, Metric.CTR_DROP, Metric.FEATURE_NULL_RATE_DELTA, Metric.SHADOW_DISAGREEMENT}
_DURATION = re.compile(r"\s*(\d+)\s*([smhd]?)\s*")
_NUMBER = re.compile(r"^(\d+(?:\.\d+)?|\.\d+)(%|pt|ms|x)?$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
DEFAULT_MIN_SAMPLES = 100


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

    def history_problem(self, history_seconds: int) -> str:
        """Why the rule cannot be measured with `history_seconds` of kept history ("" when it can)."""
        if self.metric is Metric.CTR_DROP or self.window_seconds <= history_seconds:
            return ""  # ctr_drop counts outcomes since its test began, not over the window
        return (
            f"guardrail {self.text!r} looks at {self.window_seconds} s but the gateway keeps "
            f"{history_seconds} s of history; raise `gateway serve --window-history` or shorten the rule"
        )


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
    if feature and metric is not Metric.FEATURE_NULL_RATE_DELTA:
        raise _fail(text, "only feature_null_rate_delta takes a [feature]")
    return metric, feature


def _threshold(token: str, metric: Metric, text: str) -> float:
    match = _NUMBER.match(token.lower())
    if not match:
        raise _fail(text, f"threshold {token!r} is not a number (with %, pt, ms or x)")
    value, unit = float(match.group(1)), match.group(2) or ""
    if metric in _SHARES:
        if unit not in ("%", "pt"):
            raise _fail(text, f"{metric.value} takes a share: write {token}% (or pt for points)")
        return value / 100
    if metric is Metric.LATENCY_P95_MS:
        if unit not in ("", "ms"):
            raise _fail(text, f"{metric.value} is in milliseconds: write {match.group(1)}ms")
        return value
    if unit not in ("", "x"):
        raise _fail(text, f"{metric.value} is a ratio to stable: write {match.group(1)} or {match.group(1)}x")
    return value


@dataclass
class _Options:
    alpha: float | None = None
    window: int | None = None
    min_samples: int = DEFAULT_MIN_SAMPLES
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
    threshold = _threshold(tokens[2], metric, text)
    options = _options([t.lower() for t in tokens[3:]], text)
    if options.window is None:
        raise _fail(text, "missing 'for DURATION' (the window), e.g. 'for 5m'")
    alpha = options.alpha
    if metric is Metric.CTR_DROP and alpha is None:
        alpha = 0.05
    if alpha is not None and metric is not Metric.CTR_DROP:
        raise _fail(text, "only ctr_drop takes 'p < ALPHA'")
    return Rule(text.strip(), metric, threshold, options.window, options.min_samples, options.action, alpha, feature)


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
        """The rules that check a shadow against its primary."""
        return tuple(r for r in self.rules if r.metric is Metric.SHADOW_DISAGREEMENT)

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

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (the rule lines as written)."""
        return {"rules": [r.text for r in self.rules], "at_least": self.at_least, "observe_only": self.observe_only}
