"""`Drain`: a listener's calls in flight, and its refusal of new calls while it shuts down.

gRPC's own shutdown cancels the calls it has received but not yet handed to the server
(they reach the client as CANCELLED, which clients do not retry). So the listener drains
first: it refuses new calls with UNAVAILABLE (which clients retry elsewhere), lets the calls
in flight finish, and only asks gRPC to stop once no call has arrived for a short while.
"""

from __future__ import annotations

import asyncio
import logging
import time

from gateway.errors import NotReady

log = logging.getLogger(__name__)

#: Seconds without a new call after which the clients are taken to have gone elsewhere.
QUIET_SECONDS = 0.25


class Drain:
    """Counts a listener's calls in flight; once `closing`, new calls are refused (one event loop owns it)."""

    def __init__(self) -> None:
        self.active = 0
        self.closing = False
        self.refused = 0
        self._last_refused = 0.0

    def refuse(self) -> NotReady:
        """The error for a call that arrives while the listener drains (UNAVAILABLE: retry elsewhere)."""
        self.refused += 1
        self._last_refused = time.monotonic()
        return NotReady("the gateway is shutting down; retry on another instance")

    async def drain(self, grace: float) -> bool:
        """Refuse new calls, then wait (at most `grace` seconds) for calls in flight and new arrivals to stop.

        True when the listener went idle within the grace period.
        """
        self.closing = True
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            quiet = time.monotonic() - self._last_refused >= QUIET_SECONDS
            if self.active == 0 and quiet:
                log.info("drained: no call in flight; %d new calls refused meanwhile", self.refused)
                return True
            await asyncio.sleep(0.02)
        if self.active:
            log.warning("grace period over with %d calls in flight; they are cancelled", self.active)
        return self.active == 0
