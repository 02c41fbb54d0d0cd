"""`StoreFollower`: keeps one process on the store's newest revision.

Every process sharing a store (the workers of `gateway serve --workers N`, the replicas on
other hosts) runs one. It waits on the store from the revision its process serves; when
another process commits, the store answers with the new revisions and the follower installs
the newest through the control plane (a route-table swap, like a local change). A process's
own commits are installed by its control plane already, so the follower skips them.

Fail static: when the store cannot be reached the follower reports it (the control plane's
`StoreHealth`, which feeds a metric and `gateway admin routes`), keeps the routes it has, and
retries with backoff; the first answer after the outage carries every revision committed
meanwhile, so it catches up in one step.
"""

from __future__ import annotations

import logging
import threading

from gateway.errors import StoreUnavailable
from gateway.replica import RouteReplica

log = logging.getLogger(__name__)


class StoreFollower:
    """Owns the thread that waits on the store and installs what other processes commit."""

    def __init__(
        self,
        control: RouteReplica,
        *,
        wait_seconds: float = 30.0,
        retry_seconds: float = 0.1,
        max_retry_seconds: float = 2.0,
    ) -> None:
        self._control = control
        self._store = control.store
        #: The longest one wait lasts before it is renewed (bounds how long a silent, dead connection goes unnoticed).
        self.wait_seconds = wait_seconds
        self.retry_seconds = retry_seconds
        self.max_retry_seconds = max_retry_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Follow in a background thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="store-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop following; wakes a wait in progress."""
        self._stop.set()
        self._store.wake()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _run(self) -> None:
        delay = self.retry_seconds
        while not self._stop.is_set():
            if self.step():
                delay = self.retry_seconds
                continue
            self._stop.wait(delay)
            delay = min(delay * 2, self.max_retry_seconds)

    def step(self) -> bool:
        """Wait once and install what came; False when the store failed or a revision could not be served."""
        health = self._control.health
        # While the store is lost, wait briefly: the first answer then says at once that it is back.
        timeout = self.wait_seconds if health.status.connected else self.retry_seconds
        try:
            revisions = self._store.wait_for_change(self._control.revision, timeout, self._stop)
        except StoreUnavailable as err:
            if not self._stop.is_set():
                if health.status.connected:
                    log.warning("%s; serving revision %d until it is back", err.message, self._control.revision)
                health.lost(err.message)
            return False
        except Exception:
            log.exception("following the store failed; retrying")
            return False
        if not health.status.connected:
            log.warning("the state store %s is reachable again", self._store.url)
        health.reached()
        newest = revisions[-1] if revisions else None
        if newest is None or newest.revision <= self._control.revision:
            return True
        return self._control.follow(newest) or newest.revision <= self._control.revision
