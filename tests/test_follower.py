"""StoreFollower in-process: two gateways on one store, the second following the first's commits."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from gateway.errors import NotFound, StoreUnavailable
from gateway.repository import file_sha256
from gateway.state import Revision
from testkit.fleet import wait_until
from tests.test_control import make_gateway, model_root, weights

__all__ = ["model_root"]


def test_a_follower_installs_what_another_process_commits(model_root: Path, tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    writer, follower = make_gateway(model_root, db), make_gateway(model_root, db)
    seen: list[int] = []
    follower.control.on_change(lambda revision, _state: seen.append(revision))
    follower.follower.start()
    try:
        writer.control.set_traffic("a", "ctr-ranker", {"1.12": 70, "1.13": 30}, reason="ramp")
        writer.control.set_label("a", "ctr-ranker", "candidate", "1.14", reason="label")
        assert wait_until(lambda: follower.router.table.revision == 3)
        assert weights(follower) == {"1.12": 70, "1.13": 30}
        assert follower.router.table.endpoint("ctr-ranker").labels["candidate"] == "1.14"
        assert seen and seen[-1] == 3 and seen == sorted(seen)  # listeners (telemetry, faults, health) ran
        assert follower.control.routes_at()[1] == writer.control.routes_at()[1]  # the commit time travels too
    finally:
        follower.close()
        writer.close()


def test_a_version_unloaded_elsewhere_is_unloaded_here(model_root: Path, tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    writer, follower = make_gateway(model_root, db), make_gateway(model_root, db)
    follower.follower.start()
    try:
        assert follower.registry.is_ready("ctr-ranker", "1.14")
        writer.control.unload_version("a", "ctr-ranker", "1.14", reason="retire")
        assert wait_until(lambda: follower.router.table.revision == 2)
        with pytest.raises(NotFound):
            follower.registry.get("ctr-ranker", "1.14")
    finally:
        follower.close()
        writer.close()


def test_a_revision_whose_new_version_cannot_load_here_keeps_the_old_routes(model_root: Path, tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    writer, follower = make_gateway(model_root, db), make_gateway(model_root, db)
    try:
        extra = model_root / "extra.onnx"
        shutil.copy(model_root / "ctr-ranker/1.14/model.onnx", extra)
        writer.control.load_version("a", "ctr-ranker", "1.15", str(extra), file_sha256(extra), reason="new")
        writer.control.set_traffic("a", "ctr-ranker", {"1.12": 90, "1.15": 10}, reason="canary")
        extra.unlink()  # this host lacks the artifact
        latest = writer.store.latest()
        assert isinstance(latest, Revision) and latest.revision == 3
        assert follower.control.follow(latest) is False
        assert follower.router.table.revision == 1 and weights(follower) == {"1.12": 90, "1.13": 10}
        assert follower.follower.step() is False  # the follower backs off and tries again later
    finally:
        follower.close()
        writer.close()


class _LostStore:
    """Fault injection: a store whose every wait fails as an unreachable one does."""

    url = "etcd://127.0.0.1:9/lost"

    def wait_for_change(self, after: int, timeout: float, stop: threading.Event) -> list[Revision]:
        raise StoreUnavailable(f"the state store {self.url} is unreachable")


def test_a_lost_store_is_reported_and_the_routes_stay(model_root: Path, tmp_path: Path) -> None:
    gateway = make_gateway(model_root, tmp_path / "state.db")
    real = gateway.follower._store
    try:
        gateway.follower._store = _LostStore()  # type: ignore[assignment]
        assert gateway.follower.step() is False
        status = gateway.control.health.status
        assert not status.connected and "is unreachable" in status.error
        assert gateway.router.table.revision == 1
        gateway.follower._store = real
        assert gateway.follower.step() is True
        assert gateway.control.health.status.connected
    finally:
        gateway.follower._store = real
        gateway.close()
