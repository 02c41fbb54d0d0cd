from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gateway.errors import ArtifactError, InvalidInput, NotReady
from gateway.registry import ModelRegistry, VersionState
from gateway.repository import ModelRepository, check_sha256, file_sha256
from tests.helpers import MODELS


@pytest.fixture
def model_root(tmp_path: Path) -> Path:
    shutil.copytree(MODELS / "ctr-ranker", tmp_path / "ctr-ranker")
    return tmp_path


def test_resolve_verifies_digest(model_root: Path) -> None:
    artifact = ModelRepository(model_root).resolve("ctr-ranker", "1.12")
    assert artifact.sha256 == file_sha256(model_root / "ctr-ranker" / "1.12" / "model.onnx")


def test_changed_file_is_refused(model_root: Path) -> None:
    path = model_root / "ctr-ranker" / "1.13" / "model.onnx"
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(ArtifactError, match=r"has sha256 .* but its manifest records .* immutable"):
        ModelRepository(model_root).resolve("ctr-ranker", "1.13")


def test_registry_marks_refused_version_failed(model_root: Path) -> None:
    path = model_root / "ctr-ranker" / "1.13" / "model.onnx"
    path.write_bytes(b"not a model")
    registry = ModelRegistry(ModelRepository(model_root))
    with pytest.raises(ArtifactError):
        registry.load("ctr-ranker", "1.13")
    assert registry.get("ctr-ranker", "1.13").state is VersionState.FAILED
    with pytest.raises(NotReady, match=r"ctr-ranker 1\.13 is failed, not ready"):
        registry.runnable("ctr-ranker", "1.13")


def test_expected_digest_must_match_manifest(model_root: Path) -> None:
    with pytest.raises(ArtifactError, match=r"was expected; artifacts are immutable"):
        ModelRepository(model_root).resolve("ctr-ranker", "1.12", expected_sha256="0" * 64)


def test_missing_version_and_manifest(model_root: Path) -> None:
    repository = ModelRepository(model_root)
    with pytest.raises(ArtifactError, match=r"no directory for ctr-ranker 9\.9"):
        repository.resolve("ctr-ranker", "9.9")
    (model_root / "ctr-ranker" / "1.12" / "manifest.yaml").unlink()
    with pytest.raises(ArtifactError, match=r"manifest\.yaml is missing"):
        repository.resolve("ctr-ranker", "1.12")


def test_manifest_cannot_point_outside_root(model_root: Path) -> None:
    manifest = model_root / "ctr-ranker" / "1.12" / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace("file: model.onnx", "file: ../../../etc/passwd"))
    with pytest.raises(ArtifactError, match="points outside the model root"):
        ModelRepository(model_root).resolve("ctr-ranker", "1.12")


def test_check_sha256() -> None:
    assert check_sha256("A" * 64) == "a" * 64
    with pytest.raises(InvalidInput, match="64 hex characters"):
        check_sha256("abc")


def test_versions_load_side_by_side_and_warm(model_root: Path) -> None:
    registry = ModelRegistry(ModelRepository(model_root))
    for version in ("1.12", "1.13", "1.14"):
        snapshot = registry.load("ctr-ranker", version)
        assert snapshot.state is VersionState.READY
        assert snapshot.load_seconds > 0
    assert [v.version for v in registry.versions_of("ctr-ranker")] == ["1.12", "1.13", "1.14"]
    assert all(registry.is_ready("ctr-ranker", v) for v in ("1.12", "1.13", "1.14"))
