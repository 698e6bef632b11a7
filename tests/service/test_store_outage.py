"""Redis stops under a running replica and comes back (a private redis-server with an append-only file,
so its data survives the restart). With ``store_outage: serve_cached`` requests keep being served on the
keys and policies the replica holds, their alerts go out in-band and wait in the outbox (the backlog
gauge counts them), and they reach the tenant's stream in order, once each, when Redis is back. With
``fail_closed`` the same requests fail with UNAVAILABLE."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import grpc
import pytest

from service.serve import Replica, start_replica
from service.settings import Settings
from service.store import open_store
from steering.errors import Unavailable
from tests.service.grpc_harness import (
    Client,
    direction_monitor,
    eventually,
    policy_doc,
    random_vector,
    rpc_error,
    run,
    tiny_lm,
)

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
FIRES = -1e9


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A redis-server on a free port whose data (AOF) survives stop() and start()."""

    def __init__(self, directory: str, *extra: str) -> None:
        self.port, self.dir, self.extra = _free_port(), directory, list(extra)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "yes", "--appendfsync", "always", "--dir", self.dir, *self.extra],
                                     stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(10)


@contextmanager
def private_redis(*extra: str) -> Iterator[PrivateRedis]:
    """A started PrivateRedis; ``extra``: more redis-server arguments."""
    with tempfile.TemporaryDirectory() as directory:
        redis = PrivateRedis(directory, *extra)
        redis.start()
        try:
            yield redis
        finally:
            if redis.proc is not None and redis.proc.poll() is None:
                redis.proc.kill()


@asynccontextmanager
async def replica_on(redis: PrivateRedis, **settings: Any) -> AsyncIterator[tuple[Replica, Client]]:
    for _ in range(100):
        try:
            store = await open_store(redis.url)
            break
        except Unavailable:  # not up yet
            await asyncio.sleep(0.05)
    replica = await start_replica(Settings.load(None, host="127.0.0.1", port=0, metrics_port=0, **settings),
                                  lm=tiny_lm(), store=store)
    secret, _ = await store.create_key("acme", "tenant")
    client = Client(grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}"), secret)
    try:
        yield replica, client
    finally:
        await client.channel.close()
        await replica.stop(0)


async def _prepared(client: Client) -> Any:
    """A vector, a default policy that fires on every generation, and one generation (caches warm)."""
    await client.upload_vector("v", {1: random_vector(0)})
    await client.put_policy("watch", policy_doc([direction_monitor("mon", "v", FIRES)]), make_default=True)
    await client.put_policy("cold", policy_doc())  # never used before the outage: not cached
    first = await client.generate("abc", 3)
    assert first.alerts[0].alert_id
    return first.alerts[0]


def test_serve_cached_keeps_serving_and_delivers_queued_alerts_in_order() -> None:
    async def body() -> None:
        with private_redis() as redis:
            async with replica_on(redis) as (replica, client):
                before = await _prepared(client)
                redis.stop()
                during = []
                for prompt in ("one", "two", "three"):
                    res = await client.generate(prompt, 3)
                    assert res.final.usage.completion_tokens >= 1  # served on the cached key and policy
                    (alert,) = res.alerts
                    assert alert.alert_id == ""  # queued: its id comes when the store writes it
                    during.append(alert)
                app = replica.app
                assert app.alerts.backlog == 3 and app.metrics.alert_backlog._value.get() == 3
                errors = {s.labels["operation"]: s.value for s in app.metrics.store_errors.collect()[0].samples
                          if s.name.endswith("_total")}
                assert errors["add_alert"] >= 1 and errors["authenticate"] >= 3
                # nothing to fall back on: a key never seen, a policy never loaded
                code, details = await rpc_error(client.with_key("sw_never_seen_key_000000").generate_call("x", 2))
                assert code == grpc.StatusCode.UNAVAILABLE and "store is unavailable" in details
                code, _ = await rpc_error(client.generate_call("x", 2, policy="cold"))
                assert code == grpc.StatusCode.UNAVAILABLE

                redis.start()
                await eventually(lambda: app.alerts.backlog == 0, "the queued alerts to be written", timeout=15)
                assert app.metrics.alert_backlog._value.get() == 0
                stored = await app.store.read_alerts("acme", "0", count=100)
                assert stored[0].alert_id == before.alert_id
                assert [(a.fields["request_id"], a.fields["excerpt"], a.fields["token_end"]) for a in stored[1:]] == \
                    [(a.request_id, a.excerpt, str(a.token_end)) for a in during]  # in order, once each
                res = await client.generate("after", 2)  # and the store is used again directly
                assert res.alerts[0].alert_id and app.alerts.backlog == 0

    run(body(), timeout=90)


def test_fail_closed_refuses_while_the_store_is_down() -> None:
    async def body() -> None:
        with private_redis() as redis:
            async with replica_on(redis, store_outage="fail_closed") as (replica, client):
                await _prepared(client)
                redis.stop()
                code, details = await rpc_error(client.generate_call("abc", 3))
                assert code == grpc.StatusCode.UNAVAILABLE and "store is unavailable" in details
                assert replica.app.alerts.backlog == 0
                redis.start()
                for _ in range(100):  # the connection pool reconnects on the next call
                    try:
                        res = await client.generate("abc", 3)
                        break
                    except grpc.aio.AioRpcError:
                        await asyncio.sleep(0.1)
                assert res.alerts[0].alert_id

    run(body(), timeout=90)


def test_the_outbox_is_bounded() -> None:
    async def body() -> None:
        with private_redis() as redis:
            async with replica_on(redis, limits={"alert_buffer": 2}) as (replica, client):
                await _prepared(client)
                redis.stop()
                for _ in range(2):
                    assert (await client.generate("abc", 2)).alerts[0].alert_id == ""
                code, details = await rpc_error(client.generate_call("abc", 2))  # the third has nowhere to go
                assert code == grpc.StatusCode.UNAVAILABLE and "limits.alert_buffer" in details
                redis.start()
                await eventually(lambda: replica.app.alerts.backlog == 0, "the queue to drain", timeout=15)

    run(body(), timeout=90)
