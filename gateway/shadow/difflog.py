"""The shadow diff log (JSON lines, rotated, bounded), its counts log, and the kept inputs of divergent requests.

`shadow-diffs.jsonl` has one line per compared request; `shadow-counts.jsonl` one line per
shadow and minute with what happened to its copies (mirrored, compared, dropped, failed by
code). Together they are the shadow's recorded history: a restarted gateway reads them back
(`read_history`), so its reports cover the time before the restart.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import logging
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gateway.shadow.stats import ComparisonRecord, Counts

log = logging.getLogger(__name__)

DIFF_LOG = "shadow-diffs.jsonl"
COUNTS_LOG = "shadow-counts.jsonl"


class DiffLog:
    """JSON lines in `directory/name`; rotates at `max_bytes`, keeps `backups` old files.

    At most `max_bytes x (backups + 1)` bytes on disk (plus one line). Lines are buffered and
    flushed once per batch of comparisons.
    """

    def __init__(self, directory: Path, max_bytes: int, backups: int, name: str = DIFF_LOG) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.path = directory / name
        self._max_bytes = max_bytes
        self._backups = backups
        self._lock = threading.Lock()
        self._file = self.path.open("a", buffering=1 << 16)
        self._size = self.path.stat().st_size

    def _rotate(self) -> None:
        self._file.close()
        for index in range(self._backups - 1, 0, -1):
            older = self.path.with_name(f"{self.name}.{index}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.name}.{index + 1}"))
        if self._backups:
            self.path.replace(self.path.with_name(f"{self.name}.1"))
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


def counts_line(endpoint: str, version: str, minute: int, counts: Counts) -> str:
    """One line of the counts log."""
    return json.dumps(
        {
            "minute": minute * 60,
            "endpoint": endpoint,
            "shadow_version": version,
            "mirrored": counts.mirrored,
            "compared": counts.compared,
            "dropped": counts.dropped,
            "errors": counts.errors,
        },
        separators=(",", ":"),
    )


@dataclass
class History:
    """A shadow's recorded history, read back from the logs."""

    minutes: dict[int, Counts] = field(default_factory=dict)
    records: list[ComparisonRecord] = field(default_factory=list)


def _oldest_first(directory: Path, name: str) -> list[Path]:
    rotated = sorted(directory.glob(f"{name}.*"), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    current = directory / name
    return [p for p in rotated if p.suffix[1:].isdigit()] + ([current] if current.exists() else [])


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def _record(line: dict[str, object]) -> ComparisonRecord:
    outputs = line.get("outputs") or []
    assert isinstance(outputs, list)
    return ComparisonRecord(
        at=float(line["ts"]),  # type: ignore[arg-type]
        request_id=str(line["request_id"]),
        primary_version=str(line["primary_version"]),
        max_abs=max((_number(o.get("max_abs")) for o in outputs), default=math.nan),
        mean_abs=max((_number(o.get("mean_abs")) for o in outputs), default=math.nan),
        max_rel=max((_number(o.get("max_rel")) for o in outputs), default=math.nan),
        rows=int(line.get("rows", 0)),  # type: ignore[call-overload]
        agree=int(line.get("agree", 0)),  # type: ignore[call-overload]
        primary_seconds=_number(line.get("primary_ms")) / 1000,
        shadow_seconds=_number(line.get("shadow_ms")) / 1000,
    )


def read_history(directory: Path, since: float, records: int) -> dict[tuple[str, str], History]:
    """Each shadow's counts per minute and newest `records` comparisons since `since`, from the logs.

    Unreadable lines (a line cut by a crash) are skipped and counted in one warning.
    """
    history: dict[tuple[str, str], History] = {}
    skipped = 0
    for path in _oldest_first(directory, COUNTS_LOG):
        for text in path.read_text(errors="replace").splitlines():
            try:
                line = json.loads(text)
                if line["minute"] < since - 60:
                    continue
                counts = Counts(line["mirrored"], line["dropped"], line["compared"], dict(line["errors"]))
                item = history.setdefault((line["endpoint"], line["shadow_version"]), History())
                item.minutes.setdefault(int(line["minute"]) // 60, Counts()).add(counts)
            except (ValueError, KeyError, TypeError):
                skipped += 1
    for path in _oldest_first(directory, DIFF_LOG):
        for text in path.read_text(errors="replace").splitlines():
            try:
                line = json.loads(text)
                if line["ts"] < since:
                    continue
                item = history.setdefault((line["endpoint"], line["shadow_version"]), History())
                item.records.append(_record(line))
            except (ValueError, KeyError, TypeError, AssertionError):
                skipped += 1
    for item in history.values():
        item.records = item.records[-records:]
    if skipped:
        log.warning("shadow history: skipped %d unreadable lines in %s", skipped, directory)
    return history


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
