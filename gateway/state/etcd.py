"""`EtcdStore`: desired state for many processes on many hosts, in etcd v3.

Keys under the store's prefix (default `/gateway`):

- `{prefix}/revisions/{revision:020d}`: one committed desired state, `{"at", "document"}`;
  written once and never changed, so compaction (which drops old versions of keys) never
  loses a revision, and zero padding makes key order revision order;
- `{prefix}/audit/{endpoint}/{uuid}`: one audit entry; its id is the etcd revision that
  created it (unique, increasing, assigned inside the same transaction);
- `{prefix}/records/{kind}/{key}`: a rollout's state, an incident, a batch read pointer; a
  record's version is its key's `mod_revision`, so a record swap compares that;
- `{prefix}/members/{member}`: one live process, on that process's lease (it keeps the lease
  alive; when the process dies the lease expires and etcd deletes the key);
- `{prefix}/locks/{lock}`: who holds a lock (the guardian leader), on the holder's lease, so a
  lock lives exactly as long as its holder's membership. Taking it is a transaction that
  succeeds only when the key does not exist; a fenced write compares its value in the same
  transaction as the write.

A change is one etcd transaction: compare (revision N exists, N+1 does not), then put
revision N+1 and its audit entry together; the failure branch reads the newest revision,
so a Conflict says which one won. Followers range over revisions newer than theirs and,
when there are none, watch the revisions prefix from the etcd revision that range saw: a
change committed in between is never missed, and when etcd has compacted that history
the next range reads the current state again.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, unquote

from gateway.errors import Conflict, NotFound, StoreUnavailable
from gateway.state import (
    AuditDraft,
    AuditEntry,
    RecordSwap,
    Revision,
    current_fence,
    lock_lost,
    pending_swap,
    record_changed,
)
from gateway.state.etcd_client import Compacted, EtcdClient, EtcdSettings, decode, encode, prefix_end

_KEY_WIDTH = 20
#: Most revisions one follower read returns; a follower far behind installs the newest anyway.
_CATCH_UP_LIMIT = 100
#: etcd refuses leases shorter than about 1.5 s (its election timeout); shorter ones are raised to this.
_MIN_LEASE_SECONDS = 2


class EtcdStore:
    """Desired-state revisions, the audit log and records under one prefix of an etcd cluster."""

    def __init__(self, client: EtcdClient) -> None:
        self._client = client
        self.url = client.url
        prefix = client.settings.prefix
        self._revisions = f"{prefix}/revisions/"
        self._audit = f"{prefix}/audit/"
        self._records = f"{prefix}/records/"
        self._members = f"{prefix}/members/"
        self._locks = f"{prefix}/locks/"
        self._leases: dict[str, str] = {}  # member -> its etcd lease id

    @classmethod
    def from_url(cls, url: str, environ: Mapping[str, str]) -> EtcdStore:
        """Connect lazily: the first call reaches the cluster (raises InvalidInput for a bad URL)."""
        return cls(EtcdClient(EtcdSettings.from_url(url, environ)))

    # --- revisions ---------------------------------------------------------------------------

    def _revision_key(self, revision: int) -> str:
        return f"{self._revisions}{revision:0{_KEY_WIDTH}d}"

    def _revision(self, kv: Mapping[str, Any]) -> Revision:
        body = json.loads(decode(kv["value"]))
        return Revision(int(decode(kv["key"]).removeprefix(self._revisions)), body["at"], body["document"])

    def _newest(self, limit: int) -> dict[str, Any]:
        return {
            "key": encode(self._revisions),
            "range_end": encode(prefix_end(self._revisions)),
            "sort_order": "DESCEND",
            "sort_target": "KEY",
            "limit": str(limit),
        }

    def latest(self) -> Revision | None:
        """The newest revision, or None."""
        kvs = self._client.call("/v3/kv/range", self._newest(1)).get("kvs", [])
        return self._revision(kvs[0]) if kvs else None

    def get_revision(self, revision: int) -> Revision:
        """One revision."""
        kvs = self._client.call("/v3/kv/range", {"key": encode(self._revision_key(revision))}).get("kvs", [])
        if not kvs:
            newest = self.latest()
            raise NotFound(f"no revision {revision}; revisions run from 1 to {newest.revision if newest else 0}")
        return self._revision(kvs[0])

    def revisions(self, limit: int = 50) -> list[Revision]:
        """Newest first."""
        return [self._revision(kv) for kv in self._client.call("/v3/kv/range", self._newest(limit)).get("kvs", [])]

    def commit(self, expected_revision: int, document: str, audit: AuditDraft) -> tuple[Revision, AuditEntry]:
        """Compare-and-swap the next revision and its audit entry in one etcd transaction."""
        revision = Revision(expected_revision + 1, audit.at, document)
        compare = [_absent(self._revision_key(revision.revision))]
        if expected_revision:
            compare.append(_present(self._revision_key(expected_revision)))
        audit_put, entry = self._audit_put(audit, revision.revision)
        answer = self._fenced_txn(
            [_put(self._revision_key(revision.revision), {"at": revision.at, "document": document}), audit_put],
            compare,
            [{"request_range": {**self._newest(1), "keys_only": True}}],
            swap=pending_swap(),
        )
        if not answer.get("succeeded"):
            kvs = answer["responses"][0]["response_range"].get("kvs", [])
            newest = int(decode(kvs[0]["key"]).removeprefix(self._revisions)) if kvs else 0
            raise Conflict(
                f"the routes changed meanwhile (revision {newest}, expected {expected_revision}); "
                "look at the new routes and retry"
            )
        return revision, _numbered(entry, answer)

    # --- audit -------------------------------------------------------------------------------

    def _audit_put(self, audit: AuditDraft, revision_after: int) -> tuple[dict[str, Any], dict[str, Any]]:
        entry = {
            "at": audit.at,
            "actor": audit.actor,
            "action": audit.action,
            "endpoint": audit.endpoint,
            "reason": audit.reason,
            "dry_run": audit.dry_run,
            "revision_before": audit.revision_before,
            "revision_after": revision_after,
            "changes": list(audit.changes),
            "detail": dict(audit.detail),
        }
        key = f"{self._audit}{quote(audit.endpoint, safe='')}/{uuid.uuid4().hex}"
        return _put(key, entry), entry

    def append_audit(self, audit: AuditDraft) -> AuditEntry:
        """An entry that changes no state."""
        put, entry = self._audit_put(audit, audit.revision_before)
        swap = pending_swap()
        if current_fence() is not None or swap is not None:
            return _numbered(entry, self._fenced_txn([put], swap=swap))
        return _numbered(entry, self._client.call("/v3/kv/put", put["request_put"], idempotent=False))

    def audit(self, endpoint: str | None = None, limit: int = 100, before_id: int = 0) -> list[AuditEntry]:
        """Newest first (etcd sorts by creation revision, which is the entry's id); older than `before_id` if given."""
        prefix = f"{self._audit}{quote(endpoint, safe='')}/" if endpoint else self._audit
        query = {
            "key": encode(prefix),
            "range_end": encode(prefix_end(prefix)),
            "sort_order": "DESCEND",
            "sort_target": "CREATE",
            "limit": str(limit),
        }
        if before_id > 0:
            query["max_create_revision"] = str(min(before_id, 1 << 62) - 1)
        answer = self._client.call("/v3/kv/range", query)
        kvs = answer.get("kvs", [])
        return [AuditEntry(id=int(kv["create_revision"]), **json.loads(decode(kv["value"]))) for kv in kvs]

    # --- records -----------------------------------------------------------------------------

    def _record_key(self, kind: str, key: str) -> str:
        return f"{self._records}{quote(kind, safe='')}/{quote(key, safe='')}"

    def put_record(self, kind: str, key: str, body: str, at: float) -> None:
        """Insert or replace one record."""
        put = _put(self._record_key(kind, key), {"at": at, "body": body})
        if current_fence() is not None:
            self._fenced_txn([put])
            return
        self._client.call("/v3/kv/put", put["request_put"])

    def commit_record(
        self, kind: str, key: str, body: str, at: float, audit: AuditDraft, *, version: int
    ) -> AuditEntry:
        """Put a record (if its mod_revision is still `version`) and its audit entry in one transaction."""
        audit_put, entry = self._audit_put(audit, audit.revision_before)
        answer = self._fenced_txn([audit_put], swap=RecordSwap(kind, key, body, at, version))
        return _numbered(entry, answer)

    def create_record(self, kind: str, key: str, body: str, at: float) -> str:
        """Put a record only when its key does not exist (one transaction); the stored body."""
        record = self._record_key(kind, key)
        answer = self._client.call(
            "/v3/kv/txn",
            {
                "compare": [_absent(record)],
                "success": [_put(record, {"at": at, "body": body})],
                "failure": [{"request_range": {"key": encode(record)}}],
            },
        )
        if answer.get("succeeded"):
            return body
        kvs = answer["responses"][0]["response_range"].get("kvs", [])
        return str(json.loads(decode(kvs[0]["value"]))["body"])

    def read_record(self, kind: str, key: str) -> tuple[str, int] | None:
        """One record's body and version (its key's mod_revision)."""
        kvs = self._client.call("/v3/kv/range", {"key": encode(self._record_key(kind, key))}).get("kvs", [])
        if not kvs:
            return None
        return str(json.loads(decode(kvs[0]["value"]))["body"]), int(kvs[0]["mod_revision"])

    def swap_record(self, kind: str, key: str, body: str, at: float, version: int) -> int:
        """Put a record if its mod_revision is still `version` (one transaction); the new version."""
        swap = RecordSwap(kind, key, body, at, version)
        self._fenced_txn([], swap=swap)
        return swap.written

    def _fenced_txn(
        self,
        success: list[dict[str, Any]],
        compare: list[dict[str, Any]] | None = None,
        failure: list[dict[str, Any]] | None = None,
        *,
        swap: RecordSwap | None = None,
    ) -> dict[str, Any]:
        """One write transaction; under a fence, it also compares the lock's holder (LockLost when it changed).

        With `swap`, it also compares the record's version and writes it (RecordChanged when it changed).
        """
        compare = list(compare or [])
        failure = list(failure or [])
        success = list(success)
        swap_at = len(failure)
        if swap is not None:
            record = self._record_key(swap.kind, swap.key)
            compare.append(_absent(record) if not swap.version else _modified_at(record, swap.version))
            success.append(_put(record, {"at": swap.at, "body": swap.body}))
            failure.append({"request_range": {"key": encode(record), "keys_only": True}})
        fence = current_fence()
        if fence is not None:
            lock_key = self._lock_key(fence[0])
            compare += [_present(lock_key), {"key": encode(lock_key), "target": "VALUE", "result": "EQUAL",
                                             "value": encode(fence[1])}]  # fmt: skip
            failure.append({"request_range": {"key": encode(lock_key)}})
        answer = self._client.call(
            "/v3/kv/txn", {"compare": compare, "success": success, "failure": failure}, idempotent=False
        )
        if fence is not None and not answer.get("succeeded"):
            kvs = answer["responses"][-1]["response_range"].get("kvs", [])
            holder = decode(kvs[0]["value"]) if kvs else ""
            if holder != fence[1]:
                raise lock_lost(fence[0], fence[1], holder)
        if swap is not None:
            if not answer.get("succeeded"):
                kvs = answer["responses"][swap_at]["response_range"].get("kvs", [])
                found = int(kvs[0]["mod_revision"]) if kvs else 0
                if found != swap.version:
                    raise record_changed(swap, found)
            else:
                swap.written = int(answer["header"]["revision"])
        return answer

    def get_record(self, kind: str, key: str) -> str | None:
        """One record's body."""
        kvs = self._client.call("/v3/kv/range", {"key": encode(self._record_key(kind, key))}).get("kvs", [])
        return str(json.loads(decode(kvs[0]["value"]))["body"]) if kvs else None

    def list_records(self, kind: str, limit: int = 100) -> list[tuple[str, float, str]]:
        """Newest first (by the time each record was written)."""
        prefix = f"{self._records}{quote(kind, safe='')}/"
        answer = self._client.call("/v3/kv/range", {"key": encode(prefix), "range_end": encode(prefix_end(prefix))})
        records = []
        for kv in answer.get("kvs", []):
            body = json.loads(decode(kv["value"]))
            records.append((decode(kv["key"]).removeprefix(prefix), float(body["at"]), str(body["body"])))
        records.sort(key=lambda record: record[1], reverse=True)
        return [(unquote(key), at, body) for key, at, body in records[:limit]]

    # --- the fleet ---------------------------------------------------------------------------

    def _lock_key(self, lock: str) -> str:
        return f"{self._locks}{quote(lock, safe='')}"

    def join(self, member: str, body: str, ttl: float) -> None:
        """Grant a lease of `ttl` seconds (at least 2) and put the member's key on it."""
        granted = self._client.call("/v3/lease/grant", {"TTL": str(max(_MIN_LEASE_SECONDS, math.ceil(ttl)))})
        lease = str(granted["ID"])
        self._client.call("/v3/kv/put", {**_put(self._members + member, {"body": body})["request_put"], "lease": lease})
        old = self._leases.get(member)
        self._leases[member] = lease
        if old is not None:
            with contextlib.suppress(StoreUnavailable):  # already expired: nothing to revoke
                self._client.call("/v3/lease/revoke", {"ID": old})

    def renew(self, member: str) -> bool:
        """One keep-alive of the member's lease; False when etcd no longer has it."""
        lease = self._leases.get(member)
        if lease is None:
            return False
        answer = self._client.call("/v3/lease/keepalive", {"ID": lease})
        return int(answer.get("result", {}).get("TTL", 0)) > 0

    def leave(self, member: str) -> None:
        """Revoke the member's lease: etcd deletes its key and its locks at once."""
        lease = self._leases.pop(member, None)
        if lease is not None:
            with contextlib.suppress(StoreUnavailable):  # expired already
                self._client.call("/v3/lease/revoke", {"ID": lease})

    def members(self) -> list[tuple[str, str]]:
        """Every member key (etcd removes those whose lease expired)."""
        answer = self._client.call(
            "/v3/kv/range", {"key": encode(self._members), "range_end": encode(prefix_end(self._members))}
        )
        return [
            (decode(kv["key"]).removeprefix(self._members), str(json.loads(decode(kv["value"]))["body"]))
            for kv in answer.get("kvs", [])
        ]

    def acquire(self, lock: str, member: str) -> str:
        """Put the lock's key on the member's lease when no key exists (one transaction); the holder."""
        lease = self._leases.get(member)
        key = self._lock_key(lock)
        read = {"request_range": {"key": encode(key)}}
        if lease is None:
            kvs = self._client.call("/v3/kv/range", read["request_range"]).get("kvs", [])
            return decode(kvs[0]["value"]) if kvs else ""
        answer = self._client.call(
            "/v3/kv/txn",
            {
                "compare": [_absent(key)],
                "success": [{"request_put": {"key": encode(key), "value": encode(member), "lease": lease}}],
                "failure": [read],
            },
        )
        if answer.get("succeeded"):
            return member
        kvs = answer["responses"][0]["response_range"].get("kvs", [])
        return decode(kvs[0]["value"]) if kvs else ""

    # --- following ---------------------------------------------------------------------------

    def wait_for_change(self, after: int, timeout: float, stop: threading.Event) -> list[Revision]:
        """Revisions after `after` (a range); when none, the first that commits (a watch from the range's revision)."""
        start = self._revision_key(after + 1)
        end = prefix_end(self._revisions)
        answer = self._client.call(
            "/v3/kv/range", {"key": encode(start), "range_end": encode(end), "limit": str(_CATCH_UP_LIMIT)}
        )
        if answer.get("kvs"):
            return [self._revision(kv) for kv in answer["kvs"]]
        seen = int(answer["header"]["revision"])
        try:
            events = self._client.watch_once(start, end, seen + 1, timeout, stop)
        except Compacted:
            return []  # the caller's next call ranges again and reads the current state
        return [self._revision(event["kv"]) for event in events if event.get("type", "PUT") == "PUT"]

    def wake(self) -> None:
        """End the watches of stopping followers now."""
        self._client.wake()

    def close(self) -> None:
        """Close the connections."""
        self._client.close()


def _put(key: str, value: Mapping[str, Any]) -> dict[str, Any]:
    return {"request_put": {"key": encode(key), "value": encode(json.dumps(value))}}


def _absent(key: str) -> dict[str, Any]:
    return {"key": encode(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}


def _modified_at(key: str, revision: int) -> dict[str, Any]:
    return {"key": encode(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}


def _present(key: str) -> dict[str, Any]:
    return {"key": encode(key), "target": "CREATE", "result": "GREATER", "create_revision": "0"}


def _numbered(entry: Mapping[str, Any], answer: Mapping[str, Any]) -> AuditEntry:
    """The entry with its id: the etcd revision of the write that created it."""
    return AuditEntry(id=int(answer["header"]["revision"]), **entry)
