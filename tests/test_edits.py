"""The pure endpoint edits behind every admin change: what each does and what each refuses."""

from __future__ import annotations

import pytest

from gateway import edits
from gateway.config import BatchingConfig
from gateway.desired import DesiredState, EndpointState, diff
from gateway.errors import FailedPrecondition, NotFound
from gateway.faults import Fault
from gateway.repository import Artifact


def endpoint() -> EndpointState:
    artifacts = {v: Artifact("ranker", v, f"ranker/{v}/model.onnx", "0" * 64) for v in ("1", "2", "3")}
    return EndpointState(
        "ranker", artifacts, {"1": 90, "2": 10}, labels={"stable": "1", "canary": "2"}, shadows={"3": 5}
    )


def test_promote_makes_the_canary_stable_with_all_traffic() -> None:
    promoted = edits.promote(endpoint())
    assert dict(promoted.weights) == {"2": 100}
    assert dict(promoted.labels) == {"stable": "2"}


def test_rollback_without_a_version_goes_to_stable_and_keeps_labels() -> None:
    rolled = edits.all_traffic_to()(endpoint())
    assert dict(rolled.weights) == {"1": 100}
    assert dict(rolled.labels) == {"stable": "1", "canary": "2"}


def test_edits_naming_an_unknown_version_list_the_versions() -> None:
    for edit in (edits.set_weights({"9": 100}), edits.all_traffic_to("9"), edits.set_shadow("9", 5)):
        with pytest.raises(NotFound, match="versions: 1, 2, 3"):
            edit(endpoint())


def test_switch_labels_the_target_canary() -> None:
    switched = edits.switch_to("3")(endpoint())
    assert dict(switched.weights) == {"3": 100}
    assert switched.labels["canary"] == "3"


def test_removing_a_label_or_shadow_that_is_not_there_says_what_is() -> None:
    with pytest.raises(NotFound, match="labels: canary -> 2, stable -> 1"):
        edits.set_label("blue", "")(endpoint())
    with pytest.raises(NotFound, match="shadows: 3"):
        edits.set_shadow("2", 0)(endpoint())
    assert "3" not in edits.set_shadow("3", 0)(endpoint()).shadows


def test_a_fault_that_does_nothing_clears_the_fault() -> None:
    faulted = edits.set_fault("2", Fault(error_rate=0.5))(endpoint())
    assert faulted.faults["2"].error_rate == 0.5
    assert "2" not in edits.set_fault("2", Fault())(faulted).faults


@pytest.mark.parametrize(
    ("version", "reason"),
    [("1", "takes 90% of traffic"), ("3", "is a shadow"), ("2", "takes 10% of traffic")],
)
def test_a_version_in_use_cannot_be_removed(version: str, reason: str) -> None:
    with pytest.raises(FailedPrecondition, match=reason):
        edits.remove_version(version)(endpoint())


def test_a_labelled_version_without_traffic_cannot_be_removed_until_the_label_moves() -> None:
    ep = edits.set_weights({"1": 100})(endpoint())
    with pytest.raises(FailedPrecondition, match="target of label canary"):
        edits.remove_version("2")(ep)
    removed = edits.remove_version("2")(edits.set_label("canary", "")(ep))
    assert removed.versions == ("1", "3")


def test_restoring_a_revision_needs_its_versions_loaded() -> None:
    past = EndpointState("ranker", endpoint().artifacts, {"4": 100})
    with pytest.raises(FailedPrecondition, match="revision 7 sends traffic to ranker 4"):
        edits.restore(past, 7)(endpoint())
    restored = edits.restore(EndpointState("ranker", endpoint().artifacts, {"1": 50, "3": 50}), 7)(endpoint())
    assert dict(restored.weights) == {"1": 50, "3": 50}


def test_batching_and_runner_edits_round_trip_through_the_stored_form_and_diff() -> None:
    batching = BatchingConfig(max_batch_size=32, max_delay_ms=2, preferred_batch_sizes=(8, 16))
    before = DesiredState({"ranker": endpoint()})
    after = before.update("ranker", edits.set_batching(batching)).update("ranker", edits.set_runner("pool"))
    restored = DesiredState.from_json(after.to_json())
    assert restored == after
    assert restored.endpoints["ranker"].batching == batching
    assert [c.render() for c in diff(before, after)] == [
        "ranker batching max_batch_size: (none) -> 32",
        "ranker batching max_delay_ms: (none) -> 2.0",
        "ranker batching preferred_batch_sizes: (none) -> [8, 16]",
        'ranker runner: "auto" -> "pool"',
    ]
    off = after.update("ranker", edits.set_batching(None))
    assert off.endpoints["ranker"].batching is None
    # Revisions stored before batching existed read as batching off, runner auto.
    old = before.to_json().replace(',"batching":null,"runner":"auto"', "")
    assert '"runner"' not in old
    assert DesiredState.from_json(old) == before
