"""Two replicas on one Redis prefix: a change made through one replica reaches the other's caches (policy
versions, the default pointer, vectors) within a second; alerts land in one shared stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import redis.asyncio as aioredis

from service.serve import Replica
from tests.service.grpc_harness import (
    REDIS_URL,
    Client,
    add_entry,
    add_steering,
    delete_prefix,
    direction_monitor,
    eventually,
    live_watch,
    one_torch_thread,
    policy_doc,
    random_vector,
    rpc_error,
    run,
    start,
    unique_prefix,
)

PROPAGATION_S = 1.0


@asynccontextmanager
async def two_replicas() -> AsyncIterator[tuple[Replica, Replica, Client, Client]]:
    prefix = unique_prefix()
    replicas: list[Replica] = []
    channels: list[grpc.aio.Channel] = []
    try:
        for copy in (0, 1):  # each replica owns a model copy of its own (engines hook their model)
            replica, _ = await start("redis", lm_copy=copy, prefix=prefix)
            replicas.append(replica)
            channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}"))
        key, _ = await replicas[0].app.store.create_key("acme", "tenant")
        yield replicas[0], replicas[1], Client(channels[0], key), Client(channels[1], key)
    finally:
        for ch in channels:
            await ch.close()
        for replica in replicas:
            await replica.stop(0)
        await delete_prefix(prefix)


async def _until_version(c: Client, policy: str, version: int) -> tuple[float, object]:
    """Generate on ``c`` until the FinalRecord reports ``version``; (seconds it took, the last result)."""
    start_t = time.monotonic()
    while True:
        res = await c.generate("abc", 2, policy=policy)
        if res.final.policy_version == version or time.monotonic() - start_t > PROPAGATION_S:
            return time.monotonic() - start_t, res
        await asyncio.sleep(0.02)


def test_policy_change_reaches_the_other_replica() -> None:
    async def body() -> None:
        async with two_replicas() as (r1, r2, c1, c2):
            await c1.upload_vector("v", {1: random_vector(1)})
            await c1.put_policy("p", policy_doc([], [add_steering("v", 1.0)]))
            first = await c2.generate("abc", 2, policy="p")  # replica 2 caches version 1
            assert first.final.policy_version == 1 and first.final.steering[0].value == 1.0
            assert ("acme", "p") in r2.app.policies._policies  # cached there (white box: the premise of the test)

            await c1.put_policy("p", policy_doc([], [add_steering("v", 2.5)]))
            took, res = await _until_version(c2, "p", 2)
            assert res.final.policy_version == 2, f"replica 2 still used version {res.final.policy_version}"
            assert took <= PROPAGATION_S and res.final.steering[0].value == 2.5

            # the default pointer follows too
            await c1.put_policy("d1", policy_doc(), make_default=True)
            assert (await c2.generate("abc", 2)).final.policy == "d1"
            await c1.put_policy("d2", policy_doc([direction_monitor("m", "v", -1e9)]), make_default=True)
            await eventually(lambda: ("acme" not in r2.app.policies._defaults), "replica 2 to drop its default",
                             timeout=PROPAGATION_S)
            res2 = await c2.generate("abc", 2)
            assert (res2.final.policy, res2.final.policy_version) == ("d2", 1)

            # a policy deleted on replica 2 is gone on replica 1 (whose cache held it)
            assert (await c1.generate("abc", 2, policy="p")).final.policy_version == 2
            await c2.delete_policy("p")
            await eventually(lambda: ("acme", "p") not in r1.app.policies._policies, "replica 1 to drop p", timeout=PROPAGATION_S)
            code, _ = await rpc_error(c1.generate_call(policy="p"))
            assert code == grpc.StatusCode.NOT_FOUND

            # vectors: a replace on replica 1 changes replica 2's output, a delete makes it NOT_FOUND there
            before = await c2.generate("abc", 6, steering=[add_entry("v", 3.0)])
            await c1.upload_vector("v", {1: random_vector(2, 3.0)}, replace=True)
            await eventually(lambda: not r2.app.registry.has("vector", "acme/v"), "replica 2 to drop the vector",
                             timeout=PROPAGATION_S)
            after = await c2.generate("abc", 6, steering=[add_entry("v", 3.0)])
            assert after.token_ids != before.token_ids
            await c1.delete_vector("v")
            await eventually(lambda: not r2.app.registry.has("vector", "acme/v"), "replica 2 to drop the vector",
                             timeout=PROPAGATION_S)
            code, _ = await rpc_error(c2.generate_call(steering=[add_entry("v", 1.0)]))
            assert code == grpc.StatusCode.NOT_FOUND

    with one_torch_thread():
        run(body())


def test_alerts_from_either_replica_reach_a_watch_on_the_other() -> None:
    async def body() -> None:
        async with two_replicas() as (r1, _r2, c1, c2):
            await c1.upload_vector("v", {1: random_vector(1)})
            await c1.put_policy("p", policy_doc([direction_monitor("m", "v", -1e9)]), make_default=True)
            watcher = await live_watch(r1.app.store, "acme", c1.watch())
            a = await c2.generate("abc", 2)
            b = await c1.generate("abc", 2)
            assert len(a.alerts) == len(b.alerts) == 1
            await eventually(lambda: len(watcher.got) == 2, "both alerts on replica 1's watch")
            assert watcher.got == [*a.alerts, *b.alerts]
            await watcher.close()
    with one_torch_thread():
        run(body())


async def _break_invalidation_stream(replica: Replica) -> None:
    """Close replica's pub/sub connection from the Redis side (CLIENT KILL of that one connection), as a
    Redis restart or a network blip would; the replica then logs the break and resubscribes."""
    pool = replica.app.store._r.connection_pool  # type: ignore[attr-defined]
    in_use = list(pool._in_use_connections)  # idle replica: the subscriber is the only busy connection
    assert len(in_use) == 1, in_use
    host, port = in_use[0]._writer.get_extra_info("sockname")[:2]
    admin = aioredis.Redis.from_url(REDIS_URL)
    try:
        assert await admin.client_kill_filter(_id=None, addr=f"{host}:{port}") == 1
    finally:
        await admin.aclose()
    await asyncio.sleep(0.2)  # the replica has seen the break (and dropped its policy cache)


def test_vector_replaced_while_the_invalidation_stream_is_down_is_not_lost() -> None:
    async def body() -> None:
        async with two_replicas() as (r1, r2, c1, c2):
            await c1.upload_vector("v", {1: random_vector(1)})
            await c2.generate("abc", 2, steering=[add_entry("v", 3.0)])  # replica 2 loads v
            await _break_invalidation_stream(r2)
            await c1.upload_vector("v", {1: random_vector(2, 3.0)}, replace=True)
            await asyncio.sleep(1.5)  # replica 2 has resubscribed
            fresh = await c1.generate("abc", 6, steering=[add_entry("v", 3.0)])
            there = await c2.generate("abc", 6, steering=[add_entry("v", 3.0)])
            assert there.token_ids == fresh.token_ids
    with one_torch_thread():
        run(body())


def test_policy_changed_while_the_invalidation_stream_is_down_is_not_lost() -> None:
    async def body() -> None:
        async with two_replicas() as (r1, r2, c1, c2):
            await c1.put_policy("p", policy_doc())
            await _break_invalidation_stream(r2)
            assert (await c2.generate("abc", 2, policy="p")).final.policy_version == 1  # cached again
            await c1.put_policy("p", policy_doc())
            await asyncio.sleep(1.5)  # replica 2 has resubscribed
            assert (await c2.generate("abc", 2, policy="p")).final.policy_version == 2
    with one_torch_thread():
        run(body())
