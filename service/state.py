"""Per-replica caches over the shared store: tenant policies and tenant vectors in the registry.

Both are invalidated through the store's pub/sub channel, so a change made on any replica takes effect
on every replica as soon as the message arrives (well under a second on a LAN).
"""

from __future__ import annotations

import asyncio
import logging

from service.pack import is_pack_id
from service.policy import EMPTY_POLICY, Policy, parse_policy, scoped
from service.store.base import SUBSCRIBED, Store
from steering.errors import NotFound
from steering.registry import Registry, check_id
from steering.vectors import vector_from_bytes

log = logging.getLogger(__name__)


class PolicyCache:
    """(tenant, name) -> (version, Policy) of the latest version; the default pointer per tenant."""

    def __init__(self, store: Store, fallback: Policy = EMPTY_POLICY) -> None:
        self.store = store
        self.fallback = fallback  # for tenants with no default policy: the server's own limits
        self._policies: dict[tuple[str, str], tuple[int, Policy]] = {}
        self._defaults: dict[str, str | None] = {}
        # bumped by every invalidation: a read that started before one must not be cached after it
        self._generation = 0

    async def resolve(self, tenant: str, name: str) -> tuple[str, int, Policy]:
        """The named policy, or the tenant's default when ``name`` is empty (none: an empty policy)."""
        if not name:
            default = self._defaults.get(tenant, "")
            if default == "":
                gen = self._generation
                default = await self.store.default_policy(tenant)
                if gen == self._generation:
                    self._defaults[tenant] = default
            if default is None:
                return "", 0, self.fallback
            name = default
        check_id(name, "policy")
        key = (tenant, name)
        cached = self._policies.get(key)
        if cached is None:
            gen = self._generation
            record = await self.store.get_policy(tenant, name)
            if record is None:
                raise NotFound(f"policy: no policy named {name!r} for this tenant", field="policy")
            cached = (record.version, parse_policy(record.document))
            if gen == self._generation:
                self._policies[key] = cached
        version, policy = cached
        return name, version, policy

    def invalidate(self, tenant: str, name: str) -> None:
        self._generation += 1
        self._policies.pop((tenant, name), None)
        self._defaults.pop(tenant, None)

    def clear(self) -> None:
        self._generation += 1
        self._policies.clear()
        self._defaults.clear()


class TenantVectors:
    """Loads a tenant's vectors from the store into the engine's registry on first use."""

    def __init__(self, store: Store, registry: Registry) -> None:
        self.store, self.registry = store, registry
        self._generation = 0  # bumped by every invalidation (see PolicyCache)

    async def ensure(self, tenant: str, vector_ids: set[str], field: str = "vector_id") -> None:
        for vid in sorted(vector_ids):
            check_id(vid, field)
            key = scoped(tenant, vid)
            if self.registry.has("vector", key):
                continue
            if is_pack_id(vid):  # a shared monitor-pack id: loaded at start or not at all
                raise NotFound(f"{field}: no shared vector {vid!r} on this server (is its monitor pack built?)",
                               field=field)
            gen = self._generation
            record = await self.store.get_vector(tenant, vid)
            if record is None:
                raise NotFound(f"{field}: no vector {vid!r} for this tenant", field=field)
            vec = vector_from_bytes(record.blob, field)
            if gen != self._generation:  # replaced or deleted while we read: read again
                await self.ensure(tenant, {vid}, field)
                continue
            self.registry.add_vector(key, vec, replace=True)

    def invalidate(self, tenant: str, vector_id: str) -> None:
        self._generation += 1
        self.registry.remove("vector", scoped(tenant, vector_id), missing_ok=True)

    def clear(self) -> None:
        """Drop every tenant vector from the registry (server-loaded ids have no '/')."""
        self._generation += 1
        for key in self.registry.ids("vector"):
            if "/" in key:
                self.registry.remove("vector", key, missing_ok=True)


async def follow_invalidations(store: Store, policies: PolicyCache, vectors: TenantVectors) -> None:
    """Apply invalidation messages from every replica until cancelled.

    Each time the subscription becomes active (first start and every reconnect) both caches are
    dropped: changes made while no subscription was listening were never announced to this replica.
    """
    while True:
        try:
            async for tenant, kind, name in store.invalidations():
                if (tenant, kind, name) == SUBSCRIBED:
                    policies.clear()
                    vectors.clear()
                elif kind == "policy":
                    policies.invalidate(tenant, name)
                elif kind == "vector":
                    vectors.invalidate(tenant, name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the store reconnects on the next subscription; caches are dropped then
            # no traceback: during a store outage this repeats every second
            log.warning("invalidation stream broke (%s: %s); resubscribing", type(exc).__name__, exc)
            await asyncio.sleep(1.0)
