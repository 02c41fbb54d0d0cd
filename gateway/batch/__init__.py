"""Batch predictions: versioned, immutable outputs behind a read pointer.

Consumers read `read_current(endpoint)`; the pointer only moves when validation gates pass
(or an operator forces it, audited), and `freeze` / `rollback` repoint it in one step.
"""

from __future__ import annotations

from pathlib import Path

from gateway.state import DEFAULT_STORE_URL


def read_current(endpoint: str, store_url: str = DEFAULT_STORE_URL) -> Path:
    """The directory of the endpoint's published batch run (what consumers should read)."""
    from gateway.batch.pointer import BatchPointers
    from gateway.state import open_store

    store = open_store(store_url)
    try:
        path: Path = BatchPointers(store).current(endpoint).path
        return path
    finally:
        store.close()
