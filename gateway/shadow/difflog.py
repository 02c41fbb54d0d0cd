"""The shadow diff log (JSON lines, rotated, bounded) and the kept inputs of divergent requests."""

from __future__ import annotations

import heapq
import io
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np

DIFF_LOG = "shadow-diffs.jsonl"


class DiffLog:
    """One JSON line per compared request; rotates at `max_bytes`, keeps `backups` old files.

    At most `max_bytes x (backups + 1)` bytes on disk (plus one line). Lines are buffered and
    flushed once per batch of comparisons.
    """

    def __init__(self, directory: Path, max_bytes: int, backups: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / DIFF_LOG
        self._max_bytes = max_bytes
        self._backups = backups
        self._lock = threading.Lock()
        self._file = self.path.open("a", buffering=1 << 16)
        self._size = self.path.stat().st_size

    def _rotate(self) -> None:
        self._file.close()
        for index in range(self._backups - 1, 0, -1):
            older = self.path.with_name(f"{DIFF_LOG}.{index}")
            if older.exists():
                older.replace(self.path.with_name(f"{DIFF_LOG}.{index + 1}"))
        if self._backups:
            self.path.replace(self.path.with_name(f"{DIFF_LOG}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self._file = self.path.open("a", buffering=1 << 16)
        self._size = 0

    def write_many(self, lines: list[str]) -> None:
        """Append JSON lines (without their newline) and flush."""
        with self._lock:
            for line in lines:
                text = line + "\n"
                if self._size + len(text) > self._max_bytes and self._size:
                    self._rotate()
                self._file.write(text)
                self._size += len(text)
            self._file.flush()

    def close(self) -> None:
        """Flush and close the file."""
        with self._lock:
            self._file.close()


class DivergentInputs:
    """Keeps the inputs (`.npz`) of the most divergent requests, at most `keep` files and `max_bytes`.

    A kept file replays with `np.load(path)` and a pinned Predict to each version.
    """

    def __init__(self, directory: Path, keep: int, max_bytes: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._keep = keep
        self._max_bytes = max_bytes
        self._heap: list[tuple[float, str, int]] = []  # (divergence, request id, bytes), smallest first
        self._bytes = 0
        self._lock = threading.Lock()

    def offer(self, request_id: str, divergence: float, inputs: Mapping[str, np.ndarray]) -> bool:
        """Keep these inputs if they are among the most divergent; returns whether they were kept."""
        with self._lock:
            if len(self._heap) >= self._keep and divergence <= self._heap[0][0]:
                return False
            buffer = io.BytesIO()
            np.savez_compressed(buffer, **dict(inputs))  # type: ignore[arg-type]
            data = buffer.getvalue()
            safe_id = "".join(c for c in request_id if c.isalnum() or c in "-_")[:80] or "request"
            (self.directory / f"{safe_id}.npz").write_bytes(data)
            heapq.heappush(self._heap, (divergence, safe_id, len(data)))
            self._bytes += len(data)
            while self._heap and (len(self._heap) > self._keep or self._bytes > self._max_bytes):
                _, evicted, size = heapq.heappop(self._heap)
                (self.directory / f"{evicted}.npz").unlink(missing_ok=True)
                self._bytes -= size
            return any(entry[1] == safe_id for entry in self._heap)

    def kept(self) -> list[str]:
        """Request ids kept, most divergent first."""
        with self._lock:
            return [entry[1] for entry in sorted(self._heap, reverse=True)]
