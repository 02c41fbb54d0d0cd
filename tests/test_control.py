"""The control plane with its real parts: SQLite store, registry, onnxruntime models."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.desired import parse_route_file
from gateway.errors import AlreadyExists, Conflict, FailedPrecondition, InvalidInput, NotFound
from gateway.repository import file_sha256
from gateway.state.sqlite import SqliteStore
from testkit.gateways import MODELS, config_text


@pytest.fixture
def model_root(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    shutil.copytree(MODELS / "ctr-ranker", root / "ctr-ranker")
    return root


def make_gateway(model_root: Path, db: Path, text: str | None = None) -> Gateway:
    config = parse_route_file(text or config_text(), base_dir=model_root)
    config = config.model_copy(update={"model_root": model_root})
    gateway = Gateway(config, SqliteStore(db), config_source="test.yaml")
    gateway.start()
    return gateway


@pytest.fixture
def gateway(model_root: Path, tmp_path: Path) -> Iterator[Gateway]:
    gw = make_gateway(model_root, tmp_path / "state.db")
    yield gw
    gw.close()


def weights(gw: Gateway, endpoint: str = "ctr-ranker") -> dict[str, int]:
    return dict(gw.router.table.endpoint(endpoint).weights)


def test_seed_then_store_is_the_truth(model_root: Path, tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    first = make_gateway(model_root, db)
    assert first.router.table.revision == 1
    first.control.set_traffic("oncall", "ctr-ranker", {"1.12": 50, "1.13": 50}, reason="ramp")
    first.close()
    # A different route file no longer matters: the store holds revision 2.
    second = make_gateway(model_root, db, config_text(traffic='{"1.12": 100}'))
    assert second.router.table.revision == 2
    assert weights(second) == {"1.12": 50, "1.13": 50}
    seed = second.control.audit()[-1]
    assert (seed.action, seed.actor, seed.revision_after, seed.reason) == (
        "seed",
        "system",
        1,
        "seeded from test.yaml",
    )
    second.close()


def test_set_traffic_commits_revision_diff_and_audit(gateway: Gateway) -> None:
    result = gateway.control.set_traffic("oncall", "ctr-ranker", {"1.12": 75, "1.13": 25}, reason="ramp to 25")
    assert result.revision == 2 and not result.dry_run
    assert [c.render() for c in result.changes] == [
        "ctr-ranker traffic 1.12: 90 -> 75",
        "ctr-ranker traffic 1.13: 10 -> 25",
    ]
    assert gateway.router.table.revision == 2
    assert weights(gateway) == {"1.12": 75, "1.13": 25}
    entry = gateway.control.audit("ctr-ranker")[0]
    assert (entry.actor, entry.action, entry.reason, entry.revision_before, entry.revision_after) == (
        "oncall",
        "set-traffic",
        "ramp to 25",
        1,
        2,
    )
    assert entry.changes == [c.to_dict() for c in result.changes]


def test_dry_run_changes_nothing_and_is_recorded(gateway: Gateway) -> None:
    before = gateway.router.table
    result = gateway.control.set_traffic("ci", "ctr-ranker", {"1.12": 0, "1.14": 100}, reason="try", dry_run=True)
    assert result.dry_run and result.revision == 1
    assert result.changes[0].render() == "ctr-ranker traffic 1.12: 90 -> 0"
    assert gateway.router.table is before
    assert gateway.store.latest().revision == 1  # type: ignore[union-attr]
    entry = gateway.control.audit()[0]
    assert entry.dry_run and entry.revision_after == entry.revision_before == 1


@pytest.mark.parametrize(
    ("weights_", "error", "message"),
    [
        ({"1.12": 90, "1.13": 20}, InvalidInput, "weights sum to 110; they must sum to 100"),
        ({"1.12": 90, "2.0": 10}, NotFound, "has no version '2.0'; versions: 1.12, 1.13, 1.14"),
    ],
)
def test_invalid_weights_are_refused(gateway: Gateway, weights_: dict[str, int], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        gateway.control.set_traffic("oncall", "ctr-ranker", weights_, reason="x")
    assert gateway.router.table.revision == 1


def test_reason_is_required(gateway: Gateway) -> None:
    with pytest.raises(InvalidInput, match="reason is required"):
        gateway.control.rollback("oncall", "ctr-ranker", reason="  ")


def test_traffic_only_to_ready_versions(gateway: Gateway, model_root: Path) -> None:
    gateway.registry.unload("ctr-ranker", "1.14")
    (model_root / "ctr-ranker/1.14/model.onnx").write_bytes(b"tampered")
    with pytest.raises(Exception, match="the file changed"):
        gateway.registry.load(gateway.control.state.endpoint("ctr-ranker").artifacts["1.14"])
    with pytest.raises(FailedPrecondition, match=r"ctr-ranker 1\.14 is failed, not ready; it cannot take traffic"):
        gateway.control.set_traffic("oncall", "ctr-ranker", {"1.12": 90, "1.14": 10}, reason="x")
    with pytest.raises(FailedPrecondition, match="is failed, not ready"):
        gateway.control.switch("oncall", "ctr-ranker", "1.14", reason="x")


def test_rollback_default_named_and_revision(gateway: Gateway) -> None:
    control = gateway.control
    control.set_traffic("oncall", "ctr-ranker", {"1.12": 50, "1.13": 50}, reason="ramp")  # rev 2
    assert control.rollback("oncall", "ctr-ranker", reason="CTR drop").revision == 3
    assert weights(gateway) == {"1.12": 100}
    assert control.rollback("oncall", "ctr-ranker", reason="again").changes == []  # no-op, no revision
    assert gateway.router.table.revision == 3
    control.rollback("oncall", "ctr-ranker", to_version="1.14", reason="blue")
    assert weights(gateway) == {"1.14": 100}
    control.rollback("oncall", "ctr-ranker", to_revision=2, reason="back to the ramp")
    assert weights(gateway) == {"1.12": 50, "1.13": 50}
    with pytest.raises(InvalidInput, match="not earlier than the current revision"):
        control.rollback("oncall", "ctr-ranker", to_revision=99, reason="x")
    with pytest.raises(InvalidInput, match="not both"):
        control.rollback("oncall", "ctr-ranker", to_version="1.12", to_revision=1, reason="x")


def test_promote_and_labels(gateway: Gateway) -> None:
    control = gateway.control
    result = control.promote("oncall", "ctr-ranker", reason="canary healthy")
    assert weights(gateway) == {"1.13": 100}
    assert dict(gateway.router.table.endpoint("ctr-ranker").labels) == {"stable": "1.13"}
    assert 'ctr-ranker label stable: "1.12" -> "1.13"' in [c.render() for c in result.changes]
    with pytest.raises(NotFound, match="no label 'canary'"):
        control.promote("oncall", "ctr-ranker", reason="again")
    control.set_label("oncall", "ctr-ranker", "canary", "1.14", reason="next")
    assert gateway.router.table.endpoint("ctr-ranker").labels["canary"] == "1.14"
    control.set_label("oncall", "ctr-ranker", "canary", "", reason="remove")
    assert "canary" not in gateway.router.table.endpoint("ctr-ranker").labels


def test_switch_is_blue_green(gateway: Gateway) -> None:
    control = gateway.control
    control.switch("oncall", "ctr-ranker", "1.14", reason="green")
    assert weights(gateway) == {"1.14": 100}
    assert gateway.router.table.endpoint("ctr-ranker").labels["canary"] == "1.14"
    control.rollback("oncall", "ctr-ranker", reason="green is bad")
    assert weights(gateway) == {"1.12": 100}


def test_load_and_unload_at_run_time(gateway: Gateway, model_root: Path) -> None:
    new = model_root / "ctr-ranker" / "1.20" / "model.onnx"
    new.parent.mkdir()
    shutil.copy(model_root / "ctr-ranker/1.14/model.onnx", new)
    digest = file_sha256(new)
    control = gateway.control
    with pytest.raises(Exception, match="was registered with"):
        control.load_version("ci", "ctr-ranker", "1.20", "ctr-ranker/1.20/model.onnx", "a" * 64, reason="x")
    with pytest.raises(NotFound):
        gateway.registry.get("ctr-ranker", "1.20")  # a refused artifact leaves nothing behind
    result = control.load_version("ci", "ctr-ranker", "1.20", "ctr-ranker/1.20/model.onnx", digest, reason="new model")
    assert result.revision == 2
    assert gateway.registry.is_ready("ctr-ranker", "1.20")
    assert "1.20" in gateway.router.table.endpoint("ctr-ranker").versions
    info = {v.version: v for v in control.versions("ctr-ranker")}["1.20"]
    assert (info.state, info.sha256, info.traffic) == ("ready", digest, 0)
    with pytest.raises(FailedPrecondition, match="already has version 1.20"):
        control.load_version("ci", "ctr-ranker", "1.20", "ctr-ranker/1.20/model.onnx", digest, reason="again")
    control.set_traffic("ci", "ctr-ranker", {"1.12": 90, "1.20": 10}, reason="canary 1.20")
    with pytest.raises(FailedPrecondition, match="takes 10% of traffic"):
        control.unload_version("ci", "ctr-ranker", "1.20", reason="x")
    with pytest.raises(FailedPrecondition, match="is the target of label canary"):
        control.unload_version("ci", "ctr-ranker", "1.13", reason="x")
    control.unload_version("ci", "ctr-ranker", "1.14", reason="unused")
    assert "1.14" not in gateway.router.table.endpoint("ctr-ranker").versions
    with pytest.raises(NotFound):
        gateway.registry.get("ctr-ranker", "1.14")


def test_loaded_version_survives_restart(model_root: Path, tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    gw = make_gateway(model_root, db)
    path = model_root / "ctr-ranker" / "2.0"
    shutil.copytree(model_root / "ctr-ranker/1.14", path)
    digest = file_sha256(path / "model.onnx")
    gw.control.load_version("ci", "ctr-ranker", "2.0", "ctr-ranker/2.0", digest, reason="x")
    gw.control.set_traffic("ci", "ctr-ranker", {"1.12": 80, "2.0": 20}, reason="x")
    gw.close()
    again = make_gateway(model_root, db)
    assert weights(again) == {"1.12": 80, "2.0": 20}
    assert again.registry.is_ready("ctr-ranker", "2.0")
    again.close()


def test_apply_is_declarative(gateway: Gateway, model_root: Path) -> None:
    shutil.copytree(model_root / "ctr-ranker/1.14", model_root / "ctr-ranker/1.16")
    document = config_text(
        versions='["1.12", "1.13", "1.16"]',
        traffic='{"1.12": 70, "1.16": 30}',
        labels='{stable: "1.12", canary: "1.16"}',
    ).replace(f"model_root: {MODELS}", "model_root: .")
    dry = gateway.control.apply("ci", document, reason="release 1.16", dry_run=True)
    assert dry.dry_run and gateway.router.table.revision == 1
    with pytest.raises(NotFound):
        gateway.registry.get("ctr-ranker", "1.16")  # a dry run loads nothing
    result = gateway.control.apply("ci", document, reason="release 1.16")
    rendered = [c.render() for c in result.changes]
    assert "ctr-ranker traffic 1.16: (none) -> 30" in rendered
    assert any(r.startswith("ctr-ranker version 1.14:") and r.endswith("-> (none)") for r in rendered)
    assert weights(gateway) == {"1.12": 70, "1.16": 30}
    assert gateway.registry.is_ready("ctr-ranker", "1.16")
    with pytest.raises(NotFound):
        gateway.registry.get("ctr-ranker", "1.14")


def test_apply_refuses_a_changed_artifact_under_the_same_version(gateway: Gateway, model_root: Path) -> None:
    manifest = model_root / "ctr-ranker/1.13/manifest.yaml"
    lines = [
        ("sha256: " + "b" * 64) if line.startswith("sha256:") else line for line in manifest.read_text().splitlines()
    ]
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(FailedPrecondition, match="versions are immutable"):
        gateway.control.apply("ci", config_text().replace(f"model_root: {MODELS}", "model_root: ."), reason="x")


def test_compare_and_swap_between_two_writers(model_root: Path, tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    one = make_gateway(model_root, db)
    two = make_gateway(model_root, db)
    commit = two.store.commit

    def raced(*args, **kwargs):  # type: ignore[no-untyped-def]
        """Fault injection: the other writer commits between two's read and its compare-and-swap."""
        two.store.commit = commit  # type: ignore[method-assign]
        one.control.set_traffic("a", "ctr-ranker", {"1.12": 80, "1.13": 20}, reason="x")
        return commit(*args, **kwargs)

    two.store.commit = raced  # type: ignore[method-assign]
    with pytest.raises(Conflict, match=r"revision 2, expected 1"):
        two.control.set_traffic("b", "ctr-ranker", {"1.12": 70, "1.13": 30}, reason="y")
    # The losing writer now serves the winner's revision, so its retry commits on top of it.
    assert (two.router.table.revision, weights(two)) == (2, {"1.12": 80, "1.13": 20})
    assert two.control.set_traffic("b", "ctr-ranker", {"1.12": 70, "1.13": 30}, reason="y").revision == 3
    one.close()
    two.close()


