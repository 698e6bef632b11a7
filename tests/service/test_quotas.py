"""Per-tenant stream quotas and the WatchAlerts duration cap, on a real replica."""

from __future__ import annotations

import asyncio
import time

import grpc

from tests.service.grpc_harness import Watcher, eventually, live_watch, rig, rpc_error, run


def test_a_tenant_cannot_hold_more_streams_than_its_quota() -> None:
    async def body() -> None:
        async with rig("memory", max_streams_per_tenant=2) as r:
            acme, globex = r.client, await r.tenant_client("globex")
            watches = [await live_watch(r.store, "acme", acme.watch()) for _ in range(2)]
            assert r.app.streams.open("acme") == 2
            code, details = await rpc_error(acme.generate_call("abc", 2))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limits.max_streams_per_tenant" in details
            code, _ = await rpc_error(acme.watch())
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (await globex.generate("abc", 2)).final.usage.completion_tokens >= 1  # others unaffected
            await watches[0].close()
            await eventually(lambda: r.app.streams.open("acme") == 1, "the closed watch to free its slot")
            assert (await acme.generate("abc", 2)).final.usage.completion_tokens >= 1
            await watches[1].close()
            await eventually(lambda: r.app.streams.open("acme") == 0, "every slot to be free")

    run(body())


def test_watch_alerts_ends_after_its_maximum_duration() -> None:
    async def body() -> None:
        async with rig("memory", max_watch_seconds=0.5) as r:
            start = time.monotonic()
            w = Watcher(r.client.watch())
            await asyncio.wait_for(w.task, 5)
            assert w.error is None and time.monotonic() - start < 3
            assert await w.call.code() == grpc.StatusCode.OK

    run(body())
