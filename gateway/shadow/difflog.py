"""The shadow diff log (JSON lines, rotated, bounded) and the kept inputs of divergent requests."""

from __future__ import annotations

import hashlib
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


def kept_name(request_id: str) -> str:
    """The file stem a request's inputs are kept under: its id when that is a safe file name.

    Any other id is cut to its safe characters plus `.` and a hash of the whole id, so two ids
    never share a file (a safe id has no `.`, so it cannot collide with a hashed name).
    """
    safe = "".join(c for c in request_id if c.isalnum() or c in "-_")[:80]
    if safe and safe == request_id:
        return safe
    return f"{safe or 'request'}.{hashlib.blake2b(request_id.encode(), digest_size=8).hexdigest()}"


class DivergentInputs:
    """Keeps the inputs (`.npz`) of the most divergent requests, at most `keep` files and `max_bytes`.

    A kept file replays with `np.load(path)` and a pinned Predict to each version. A request id
    offered again (a client retry) keeps one file: the inputs that diverged most.
    """

    def __init__(self, directory: Path, keep: int, max_bytes: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._keep = keep
        self._max_bytes = max_bytes
        self._heap: list[tuple[float, str, int]] = []  # (divergence, file stem, bytes), smallest first
        self._entries: dict[str, tuple[float, str, int]] = {}  # file stem -> its heap entry
        self._bytes = 0
        self._lock = threading.Lock()

    def offer(self, request_id: str, divergence: float, inputs: Mapping[str, np.ndarray]) -> bool:
        """Keep these inputs if they are among the most divergent; returns whether they were kept."""
        name = kept_name(request_id)
        with self._lock:
            old = self._entries.get(name)
            if old is not None and divergence <= old[0]:
                return False
            if old is None and len(self._heap) >= self._keep and divergence <= self._heap[0][0]:
                return False
            buffer = io.BytesIO()
            np.savez_compressed(buffer, **dict(inputs))  # type: ignore[arg-type]
            data = buffer.getvalue()
            if old is not None:  # rare (a retry): O(keep) is fine
                self._heap.remove(old)
                heapq.heapify(self._heap)
                self._bytes -= old[2]
            (self.directory / f"{name}.npz").write_bytes(data)
            entry = (divergence, name, len(data))
            heapq.heappush(self._heap, entry)
            self._entries[name] = entry
            self._bytes += len(data)
            while self._heap and (len(self._heap) > self._keep or self._bytes > self._max_bytes):
                _, evicted, size = heapq.heappop(self._heap)
                del self._entries[evicted]
                (self.directory / f"{evicted}.npz").unlink(missing_ok=True)
                self._bytes -= size
            return name in self._entries
