"""The kept inputs of divergent requests: one file per request id, and the files are what is counted."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from gateway.shadow.difflog import DivergentInputs, kept_name


def inputs(seed: int) -> dict[str, np.ndarray]:
    return {"features": np.random.default_rng(seed).normal(size=(1, 32)).astype(np.float32)}


def npz_size(arrays: dict[str, np.ndarray]) -> int:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    return len(buffer.getvalue())


def files(directory: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.load(p)["features"] for p in sorted(directory.glob("*.npz"))}


def test_a_repeated_request_id_keeps_one_file_with_the_most_divergent_inputs(tmp_path: Path) -> None:
    first, retry, other = inputs(1), inputs(2), inputs(3)
    size = max(npz_size(a) for a in (first, retry, other))
    keep = DivergentInputs(tmp_path / "kept", keep=3, max_bytes=2 * size + size // 2)  # room for two files
    assert keep.offer("retry-1", 0.9, first)
    assert not keep.offer("retry-1", 0.1, retry)  # the retry diverged less: the first inputs stay
    assert keep.offer("other", 0.5, other)  # evicts nothing: one entry per id, and its bytes counted once
    kept = files(tmp_path / "kept")
    assert sorted(kept) == ["other", "retry-1"]
    np.testing.assert_array_equal(kept["retry-1"], first["features"])
    assert keep.offer("retry-1", 2.0, retry)  # diverged more this time: its inputs replace the older ones
    kept = files(tmp_path / "kept")
    assert sorted(kept) == ["other", "retry-1"]
    np.testing.assert_array_equal(kept["retry-1"], retry["features"])
    assert keep.offer("third", 0.7, inputs(4))  # the least divergent ("other", 0.5) goes
    assert sorted(files(tmp_path / "kept")) == ["retry-1", "third"]


def test_ids_that_sanitise_alike_get_their_own_files(tmp_path: Path) -> None:
    keep = DivergentInputs(tmp_path, keep=5, max_bytes=10**9)
    ids = ["ab", "a.b", "a/b", "a b", "x" * 100, "x" * 101, "ü"]
    for i, request_id in enumerate(ids):
        assert keep.offer(request_id, 0.1 + i / 100, inputs(i))
    kept = files(tmp_path)
    assert len(kept) == 5  # the five most divergent, each in its own file
    assert set(kept) == {kept_name(r) for r in ids[2:]}
    assert kept_name("ab") == "ab" and kept_name("a.b").startswith("ab.") and kept_name("a.b") != kept_name("a/b")
    for i, request_id in enumerate(ids[2:], start=2):
        np.testing.assert_array_equal(kept[kept_name(request_id)], inputs(i)["features"])
    assert keep.offer("a.b", 1.0, inputs(9))  # back, and "ab" (also kept once) did not take its place
    assert kept_name("a.b") in files(tmp_path) and len(files(tmp_path)) == 5
