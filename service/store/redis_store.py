"""``RedisStore``: the state every replica shares, on ``redis.asyncio``.

Key layout (``<p>`` is the prefix, default "steerwatch:"; why it cannot collide: redis_layout.py):

    <p>key/<sha256(secret)>        hash    tenant, role, key_id   (the secret itself is never stored)
    <p>t{<tenant>}/keys            hash    key_id -> sha256(secret)   (the tenant's key ids, for revoke)
    <p>t{<tenant>}/policies        set     policy names
    <p>t{<tenant>}/policy/<name>   list    version v at index v-1: JSON {"document", "updated_at_ms"}
    <p>t{<tenant>}/default         string  name of the default policy
    <p>t{<tenant>}/vectors         set     vector ids
    <p>t{<tenant>}/vector/<id>     hash    blob (raw bytes), meta (JSON object), created_at_ms
    <p>t{<tenant>}/alerts          stream  XADD MAXLEN <alert_maxlen> (exact)
    <p>invalidate                  pub/sub channel, JSON {"tenant", "kind", "name"}

Versions come from RPUSH's reply inside MULTI, so concurrent puts get distinct versions; deleting a
policy drops its list, so a later put starts at version 1 again. Alert trimming is exact rather than
'~': the contract says "trimmed to the configured max length" and the memory store trims exactly
(approximate trimming frees whole 100-entry nodes, so a small stream would never be trimmed at all).
Responses are not decoded (decode_responses=False), so vector blobs round-trip byte for byte.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.store import redis_layout as lua
from service.store.base import SUBSCRIBED, PolicyRecord, Principal, Role, Store, StoredAlert, VectorRecord
from service.store.common import (
    check_fields,
    check_key_args,
    format_stream_id,
    hash_secret,
    new_key_id,
    new_secret,
    now_ms,
    parse_stream_id,
)
from service.store.redis_layout import Keys, alerts_of, policy_of, redact, text, vector_of
from steering.errors import AlreadyExists, Unavailable, invalid

log = logging.getLogger(__name__)
_BLOCK_MS = 5000  # one XREAD BLOCK round; the loop then blocks again
_WATCH_BATCH = 100


class RedisStore(Store):
    """Shared state in one Redis database; see the module docstring for the layout."""

    def __init__(
        self, url: str, *, prefix: str = "steerwatch:", alert_maxlen: int = 10000, max_connections: int = 1000
    ) -> None:
        if alert_maxlen < 1:
            raise invalid("alert_maxlen", f"must be >= 1, got {alert_maxlen}")
        self.url, self.prefix, self.alert_maxlen = url, prefix, alert_maxlen
        self._k = Keys(prefix)
        # Each live watch_alerts holds a connection while blocked in XREAD, hence the generous pool.
        # socket_timeout=None (redis-py 8 defaults to 5 s): with a timeout, redis-py wraps every send in
        # asyncio.wait_for, which on Python 3.11 can swallow a cancellation (CPython gh-86296), and a
        # cancelled watcher then blocks on. Keepalive and health checks detect dead peers instead.
        self._r = aioredis.Redis.from_url(
            url, decode_responses=False, protocol=2, max_connections=max_connections, socket_timeout=None,
            socket_connect_timeout=5.0, socket_keepalive=True, health_check_interval=30,
        )  # fmt: skip
        self._add_key = self._r.register_script(lua.ADD_KEY)
        self._delete_policy = self._r.register_script(lua.DELETE_POLICY)
        self._put_vector = self._r.register_script(lua.PUT_VECTOR)

    @classmethod
    async def connect(cls, url: str, **kw: Any) -> RedisStore:
        """A store whose server answered PING; raises Unavailable (with the URL, password hidden) otherwise."""
        store = cls(url, **kw)
        if not await store.ping():
            await store.close()
            raise Unavailable(f"Redis at {redact(url)} did not answer PING; is it running and reachable?")
        return store

    # ---- API keys ----
    async def create_key(self, tenant: str, role: Role) -> tuple[str, Principal]:
        secret = new_secret()
        return secret, await self.add_key(secret, tenant, role)

    async def add_key(self, secret: str, tenant: str, role: Role) -> Principal:
        check_key_args(secret, role)
        digest = hash_secret(secret)
        keys = [self._k.key(digest), self._k.tenant(tenant, "keys")]
        got = await self._add_key(keys=keys, args=[tenant, role, new_key_id(), digest])
        principal = Principal(text(got[0]), cast(Role, text(got[1])), text(got[2]))
        if (principal.tenant, principal.role) != (tenant, role):
            raise AlreadyExists("secret: this key is registered already for another tenant or role")
        return principal

    async def authenticate(self, secret: str) -> Principal | None:
        got = await self._r.hmget(self._k.key(hash_secret(secret)), ["tenant", "role", "key_id"])
        if got[0] is None:
            return None
        return Principal(text(got[0]), cast(Role, text(got[1])), text(got[2]))

    async def revoke_key(self, tenant: str, key_id: str) -> bool:
        index = self._k.tenant(tenant, "keys")
        digest = await self._r.hget(index, key_id)
        if digest is None:
            return False
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hdel(index, key_id)
            pipe.delete(self._k.key(text(digest)))
            removed, _ = await pipe.execute()
        return bool(removed)  # 0 when a concurrent revoke won: report it once only

    # ---- policies ----
    async def put_policy(
        self, tenant: str, name: str, document: str, *, make_default: bool = False
    ) -> PolicyRecord:
        stamp = now_ms()
        entry = json.dumps({"document": document, "updated_at_ms": stamp})
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.rpush(self._k.tenant(tenant, "policy", name), entry)
            pipe.sadd(self._k.tenant(tenant, "policies"), name)
            if make_default:
                pipe.set(self._k.tenant(tenant, "default"), name)
            pipe.get(self._k.tenant(tenant, "default"))
            results = await pipe.execute()
        return PolicyRecord(tenant, name, results[0], document, stamp, results[-1] == name.encode())

    async def get_policy(self, tenant: str, name: str, version: int | None = None) -> PolicyRecord | None:
        key = self._k.tenant(tenant, "policy", name)
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.llen(key)
            pipe.lindex(key, -1 if version is None else version - 1)
            pipe.get(self._k.tenant(tenant, "default"))
            count, raw, default = await pipe.execute()
        if raw is None or (version is not None and not 1 <= version <= count):
            return None
        return policy_of(tenant, name, count if version is None else version, raw, default)

    async def list_policies(self, tenant: str) -> list[PolicyRecord]:
        names = sorted(text(n) for n in await self._r.smembers(self._k.tenant(tenant, "policies")))
        async with self._r.pipeline(transaction=True) as pipe:
            for name in names:
                pipe.llen(self._k.tenant(tenant, "policy", name))
                pipe.lindex(self._k.tenant(tenant, "policy", name), -1)
            pipe.get(self._k.tenant(tenant, "default"))
            *pairs, default = await pipe.execute()
        records = zip(names, pairs[::2], pairs[1::2], strict=True)
        # A name deleted between SMEMBERS and MULTI has no versions left: skip it.
        return [policy_of(tenant, name, n, raw, default) for name, n, raw in records if raw is not None]

    async def delete_policy(self, tenant: str, name: str) -> bool:
        keys = [self._k.tenant(tenant, "policy", name), self._k.tenant(tenant, "policies"),
                self._k.tenant(tenant, "default")]  # fmt: skip
        return bool(await self._delete_policy(keys=keys, args=[name]))

    async def default_policy(self, tenant: str) -> str | None:
        raw = await self._r.get(self._k.tenant(tenant, "default"))
        return None if raw is None else text(raw)

    # ---- vectors ----
    async def put_vector(self, record: VectorRecord, *, replace: bool = False) -> None:
        keys = [self._k.tenant(record.tenant, "vector", record.vector_id, "vector_id"),
                self._k.tenant(record.tenant, "vectors")]  # fmt: skip
        args = ["1" if replace else "0", record.vector_id, record.blob, json.dumps(record.meta),
                record.created_at_ms or now_ms()]  # fmt: skip
        if not await self._put_vector(keys=keys, args=args):
            raise AlreadyExists(f"vector_id: {record.vector_id!r} exists already", field="vector_id")

    async def get_vector(self, tenant: str, vector_id: str) -> VectorRecord | None:
        raw = await self._r.hgetall(self._k.tenant(tenant, "vector", vector_id, "vector_id"))
        return vector_of(tenant, vector_id, raw) if raw else None

    async def list_vectors(self, tenant: str) -> list[VectorRecord]:
        ids = sorted(text(i) for i in await self._r.smembers(self._k.tenant(tenant, "vectors")))
        async with self._r.pipeline(transaction=False) as pipe:
            for vid in ids:
                pipe.hgetall(self._k.tenant(tenant, "vector", vid, "vector_id"))
            raws = await pipe.execute()
        return [vector_of(tenant, vid, raw) for vid, raw in zip(ids, raws, strict=True) if raw]

    async def delete_vector(self, tenant: str, vector_id: str) -> bool:
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.delete(self._k.tenant(tenant, "vector", vector_id, "vector_id"))
            pipe.srem(self._k.tenant(tenant, "vectors"), vector_id)
            deleted, _ = await pipe.execute()
        return bool(deleted)

    # ---- alerts ----
    async def add_alert(self, tenant: str, fields: dict[str, str]) -> str:
        check_fields(fields)
        key = self._k.tenant(tenant, "alerts")
        entry: dict[Any, Any] = dict(fields)  # redis-py's stub wants its own key type; str is one of them
        entry_id = await self._r.xadd(key, entry, maxlen=self.alert_maxlen, approximate=False)
        return text(entry_id)

    async def read_alerts(self, tenant: str, after_id: str = "0", count: int = 100) -> list[StoredAlert]:
        if count < 1:
            raise invalid("count", f"must be >= 1, got {count}")
        start = format_stream_id(parse_stream_id(after_id))
        return alerts_of(await self._r.xread({self._k.tenant(tenant, "alerts"): start}, count=count))

    async def latest_alerts(self, tenant: str, count: int = 50) -> list[StoredAlert]:
        if count < 1:
            raise invalid("count", f"must be >= 1, got {count}")
        newest_first = await self._r.xrevrange(self._k.tenant(tenant, "alerts"), "+", "-", count=count)
        return alerts_of([(b"", list(reversed(newest_first or [])))])

    async def watch_alerts(self, tenant: str, after_id: str = "$") -> AsyncIterator[StoredAlert]:
        key = self._k.tenant(tenant, "alerts")
        if after_id == "$":
            # Resolve "$" once: passing "$" to every XREAD would drop entries added between two reads.
            newest = await self._r.xrevrange(key, "+", "-", count=1)
            last = text(newest[0][0]) if newest else "0-0"
        else:
            last = format_stream_id(parse_stream_id(after_id))
        while True:  # ends by aclose() (GeneratorExit at the yield) or cancellation, which propagates
            reply = await self._r.xread({key: last}, count=_WATCH_BATCH, block=_BLOCK_MS)
            for alert in alerts_of(reply):
                last = alert.alert_id
                yield alert

    # ---- invalidation ----
    async def publish_invalidation(self, tenant: str, kind: str, name: str) -> None:
        message = json.dumps({"tenant": tenant, "kind": kind, "name": name})
        await self._r.publish(self._k.invalidate, message)

    async def invalidations(self) -> AsyncIterator[tuple[str, str, str]]:
        pubsub = self._r.pubsub()
        try:
            await pubsub.subscribe(self._k.invalidate)  # sent on the first __anext__, before any wait
            async for message in pubsub.listen():
                if message["type"] == "subscribe":  # the server confirmed: nothing published from now is missed
                    yield SUBSCRIBED
                    continue
                if message["type"] != "message":
                    continue
                try:
                    body = json.loads(message["data"])
                    item = (body["tenant"], body["kind"], body["name"])
                except (ValueError, KeyError, TypeError):  # a stray publisher must not end the stream
                    log.warning("ignoring malformed invalidation message %r", message["data"][:200])
                    continue
                yield item
        finally:
            await pubsub.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self._r.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        await self._r.aclose()


async def delete_prefix(url: str, prefix: str) -> None:
    """Remove every key under ``prefix`` in the Redis at ``url`` (tests and benchmarks clean up with it)."""
    client = aioredis.Redis.from_url(url, decode_responses=False)
    try:
        keys = [k async for k in client.scan_iter(match=prefix.encode() + b"*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
