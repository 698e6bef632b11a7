"""Serving through a store outage: API keys confirmed before it, and alerts written after it.

With ``store_outage: serve_cached`` (the default) a replica keeps serving while Redis is down, on what
it already holds: policies and vectors in its caches (service/state.py), and the principals of API keys
it has confirmed (``KeyMemory``). Alerts raised meanwhile wait in a bounded in-process queue
(``AlertOutbox``) and are written to the tenants' streams in order once Redis answers again; the
backlog is the ``steerwatch_alert_backlog`` gauge. With ``fail_closed`` every store error fails its
request with UNAVAILABLE.

What a store outage cannot change: a key revoked while Redis was up is refused (keys are checked
against the store on every call while it answers); requests that need anything not cached fail with
UNAVAILABLE; alerts still queued when the process exits are lost (the log says how many).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from typing import Any, Literal

from redis.exceptions import RedisError

from service.store.base import Principal, Store
from service.store.common import hash_secret
from steering.errors import Unavailable

log = logging.getLogger(__name__)

OutageMode = Literal["serve_cached", "fail_closed"]
STORE_ERRORS = (RedisError, OSError)  # what a store that is down or unreachable raises
KEYS_REMEMBERED = 10_000
RETRY_S = (0.2, 0.5, 1.0, 2.0)  # the flusher's waits between attempts while the store stays down


class KeyMemory:
    """Principals of keys the store confirmed, by the key's sha256; consulted only when the store fails."""

    def __init__(self, store: Store, mode: OutageMode, metrics: Any) -> None:
        self.store, self.mode, self.metrics = store, mode, metrics
        self._known: OrderedDict[str, Principal] = OrderedDict()  # LRU, bounded

    async def authenticate(self, secret: str) -> Principal | None:
        digest = hash_secret(secret)
        try:
            principal = await self.store.authenticate(secret)
        except STORE_ERRORS:
            self.metrics.store_errors.labels(operation="authenticate").inc()
            known = self._known.get(digest) if self.mode == "serve_cached" else None
            if known is None:
                raise
            return known
        if principal is None:  # unknown or revoked: forget it, so an outage cannot revive it
            self._known.pop(digest, None)
        else:
            self._known[digest] = principal
            self._known.move_to_end(digest)
            while len(self._known) > KEYS_REMEMBERED:
                self._known.popitem(last=False)
        return principal


class AlertOutbox:
    """Writes alerts to the tenants' streams; while the store fails, queues them (bounded) and a
    background task writes them in order when it answers again. Once anything is queued, later alerts
    queue behind it, so each tenant's stream keeps the order the alerts were raised in."""

    def __init__(self, store: Store, mode: OutageMode, metrics: Any, capacity: int) -> None:
        self.store, self.mode, self.metrics, self.capacity = store, mode, metrics, capacity
        self._queue: deque[tuple[str, dict[str, str]]] = deque()
        self._flusher: asyncio.Task[None] | None = None

    @property
    def backlog(self) -> int:
        return len(self._queue)

    async def add(self, tenant: str, fields: dict[str, str]) -> str:
        """The stream entry id, or "" when the alert was queued for later."""
        if not self._queue:
            try:
                return await self.store.add_alert(tenant, fields)
            except STORE_ERRORS:
                self.metrics.store_errors.labels(operation="add_alert").inc()
                if self.mode == "fail_closed":
                    raise
                log.warning("alert store unavailable: queueing alerts until it answers")
        if len(self._queue) >= self.capacity:
            raise Unavailable(f"limits.alert_buffer: {self.capacity} alerts already wait for the store; "
                              "retry when it is back", field="limits.alert_buffer")
        self._queue.append((tenant, fields))
        self.metrics.alert_backlog.set(len(self._queue))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return ""

    async def _flush(self) -> None:
        attempt = 0
        while self._queue:
            tenant, fields = self._queue[0]
            try:
                await self.store.add_alert(tenant, fields)
            except STORE_ERRORS:
                await asyncio.sleep(RETRY_S[min(attempt, len(RETRY_S) - 1)])
                attempt += 1
                continue
            attempt = 0
            self._queue.popleft()
            self.metrics.alert_backlog.set(len(self._queue))
        log.info("alert store back: queued alerts written")

    async def close(self, timeout_s: float = 2.0) -> None:
        """Give queued alerts a last chance to be written; log what is lost."""
        if self._flusher is not None and not self._flusher.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._flusher), timeout_s)
            except TimeoutError:
                self._flusher.cancel()
        if self._queue:
            log.error("%d queued alerts could not be written before shutdown (store unavailable)", len(self._queue))
