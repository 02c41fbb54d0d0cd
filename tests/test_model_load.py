"""Model loads: refused over a size limit before reading, hashed in chunks, digest checked on dry runs too."""

from __future__ import annotations

import shutil
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gateway.errors import ArtifactError, TooLarge
from gateway.pb.gateway.v1 import admin_pb2 as pb
from gateway.repository import Artifact, ModelRepository, file_sha256
from testkit.gateways import MODELS, RunningGateway, running_gateway


@pytest.fixture
def model_root(tmp_path: Path) -> Path:
    shutil.copytree(MODELS / "ctr-ranker", tmp_path / "ctr-ranker")
    return tmp_path


def test_a_file_over_the_limit_is_refused_before_it_is_read(model_root: Path) -> None:
    huge = model_root / "huge.onnx"
    with huge.open("wb") as handle:
        handle.truncate(3 << 30)  # 3 GiB, sparse: reading it would take seconds and gigabytes
    repository = ModelRepository(model_root, max_model_bytes=1 << 20)
    artifact = Artifact("ctr-ranker", "9.9", "huge.onnx", "0" * 64)
    tracemalloc.start()
    try:
        with pytest.raises(TooLarge, match=r"3221225472 bytes.*at most 1048576"):
            repository.load_verified(artifact, lambda path: path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_files_are_hashed_in_chunks(model_root: Path) -> None:
    big = model_root / "big.bin"
    big.write_bytes(b"\x01" * (64 << 20))
    repository = ModelRepository(model_root)
    artifact = Artifact("ctr-ranker", "9.9", "big.bin", file_sha256(big))
    tracemalloc.start()
    try:
        assert repository.load_verified(artifact, lambda path: path) == big
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # not the 64 MiB file


def test_a_file_changed_while_loading_is_refused(model_root: Path) -> None:
    repository = ModelRepository(model_root)
    artifact = repository.from_manifest("ctr-ranker", "1.13")

    def swap_then_load(path: Path) -> Path:
        path.write_bytes(path.read_bytes() + b"\x00")  # fault injection: the file changes after hashing
        return path

    with pytest.raises(ArtifactError, match="changed while"):
        repository.load_verified(artifact, swap_then_load)


@pytest.fixture
def small_limit(tmp_path: Path) -> Iterator[RunningGateway]:
    root = tmp_path / "models"
    shutil.copytree(MODELS / "ctr-ranker", root / "ctr-ranker")
    (root / "big.onnx").write_bytes(b"\x00" * (256 << 10))
    with running_gateway(model_root=root, settings={"max_model_bytes": 128 << 10}) as running:
        yield running


def test_load_version_over_the_limit_is_resource_exhausted(small_limit: RunningGateway) -> None:
    request = pb.LoadVersionRequest(
        endpoint="ctr-ranker", version="9.9", path="big.onnx", sha256="0" * 64, reason="too big"
    )
    for dry_run in (True, False):
        request.dry_run = dry_run
        with pytest.raises(grpc.RpcError) as err:
            small_limit.admin("LoadVersion", request)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
        assert "max_model_bytes" in err.value.details()


def test_a_dry_run_checks_the_digest(small_limit: RunningGateway) -> None:
    request = pb.LoadVersionRequest(
        endpoint="ctr-ranker",
        version="9.9",
        path="ctr-ranker/1.12/model.onnx",
        sha256="0" * 64,
        reason="wrong digest",
        dry_run=True,
    )
    with pytest.raises(grpc.RpcError) as err:
        small_limit.admin("LoadVersion", request)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
    assert "sha256" in err.value.details()
