"""Key names, Lua scripts and reply decoding of ``RedisStore`` (the layout is documented in redis_store.py).

Tenants and ids may contain ':' (they match ``^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$``), so ':' cannot
separate components. The layout uses '{', '}' and '/' instead, which neither can contain: the tenant
sits in braces ("t{<tenant>}", ending at the first '}'), and a name or id is always the last component.
Two different (tenant, name) pairs therefore always give different keys. The braces double as a
Redis Cluster hash tag, so all of one tenant's keys share a slot.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from service.store.base import PolicyRecord, StoredAlert, VectorRecord
from steering.errors import invalid

_SEPARATORS = frozenset("{}/")


def _part(value: str, field: str) -> str:
    """A key component; the callers validate ids, this only guards the separators the layout relies on."""
    if not value or not _SEPARATORS.isdisjoint(value):
        raise invalid(field, f"must be non-empty and contain none of '{{', '}}', '/', got {value!r}")
    return value


class Keys:
    """Builds every key of one store (one prefix)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.invalidate = f"{prefix}invalidate"  # pub/sub channel

    def key(self, digest: str) -> str:
        """hash {tenant, role, key_id}, found by sha256(secret)."""
        return f"{self.prefix}key/{digest}"

    def tenant(self, tenant: str, what: str, name: str | None = None, field: str = "name") -> str:
        """A per-tenant key: "t{<tenant>}/<what>" or "t{<tenant>}/<what>/<name>"."""
        base = f"{self.prefix}t{{{_part(tenant, 'tenant')}}}/{what}"
        return base if name is None else f"{base}/{_part(name, field)}"


# KEYS: key record, tenant key index. ARGV: tenant, role, key_id, digest.
# Returns the record (tenant, role, key_id): the existing one when the secret is known already, which
# makes add_key idempotent and race-free.
ADD_KEY = """
local cur = redis.call('HMGET', KEYS[1], 'tenant', 'role', 'key_id')
if cur[1] then return cur end
redis.call('HSET', KEYS[1], 'tenant', ARGV[1], 'role', ARGV[2], 'key_id', ARGV[3])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
return {ARGV[1], ARGV[2], ARGV[3]}
"""

# KEYS: versions list, names set, default. ARGV: name. Atomic, so a concurrent put_policy(make_default)
# of another name is never cleared by mistake.
DELETE_POLICY = """
local n = redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
if redis.call('GET', KEYS[3]) == ARGV[1] then redis.call('DEL', KEYS[3]) end
return n
"""

# KEYS: vector hash, ids set. ARGV: replace ('1'/'0'), id, blob, meta JSON, created_at_ms.
# Returns 0 when the vector exists and replace is '0' (nothing written).
PUT_VECTOR = """
if ARGV[1] == '0' and redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'blob', ARGV[3], 'meta', ARGV[4], 'created_at_ms', ARGV[5])
redis.call('SADD', KEYS[2], ARGV[2])
return 1
"""


def text(value: bytes | str | None) -> str:
    """A reply value as text (replies are bytes: the client does not decode, for the sake of blobs)."""
    if value is None:
        raise ValueError("unexpected nil reply from Redis")
    return value.decode() if isinstance(value, bytes) else value


def policy_of(tenant: str, name: str, version: int, raw: bytes, default: bytes | None) -> PolicyRecord:
    """A PolicyRecord from a version entry (JSON) and the tenant's default pointer."""
    body = json.loads(raw)
    return PolicyRecord(
        tenant, name, version, body["document"], body["updated_at_ms"], default == name.encode()
    )


def vector_of(tenant: str, vector_id: str, raw: Mapping[Any, Any]) -> VectorRecord:
    """A VectorRecord from the vector's HGETALL reply."""
    meta = json.loads(raw[b"meta"])
    return VectorRecord(tenant, vector_id, raw[b"blob"], meta, int(raw[b"created_at_ms"]))


def alerts_of(reply: Any) -> list[StoredAlert]:
    """XREAD's RESP2 reply [[stream, [(id, {field: value})...]]] as StoredAlerts ([] when none)."""
    if not reply:
        return []
    return [StoredAlert(text(i), {text(f): text(v) for f, v in fields.items()}) for i, fields in reply[0][1]]


def redact(url: str) -> str:
    """The URL without its password, fit for an error message."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