def test_a_writer_behind_the_store_changes_the_newest_state(model_root: Path, tmp_path: Path) -> None:
    """A change through a process that has not yet followed another's commit builds on that commit."""
    db = tmp_path / "state.db"
    one = make_gateway(model_root, db)
    two = make_gateway(model_root, db)
    one.control.set_traffic("a", "ctr-ranker", {"1.12": 80, "1.13": 20}, reason="x")
    assert two.router.table.revision == 1  # no follower running: two is behind
    result = two.control.set_label("b", "ctr-ranker", "candidate", "1.14", reason="y")
    assert result.revision == 3
    assert weights(two) == {"1.12": 80, "1.13": 20}  # one's change kept, not overwritten from stale state
    one.close()
    two.close()


def test_a_shadow_that_failed_to_load_cannot_take_live_traffic(model_root: Path, tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    make_gateway(model_root, db, config_text(shadows='{"1.14": 50}')).close()
    (model_root / "ctr-ranker/1.14/model.onnx").write_bytes(b"tampered")
    gw = make_gateway(model_root, db)  # starts: a version that only shadows may fail to load
    with pytest.raises(FailedPrecondition, match=r"ctr-ranker 1\.14 is failed, not ready"):
        gw.control.set_traffic("oncall", "ctr-ranker", {"1.12": 90, "1.14": 10}, reason="x")
    assert weights(gw) == {"1.12": 90, "1.13": 10}
    gw.close()


def test_apply_keeps_a_version_loaded_by_path(gateway: Gateway, model_root: Path) -> None:
    new = model_root / "ctr-ranker" / "1.20" / "model.onnx"
    new.parent.mkdir()
    shutil.copy(model_root / "ctr-ranker/1.14/model.onnx", new)
    gateway.control.load_version("ci", "ctr-ranker", "1.20", str(new), file_sha256(new), reason="x")
    document = config_text(versions='["1.12", "1.13", "1.20"]', traffic='{"1.12": 90, "1.20": 10}')
    gateway.control.apply("ci", document.replace(f"model_root: {MODELS}", "model_root: ."), reason="canary 1.20")
    assert weights(gateway) == {"1.12": 90, "1.20": 10}
    assert gateway.registry.is_ready("ctr-ranker", "1.20")


def test_a_refused_duplicate_load_leaves_the_loaded_model_alone(gateway: Gateway, model_root: Path) -> None:
    new = model_root / "ctr-ranker" / "1.20" / "model.onnx"
    new.parent.mkdir()
    shutil.copy(model_root / "ctr-ranker/1.14/model.onnx", new)
    artifact = gateway.registry.repository.at_path("ctr-ranker", "1.20", str(new), file_sha256(new))
    gateway.registry.load(artifact)  # a concurrent LoadVersion of the same version got there first
    with pytest.raises(AlreadyExists):
        gateway.control.load_version("ci", "ctr-ranker", "1.20", str(new), file_sha256(new), reason="x")
    assert gateway.registry.is_ready("ctr-ranker", "1.20")


def test_audit_log_is_append_only(gateway: Gateway, tmp_path: Path) -> None:
    gateway.control.rollback("oncall", "ctr-ranker", reason="x")
    db = sqlite3.connect(tmp_path / "state.db")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE audit SET reason = 'nothing to see'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM audit")
    with pytest.raises(sqlite3.DatabaseError, match="immutable"):
        db.execute("UPDATE revisions SET document = '{}'")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
