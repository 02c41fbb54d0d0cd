"""`Fleet`: this process's place among the processes sharing one store: alive, and maybe the leader.

Every process joins the store as a member on a lease of `lease_seconds` (etcd: a lease; SQLite:
a row with an expiry) that a background thread renews, with the address the others reach it
at. The same thread bids for the guardian leader's lock each second; the lock lives as long
as its holder's membership, so when the leader dies (or is cut off from the store) its lease
runs out and the next bid of another process takes over: within `lease_seconds` and one bid.

A process believes it leads only until its last successful renewal's lease would run out
(`is_leader`); beyond that belief, the leader's writes are fenced (`fence()`): each one
commits only if the lock is still its own, checked in the write's own transaction.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass

from gateway.auth import FleetKey
from gateway.errors import GatewayError
from gateway.state import StateStore, fenced

log = logging.getLogger(__name__)

LEADER_LOCK = "guardian-leader"
#: How often a member bids for the lock (taking over a dead leader's lock waits at most this long after its lease).
BID_SECONDS = 1.0
DEFAULT_LEASE_SECONDS = 10.0
#: This process as operators see it (the admin API names it too).
PROCESS = f"{socket.gethostname()} pid {os.getpid()}"


@dataclass(frozen=True)
class Member:
    """One live gateway process as the store lists it."""

    id: str
    process: str
    #: HOST:PORT of its fleet listener ("" when it has none: it cannot be pulled from).
    address: str
    started: float

    def to_json(self) -> str:
        """The member's body in the store."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, member: str, body: str) -> Member:
        """A member from its store entry (an unreadable body is a member without an address)."""
        try:
            fields = json.loads(body)
            return cls(member, str(fields["process"]), str(fields["address"]), float(fields["started"]))
        except (ValueError, KeyError, TypeError):
            return cls(member, "(unreadable)", "", 0.0)


def load_fleet_key(store: StateStore, clock: Callable[[], float] = time.time) -> FleetKey:
    """The fleet's shared secret: made and stored by the first process, read by every other."""
    return FleetKey(bytes.fromhex(store.create_record("fleet", "key", secrets.token_hex(32), clock())))


class Fleet:
    """Owns this process's membership lease and its bid for the guardian leader's lock."""

    def __init__(
        self,
        store: StateStore,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        process: str = PROCESS,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self.lease_seconds = lease_seconds
        self.member_id = uuid.uuid4().hex[:12]
        self._process = process
        self._clock = clock
        self._monotonic = monotonic
        self.me: Member | None = None
        self._holder = ""
        self._lease_until = 0.0  # monotonic: our lease surely lives until then
        self._renewed = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost = ""

    # --- membership ----------------------------------------------------------------------------

    def start(self, address: str) -> None:
        """Join (reachable at `address`), bid once, and keep renewing and bidding in a background thread."""
        if self._thread is not None:
            return
        self.me = Member(self.member_id, self._process, address, self._clock())
        self._stop.clear()
        try:
            self.step()
        except GatewayError as err:  # no store now: the thread joins once it is back
            log.warning("not a fleet member yet: %s", err.message)
        self._thread = threading.Thread(target=self._run, name="fleet", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(min(BID_SECONDS, self.lease_seconds / 3)):
            try:
                self.step()
                if self._lost:
                    log.warning("fleet membership is back")
                self._lost = ""
            except GatewayError as err:
                if err.message != self._lost:
                    log.warning("fleet membership: %s", err.message)
                self._lost = err.message
            except Exception:  # the fleet thread must not die
                log.exception("fleet step failed")

    def step(self) -> None:
        """Renew the lease when due (join again when it ran out) and bid for the leader's lock."""
        assert self.me is not None, "start() first"
        began = self._monotonic()
        if began - self._renewed >= self.lease_seconds / 3 or began >= self._lease_until:
            if not self._store.renew(self.member_id):
                was = self._holder == self.member_id
                self._store.join(self.member_id, self.me.to_json(), self.lease_seconds)
                if was:
                    log.warning("the fleet lease of %s ran out; joined again", self.member_id)
            self._renewed = began
            self._lease_until = began + self.lease_seconds
        holder = self._store.acquire(LEADER_LOCK, self.member_id)
        if holder != self._holder:
            if holder == self.member_id:
                log.info("this process (%s) leads the guardian", self.member_id)
            elif self._holder == self.member_id:
                log.warning("this process no longer leads the guardian (%s does)", holder or "nobody")
        self._holder = holder

    def stop(self) -> None:
        """Stop renewing and leave (another process takes over the lock at its next bid)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self.me is not None:
            try:
                self._store.leave(self.member_id)
            except GatewayError as err:
                log.warning("leaving the fleet: %s (the lease runs out by itself)", err.message)
        self.me = None
        self._holder = ""

    # --- what it knows -------------------------------------------------------------------------

    def is_leader(self) -> bool:
        """Whether this process holds the leader's lock and its lease surely still lives."""
        return self._holder == self.member_id and self._monotonic() < self._lease_until

    @property
    def leader(self) -> str:
        """The member that held the lock at the last bid ("" when none)."""
        return self._holder

    def members(self) -> list[Member]:
        """Every live member, from the store."""
        return [Member.from_json(member, body) for member, body in self._store.members()]

    def fence(self) -> AbstractContextManager[None]:
        """Writes inside commit only while this process holds the leader's lock."""
        return fenced(LEADER_LOCK, self.member_id)
