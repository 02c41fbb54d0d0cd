"""`EtcdStore`: desired state for many processes on many hosts, in etcd v3.

Keys under the store's prefix (default `/gateway`):

- `{prefix}/revisions/{revision:020d}`: one committed desired state, `{"at", "document"}`;
  written once and never changed, so compaction (which drops old versions of keys) never
  loses a revision, and zero padding makes key order revision order;
- `{prefix}/audit/{endpoint}/{uuid}`: one audit entry; its id is the etcd revision that
  created it (unique, increasing, assigned inside the same transaction);
- `{prefix}/records/{kind}/{key}`: a rollout's state, an incident, a batch read pointer.

(`{prefix}/members/` and `{prefix}/leader` are kept free for process membership and the
guardian leader's lease.)

A change is one etcd transaction: compare (revision N exists, N+1 does not), then put
revision N+1 and its audit entry together; the failure branch reads the newest revision,
so a Conflict says which one won. Followers range over revisions newer than theirs and,
when there are none, watch the revisions prefix from the etcd revision that range saw: a
change committed in between is never missed, and when etcd has compacted that history
the next range reads the current state again.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, unquote

from gateway.errors import Conflict, NotFound
from gateway.state import AuditDraft, AuditEntry, Revision
from gateway.state.etcd_client import Compacted, EtcdClient, EtcdSettings, decode, encode, prefix_end

_KEY_WIDTH = 20
#: Most revisions one follower read returns; a follower far behind installs the newest anyway.
_CATCH_UP_LIMIT = 100


class EtcdStore:
    """Desired-state revisions, the audit log and records under one prefix of an etcd cluster."""

    def __init__(self, client: EtcdClient) -> None:
        self._client = client
        self.url = client.url
        prefix = client.settings.prefix
        self._revisions = f"{prefix}/revisions/"
        self._audit = f"{prefix}/audit/"
        self._records = f"{prefix}/records/"

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
        answer = self._client.call(
            "/v3/kv/txn",
            {
                "compare": compare,
                "success": [
                    _put(self._revision_key(revision.revision), {"at": revision.at, "document": document}),
                    audit_put,
                ],
                "failure": [{"request_range": {**self._newest(1), "keys_only": True}}],
            },
            idempotent=False,
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
        self._client.call("/v3/kv/put", _put(self._record_key(kind, key), {"at": at, "body": body})["request_put"])

    def commit_record(self, kind: str, key: str, body: str, at: float, audit: AuditDraft) -> AuditEntry:
        """Put a record and its audit entry in one transaction."""
        audit_put, entry = self._audit_put(audit, audit.revision_before)
        answer = self._client.call(
            "/v3/kv/txn",
            {"success": [_put(self._record_key(kind, key), {"at": at, "body": body}), audit_put]},
            idempotent=False,
        )
        return _numbered(entry, answer)

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


def _present(key: str) -> dict[str, Any]:
    return {"key": encode(key), "target": "CREATE", "result": "GREATER", "create_revision": "0"}


def _numbered(entry: Mapping[str, Any], answer: Mapping[str, Any]) -> AuditEntry:
    """The entry with its id: the etcd revision of the write that created it."""
    return AuditEntry(id=int(answer["header"]["revision"]), **entry)
