"""``MemoryStore``: the embedded default, for one process and one event loop.

Every mutation runs without an ``await`` in the middle, so on a single event loop each call is atomic
(concurrent puts get distinct versions for free). Alert ids follow Redis stream ids exactly
("<ms>-<seq>", strictly increasing per tenant), so clients can switch stores without noticing.
Deleting a policy deletes its version history: a later put starts again at version 1 (as in Redis).
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import AsyncIterator
from dataclasses import replace

from service.store.base import SUBSCRIBED, PolicyRecord, Principal, Role, Store, StoredAlert, VectorRecord
from service.store.common import (
    StreamId,
    check_fields,
    check_key_args,
    format_stream_id,
    hash_secret,
    new_key_id,
    new_secret,
    next_stream_id,
    now_ms,
    parse_stream_id,
)
from steering.errors import AlreadyExists, invalid

_Entry = tuple[StreamId, StoredAlert]


class MemoryStore(Store):
    """In-process state; nothing survives the process."""

    def __init__(self, *, alert_maxlen: int = 10000) -> None:
        if alert_maxlen < 1:
            raise invalid("alert_maxlen", f"must be >= 1, got {alert_maxlen}")
        self.alert_maxlen = alert_maxlen
        self._keys: dict[str, Principal] = {}  # sha256(secret) -> principal
        self._tenant_keys: dict[str, dict[str, str]] = {}  # tenant -> key_id -> sha256(secret)
        self._policies: dict[tuple[str, str], list[PolicyRecord]] = {}  # index i holds version i+1
        self._defaults: dict[str, str] = {}
        self._vectors: dict[tuple[str, str], VectorRecord] = {}
        self._alerts: dict[str, list[_Entry]] = {}
        # Kept apart from the list: trimming must never let an id be reused.
        self._last_alert: dict[str, StreamId] = {}
        self._alert_added = asyncio.Condition()
        self._subscribers: set[asyncio.Queue[tuple[str, str, str]]] = set()

    # ---- API keys ----
    async def create_key(self, tenant: str, role: Role) -> tuple[str, Principal]:
        secret = new_secret()
        return secret, await self.add_key(secret, tenant, role)

    async def add_key(self, secret: str, tenant: str, role: Role) -> Principal:
        check_key_args(secret, role)
        digest = hash_secret(secret)
        known = self._keys.get(digest)
        if known is not None:
            if (known.tenant, known.role) != (tenant, role):
                raise AlreadyExists("secret: this key is registered already for another tenant or role")
            return known
        principal = Principal(tenant=tenant, role=role, key_id=new_key_id())
        self._keys[digest] = principal
        self._tenant_keys.setdefault(tenant, {})[principal.key_id] = digest
        return principal

    async def authenticate(self, secret: str) -> Principal | None:
        return self._keys.get(hash_secret(secret))

    async def revoke_key(self, tenant: str, key_id: str) -> bool:
        digest = self._tenant_keys.get(tenant, {}).pop(key_id, None)
        if digest is None:
            return False
        del self._keys[digest]
        return True

    # ---- policies ----
    async def put_policy(
        self, tenant: str, name: str, document: str, *, make_default: bool = False
    ) -> PolicyRecord:
        versions = self._policies.setdefault((tenant, name), [])
        versions.append(PolicyRecord(tenant, name, len(versions) + 1, document, now_ms()))
        if make_default:
            self._defaults[tenant] = name
        return self._with_default(versions[-1])

    async def get_policy(self, tenant: str, name: str, version: int | None = None) -> PolicyRecord | None:
        versions = self._policies.get((tenant, name))
        if not versions:
            return None
        if version is None:
            return self._with_default(versions[-1])
        return self._with_default(versions[version - 1]) if 1 <= version <= len(versions) else None

    async def list_policies(self, tenant: str) -> list[PolicyRecord]:
        names = sorted(name for (owner, name) in self._policies if owner == tenant)
        return [self._with_default(self._policies[(tenant, name)][-1]) for name in names]

    async def delete_policy(self, tenant: str, name: str) -> bool:
        if self._policies.pop((tenant, name), None) is None:
            return False
        if self._defaults.get(tenant) == name:
            del self._defaults[tenant]
        return True

    async def default_policy(self, tenant: str) -> str | None:
        return self._defaults.get(tenant)

    def _with_default(self, record: PolicyRecord) -> PolicyRecord:
        """is_default is a property of the name now, not of the version when it was stored."""
        return replace(record, is_default=self._defaults.get(record.tenant) == record.name)

    # ---- vectors ----
    async def put_vector(self, record: VectorRecord, *, replace: bool = False) -> None:
        key = (record.tenant, record.vector_id)
        if key in self._vectors and not replace:
            raise AlreadyExists(f"vector_id: {record.vector_id!r} exists already", field="vector_id")
        self._vectors[key] = _copy_vector(record, record.created_at_ms or now_ms())

    async def get_vector(self, tenant: str, vector_id: str) -> VectorRecord | None:
        record = self._vectors.get((tenant, vector_id))
        return None if record is None else _copy_vector(record, record.created_at_ms)

    async def list_vectors(self, tenant: str) -> list[VectorRecord]:
        ids = sorted(vid for (owner, vid) in self._vectors if owner == tenant)
        return [
            _copy_vector(self._vectors[(tenant, vid)], self._vectors[(tenant, vid)].created_at_ms)
            for vid in ids
        ]

    async def delete_vector(self, tenant: str, vector_id: str) -> bool:
        return self._vectors.pop((tenant, vector_id), None) is not None

    # ---- alerts ----
    async def add_alert(self, tenant: str, fields: dict[str, str]) -> str:
        check_fields(fields)
        async with self._alert_added:
            sid = next_stream_id(self._last_alert.get(tenant, (0, 0)), now_ms())
            self._last_alert[tenant] = sid
            entries = self._alerts.setdefault(tenant, [])
            entries.append((sid, StoredAlert(format_stream_id(sid), dict(fields))))
            del entries[: max(0, len(entries) - self.alert_maxlen)]  # exact MAXLEN, like the Redis store
            self._alert_added.notify_all()
        return format_stream_id(sid)

    async def read_alerts(self, tenant: str, after_id: str = "0", count: int = 100) -> list[StoredAlert]:
        if count < 1:
            raise invalid("count", f"must be >= 1, got {count}")
        return self._after(tenant, parse_stream_id(after_id))[:count]

    async def latest_alerts(self, tenant: str, count: int = 50) -> list[StoredAlert]:
        if count < 1:
            raise invalid("count", f"must be >= 1, got {count}")
        return [alert for _, alert in self._alerts.get(tenant, [])[-count:]]

    def watch_alerts(self, tenant: str, after_id: str = "$") -> AsyncIterator[StoredAlert]:
        # "$" is resolved here, at the call, not at the first iteration: nothing added later is missed.
        start = self._last_alert.get(tenant, (0, 0)) if after_id == "$" else parse_stream_id(after_id)
        return self._watch(tenant, start)

    async def _watch(self, tenant: str, last: StreamId) -> AsyncIterator[StoredAlert]:
        while True:
            async with self._alert_added:
                # Checked under the lock, so an add between the check and wait() cannot be missed.
                while self._newest(tenant) <= last:
                    await self._alert_added.wait()
                batch = self._after(tenant, last)
            for alert in batch:  # yield outside the lock: a slow consumer must not block producers
                last = parse_stream_id(alert.alert_id)
                yield alert

    def _newest(self, tenant: str) -> StreamId:
        """Id of the newest entry still held, (0, 0) when none."""
        entries = self._alerts.get(tenant)
        return entries[-1][0] if entries else (0, 0)

    def _after(self, tenant: str, sid: StreamId) -> list[StoredAlert]:
        entries = self._alerts.get(tenant, [])
        start = bisect.bisect_right(entries, sid, key=lambda entry: entry[0])
        return [alert for _, alert in entries[start:]]

    # ---- invalidation ----
    async def publish_invalidation(self, tenant: str, kind: str, name: str) -> None:
        for queue in self._subscribers:
            queue.put_nowait((tenant, kind, name))

    async def invalidations(self) -> AsyncIterator[tuple[str, str, str]]:
        queue: asyncio.Queue[tuple[str, str, str]] = asyncio.Queue()
        self._subscribers.add(queue)  # subscribed from the first __anext__ on
        try:
            yield SUBSCRIBED
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._subscribers.clear()


def _copy_vector(record: VectorRecord, created_at_ms: int) -> VectorRecord:
    """A copy with its own meta dict, so callers cannot mutate what is stored."""
    return replace(record, meta=dict(record.meta), created_at_ms=created_at_ms)
