"""State the servicers share: API keys, policies, vectors, alert streams and cache invalidation."""

from __future__ import annotations

from typing import Any

from service.store.base import PolicyRecord, Principal, Role, Store, StoredAlert, VectorRecord
from service.store.memory import MemoryStore
from service.store.redis_store import RedisStore

__all__ = [
    "MemoryStore",
    "PolicyRecord",
    "Principal",
    "RedisStore",
    "Role",
    "Store",
    "StoredAlert",
    "VectorRecord",
    "open_store",
]


async def open_store(
    redis_url: str | None, *, prefix: str = "steerwatch:", alert_maxlen: int = 10000, **redis_kw: Any
) -> Store:
    """The embedded MemoryStore when ``redis_url`` is None, else a RedisStore that answered PING.

    ``prefix`` and ``redis_kw`` only concern Redis; raises steering.errors.Unavailable when Redis
    does not answer.
    """
    if redis_url is None:
        return MemoryStore(alert_maxlen=alert_maxlen)
    return await RedisStore.connect(redis_url, prefix=prefix, alert_maxlen=alert_maxlen, **redis_kw)
