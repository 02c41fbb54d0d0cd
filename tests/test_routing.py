from __future__ import annotations

import math
from collections import Counter

import pytest

from gateway.errors import InvalidInput, NotFound
from gateway.routing import EndpointRoutes, ModelRef, RouteTable, RoutingReason, version_sort_key

VERSIONS = ("1.12", "1.13", "1.14")
LABELS = {"stable": "1.12", "canary": "1.13"}


def routes(weights: dict[str, int], labels: dict[str, str] | None = None) -> EndpointRoutes:
    return EndpointRoutes("ctr-ranker", VERSIONS, weights, LABELS if labels is None else labels)


def keys(n: int) -> list[str]:
    return [f"user-{i}" for i in range(n)]


def within_binomial(observed: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(observed - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_weighted_choice_over_100k_keys_is_within_statistical_bounds() -> None:
    r = routes({"1.12": 90, "1.13": 10})
    counts = Counter(r.choose(k).version for k in keys(100_000))
    assert set(counts) == {"1.12", "1.13"}
    assert within_binomial(counts["1.13"], 100_000, 0.10), counts


def test_three_way_split_is_within_bounds() -> None:
    r = routes({"1.12": 50, "1.13": 30, "1.14": 20})
    counts = Counter(r.choose(k).version for k in keys(100_000))
    for version, share in (("1.12", 0.5), ("1.13", 0.3), ("1.14", 0.2)):
        assert within_binomial(counts[version], 100_000, share), counts


def test_random_choice_without_key_follows_weights() -> None:
    r = routes({"1.12": 75, "1.13": 25})
    decisions = [r.choose("") for _ in range(40_000)]
    canary = sum(d.version == "1.13" for d in decisions)
    assert within_binomial(canary, 40_000, 0.25)
    assert {d.reason for d in decisions} == {RoutingReason.WEIGHT}


def test_sticky_same_key_same_arm_and_stable_across_rebuilds() -> None:
    first = routes({"1.12": 90, "1.13": 10})
    again = routes({"1.12": 90, "1.13": 10})
    for key in keys(2000):
        decision = first.choose(key)
        assert decision.reason is RoutingReason.STICKY
        assert first.choose(key) == decision
        assert again.choose(key) == decision


def test_bucket_depends_on_endpoint_name() -> None:
    a = EndpointRoutes("ranker-a", VERSIONS, {"1.12": 50, "1.13": 50}, LABELS)
    b = EndpointRoutes("ranker-b", VERSIONS, {"1.12": 50, "1.13": 50}, LABELS)
    same = sum(a.choose(k).version == b.choose(k).version for k in keys(10_000))
    assert within_binomial(same, 10_000, 0.5)


@pytest.mark.parametrize("ramp", [(5, 25, 50, 100), (1, 10, 90)])
def test_ramps_are_monotone(ramp: tuple[int, ...]) -> None:
    population = keys(50_000)
    on_canary: set[str] = set()
    for percent in ramp:
        r = routes({"1.12": 100 - percent, "1.13": percent})
        now = {k for k in population if r.choose(k).version == "1.13"}
        assert on_canary <= now, f"keys left the canary when it grew to {percent}%"
        assert within_binomial(len(now), len(population), percent / 100) or percent == 100
        on_canary = now


def test_ramp_of_newest_version_is_monotone_beside_a_fixed_third_arm() -> None:
    population = keys(20_000)
    previous: set[str] = set()
    for percent in (5, 25, 50):
        r = routes({"1.12": 90 - percent, "1.13": 10, "1.14": percent})
        now = {k for k in population if r.choose(k).version == "1.14"}
        assert previous <= now
        previous = now


def test_arm_names_use_labels() -> None:
    r = routes({"1.12": 50, "1.13": 25, "1.14": 25})
    arms = {r.choose(k).version: r.choose(k).arm for k in keys(500)}
    assert arms == {"1.12": "stable", "1.13": "canary", "1.14": "1.14"}


def test_pins_and_labels() -> None:
    r = routes({"1.12": 90, "1.13": 10})
    pinned = r.resolve(ModelRef.parse("ctr-ranker@1.14"), "user-1")
    assert (pinned.version, pinned.arm, pinned.reason) == ("1.14", "pinned", RoutingReason.PINNED)
    labelled = r.resolve(ModelRef.parse("ctr-ranker:canary"), "user-1")
    assert (labelled.version, labelled.arm, labelled.reason) == ("1.13", "pinned", RoutingReason.LABEL)
    # The Open Inference Protocol's model_version may name a label.
    assert r.resolve(ModelRef("ctr-ranker", version="stable"), "").version == "1.12"
    with pytest.raises(NotFound, match=r"no version '2.0'; versions: 1.12, 1.13, 1.14"):
        r.resolve(ModelRef.parse("ctr-ranker@2.0"), "")
    with pytest.raises(NotFound, match=r"no label 'beta'; labels: canary -> 1.13, stable -> 1.12"):
        r.resolve(ModelRef.parse("ctr-ranker:beta"), "")


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("ctr-ranker", ModelRef("ctr-ranker")),
        ("ctr-ranker@1.14", ModelRef("ctr-ranker", version="1.14")),
        ("ctr-ranker:canary", ModelRef("ctr-ranker", label="canary")),
    ],
)
def test_model_ref_parse(model: str, expected: ModelRef) -> None:
    assert ModelRef.parse(model) == expected


@pytest.mark.parametrize("model", ["", "ctr-ranker@", "ctr-ranker:"])
def test_model_ref_rejects_empty_parts(model: str) -> None:
    with pytest.raises(InvalidInput):
        ModelRef.parse(model)


@pytest.mark.parametrize(
    ("weights", "labels", "message"),
    [
        ({"1.12": 90, "1.13": 5}, LABELS, "weights sum to 95; they must sum to 100"),
        ({"1.12": 90, "2.0": 10}, LABELS, "version '2.0' is not a version of ctr-ranker"),
        ({"1.12": 110, "1.13": -10}, LABELS, "must be an integer percent from 0 to 100"),
        ({"1.12": 100}, {"stable": "9.9"}, "labels.stable: version '9.9' is not a version"),
        ({"1.12": 100}, {"Stable!": "1.12"}, "is not a valid label"),
    ],
)
def test_invalid_routes_are_refused_with_the_field(
    weights: dict[str, int], labels: dict[str, str], message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        routes(weights, labels)


def test_route_table_unknown_endpoint_lists_served_ones() -> None:
    table = RouteTable(1, {"ctr-ranker": routes({"1.12": 100})})
    with pytest.raises(NotFound, match="no endpoint 'nope'; served endpoints: ctr-ranker"):
        table.endpoint("nope")


def test_route_table_is_immutable() -> None:
    table = RouteTable(1, {"ctr-ranker": routes({"1.12": 100})})
    with pytest.raises(TypeError):
        table.endpoints["x"] = routes({"1.12": 100})  # type: ignore[index]
    with pytest.raises(TypeError):
        table.endpoint("ctr-ranker").weights["1.13"] = 5  # type: ignore[index]


def test_version_sort_is_natural() -> None:
    assert sorted(["1.10", "1.9", "1.12", "2.0", "1.9-rc1"], key=version_sort_key) == [
        "1.9",
        "1.9-rc1",
        "1.10",
        "1.12",
        "2.0",
    ]
