"""Replica caches (policies, tenant vectors) against a change that lands while the cache is being filled.

A cache miss reads the store and then keeps what it read. With Redis the read is a network round trip,
during which a PutPolicy / UploadVector(replace) may complete and its invalidation arrive (from this
replica or, through pub/sub, from another). The value read before the change must not be kept after
it. The store seen by the cache is wrapped so that it holds what it read until the change is through,
which turns that narrow window into a deterministic one; nothing else is changed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.service.grpc_harness import add_entry, policy_doc, random_vector, rig, run


class SlowReads:
    """The real store, except that get_policy/get_vector hold what they read until ``release`` is set
    (``read`` is set when they have read). Released from the start unless ``hold``."""

    def __init__(self, store: Any, hold: bool = True) -> None:
        self._store, self.read, self.release = store, asyncio.Event(), asyncio.Event()
        if not hold:
            self.release.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def _held(self, record: Any) -> Any:
        self.read.set()
        await asyncio.wait_for(self.release.wait(), 10)
        await asyncio.sleep(0)
        return record

    async def get_policy(self, *args: Any, **kwargs: Any) -> Any:
        return await self._held(await self._store.get_policy(*args, **kwargs))

    async def get_vector(self, *args: Any, **kwargs: Any) -> Any:
        return await self._held(await self._store.get_vector(*args, **kwargs))


def test_slow_reads_alone_change_nothing() -> None:
    """The wrapper itself is transparent: without a concurrent change every read is fresh."""
    async def body() -> None:
        async with rig("redis") as r:
            c = r.client
            real = r.app.policies.store
            r.app.policies.store = SlowReads(real, hold=False)  # type: ignore[assignment]
            await c.put_policy("p", policy_doc())
            assert (await c.generate("abc", 2, policy="p")).final.policy_version == 1
            await c.put_policy("p", policy_doc())
            assert (await c.generate("abc", 2, policy="p")).final.policy_version == 2
    run(body())


def test_policy_put_during_a_cache_fill_is_not_lost() -> None:
    async def body() -> None:
        async with rig("redis") as r:
            c = r.client
            await c.put_policy("p", policy_doc(description="v1"))
            real = r.app.policies.store
            slow = SlowReads(real)
            r.app.policies.store = slow  # type: ignore[assignment]
            filling = asyncio.ensure_future(c.generate("abc", 2, policy="p"))
            await slow.read.wait()  # version 1 was read; not cached yet
            assert (await c.put_policy("p", policy_doc(description="v2"))).version == 2
            await asyncio.sleep(0.2)  # its invalidation (direct, and echoed through Redis) is handled
            slow.release.set()
            assert (await filling).final.policy_version == 1  # it started before the put: fine
            r.app.policies.store = real
            await asyncio.sleep(0.5)
            assert (await c.generate("abc", 2, policy="p")).final.policy_version == 2
    run(body())


def test_vector_replace_during_a_registry_fill_is_not_lost() -> None:
    async def body() -> None:
        async with rig("redis") as r:
            c = r.client
            await c.upload_vector("v", {1: random_vector(1)})
            real = r.app.vectors.store
            slow = SlowReads(real)
            r.app.vectors.store = slow  # type: ignore[assignment]
            filling = asyncio.ensure_future(c.generate("abc", 6, steering=[add_entry("v", 4.0)]))
            await slow.read.wait()  # the old values were read; not in the registry yet
            new_values = random_vector(2, 3.0)
            await c.upload_vector("v", {1: new_values}, replace=True)
            await asyncio.sleep(0.2)  # its invalidation (direct, and echoed through Redis) is handled
            slow.release.set()
            await filling
            r.app.vectors.store = real
            await asyncio.sleep(0.5)
            await c.generate("abc", 2, steering=[add_entry("v", 4.0)])
            used = r.app.registry.vector("acme/v").per_layer[1]
            assert used.tolist() == pytest.approx(new_values, abs=1e-6)
    run(body())
