from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from gateway.clock import SimClock
from gateway.errors import ArtifactError, InvalidInput, NotReady
from gateway.registry import ModelRegistry, VersionState
from gateway.repository import ModelRepository, check_sha256, file_sha256
from testkit.gateways import MODELS


@pytest.fixture
def model_root(tmp_path: Path) -> Path:
    shutil.copytree(MODELS / "ctr-ranker", tmp_path / "ctr-ranker")
    return tmp_path


def test_manifest_artifact_and_verified_read(model_root: Path) -> None:
    repository = ModelRepository(model_root)
    artifact = repository.from_manifest("ctr-ranker", "1.12")
    assert artifact.path == "ctr-ranker/1.12/model.onnx"
    assert artifact.sha256 == file_sha256(model_root / artifact.path)
    assert repository.read_verified(artifact) == (model_root / artifact.path).read_bytes()


def test_changed_file_is_refused(model_root: Path) -> None:
    repository = ModelRepository(model_root)
    artifact = repository.from_manifest("ctr-ranker", "1.13")
    path = model_root / artifact.path
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(ArtifactError, match=r"has sha256 .* but ctr-ranker 1\.13 was registered with .* immutable"):
        repository.read_verified(artifact)


def test_registry_marks_refused_version_failed(model_root: Path) -> None:
    repository = ModelRepository(model_root)
    artifact = repository.from_manifest("ctr-ranker", "1.13")
    (model_root / artifact.path).write_bytes(b"not a model")
    registry = ModelRegistry(repository)
    with pytest.raises(ArtifactError):
        registry.load(artifact)
    assert registry.get("ctr-ranker", "1.13").state is VersionState.FAILED
    with pytest.raises(NotReady, match=r"ctr-ranker 1\.13 is failed, not ready"):
        registry.runnable("ctr-ranker", "1.13")


def test_unloadable_model_with_right_digest_is_refused(model_root: Path) -> None:
    path = model_root / "ctr-ranker" / "9.0" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(b"not an onnx model")
    repository = ModelRepository(model_root)
    artifact = repository.at_path("ctr-ranker", "9.0", "ctr-ranker/9.0/model.onnx", file_sha256(path))
    with pytest.raises(ArtifactError, match="onnxruntime cannot load this model"):
        ModelRegistry(repository).load(artifact)


def test_operator_digest_must_match_manifest(model_root: Path) -> None:
    with pytest.raises(ArtifactError, match=r"was expected; artifacts are immutable"):
        ModelRepository(model_root).at_path("ctr-ranker", "1.12", "ctr-ranker/1.12", "0" * 64)


def test_operator_path_to_file_or_directory(model_root: Path) -> None:
    repository = ModelRepository(model_root)
    digest = repository.from_manifest("ctr-ranker", "1.14").sha256
    by_dir = repository.at_path("ctr-ranker", "2.0", "ctr-ranker/1.14", digest)
    by_file = repository.at_path("ctr-ranker", "2.0", str(model_root / "ctr-ranker/1.14/model.onnx"), digest)
    assert by_dir.path == by_file.path == "ctr-ranker/1.14/model.onnx"
    with pytest.raises(ArtifactError, match="outside the model root"):
        repository.at_path("ctr-ranker", "2.0", "../../etc/passwd", digest)
    with pytest.raises(ArtifactError, match="does not exist"):
        repository.at_path("ctr-ranker", "2.0", "ctr-ranker/nope.onnx", digest)


def test_missing_version_and_manifest(model_root: Path) -> None:
    repository = ModelRepository(model_root)
    with pytest.raises(ArtifactError, match=r"no directory for ctr-ranker 9\.9"):
        repository.from_manifest("ctr-ranker", "9.9")
    (model_root / "ctr-ranker" / "1.12" / "manifest.yaml").unlink()
    with pytest.raises(ArtifactError, match=r"manifest\.yaml is missing"):
        repository.from_manifest("ctr-ranker", "1.12")


def test_manifest_cannot_point_outside_root(model_root: Path) -> None:
    manifest = model_root / "ctr-ranker" / "1.12" / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace("file: model.onnx", "file: ../../../etc/passwd"))
    with pytest.raises(ArtifactError, match="outside the model root"):
        ModelRepository(model_root).from_manifest("ctr-ranker", "1.12")


def test_check_sha256() -> None:
    assert check_sha256("A" * 64) == "a" * 64
    with pytest.raises(InvalidInput, match="64 hex characters"):
        check_sha256("abc")


def test_versions_load_side_by_side_and_warm(model_root: Path) -> None:
    repository = ModelRepository(model_root)
    clock = SimClock()
    registry = ModelRegistry(repository, clock=clock)
    for version in ("1.12", "1.13", "1.14"):
        clock.advance(60)
        started = time.perf_counter()
        snapshot = registry.load(repository.from_manifest("ctr-ranker", version))
        took = time.perf_counter() - started
        assert snapshot.state is VersionState.READY
        assert snapshot.loaded_at == clock.now  # when it became ready, on the registry's clock
        assert 0 < snapshot.load_seconds <= took  # the load's own duration, in seconds, within the call
    assert [v.version for v in registry.versions_of("ctr-ranker")] == ["1.12", "1.13", "1.14"]
    assert all(registry.is_ready("ctr-ranker", v) for v in ("1.12", "1.13", "1.14"))
