"""Lifecycle of a generation and of the replica: cancel and deadline free the engine slot at once;
shutdown drains (in-flight streams finish, new calls are refused, health goes NOT_SERVING)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families

from service.protos import chat_pb2
from tests.service.grpc_harness import (
    STORES,
    Client,
    Rig,
    Watcher,
    eventually,
    monitor_spec,
    policy_doc,
    random_vector,
    rig,
    rpc_error,
    run,
)

LONG_PROMPT = "zzz"  # greedy on the tiny model: no EOS within 2000 tokens (~2.5 s of decoding)
LONG = 2000


async def _long_policy(r: Rig) -> None:
    await r.client.put_policy("long", policy_doc(max_tokens=LONG, default_max_tokens=16))


def _requests_total(r: Rig, method: str, code: str) -> float:
    text = r.metrics_text()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "steerwatch_requests_total" and s.labels == {"method": method, "code": code}:
                return s.value
    return 0.0


GENERATE = "/steerwatch.v1.ChatService/Generate"


@pytest.mark.parametrize("store_kind", STORES)
def test_cancel_mid_stream_frees_the_engine_slot(store_kind: str) -> None:
    async def body() -> None:
        async with rig(store_kind) as r:
            await _long_policy(r)
            engine = r.app.engine
            call = r.client.generate_call(LONG_PROMPT, LONG, policy="long")
            tokens = []
            while len(tokens) < 2:
                msg = await call.read()
                assert msg is not grpc.aio.EOF and msg.HasField("token")
                tokens.append(msg.token)
            assert [t.index for t in tokens] == [0, 1]
            steps_at_cancel = engine.steps
            assert engine.running == 1
            call.cancel()
            await eventually(lambda: engine.running == 0, "the slot to be freed", timeout=5)
            steps = engine.steps
            assert steps - steps_at_cancel < LONG // 2  # stopped early, did not decode to the end
            await asyncio.sleep(0.2)
            assert engine.steps == steps and engine.running == 0 and engine.queued == 0  # nothing decodes on
            assert await call.code() == grpc.StatusCode.CANCELLED
            await eventually(lambda: _requests_total(r, GENERATE, "CANCELLED") == 1.0, "CANCELLED to be counted")
            res = await r.client.generate("abc", 3)  # the slot is usable again
            assert res.final.finish_reason == chat_pb2.FINISH_REASON_LENGTH
    run(body())


@pytest.mark.parametrize("store_kind", STORES)
def test_deadline_exceeded_frees_the_engine_slot(store_kind: str) -> None:
    async def body() -> None:
        async with rig(store_kind) as r:
            await _long_policy(r)
            engine = r.app.engine
            start = time.monotonic()
            code, _ = await rpc_error(r.client.generate_call(LONG_PROMPT, LONG, policy="long", timeout=0.3))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - start < 2.0
            await eventually(lambda: engine.running == 0, "the slot to be freed", timeout=5)
            steps = engine.steps
            assert steps < LONG // 2
            await asyncio.sleep(0.2)
            assert engine.steps == steps and engine.running == 0
            await eventually(lambda: _requests_total(r, GENERATE, "DEADLINE_EXCEEDED") == 1.0, "the deadline counted")
            res = await r.client.generate("abc", 3)
            assert res.final.finish_reason == chat_pb2.FINISH_REASON_LENGTH
    run(body())


@pytest.mark.parametrize("store_kind", STORES)
def test_shutdown_drains_in_flight_streams(store_kind: str) -> None:
    n = 400  # ~0.5 s of decoding: still in flight when the drain starts, done well within the grace

    async def body() -> None:
        async with rig(store_kind) as r:
            c = r.client
            await _long_policy(r)
            health = c.health.Watch(health_pb2.HealthCheckRequest(service="steerwatch.v1.ChatService"))
            assert (await health.read()).status == health_pb2.HealthCheckResponse.SERVING
            alerts = Watcher(c.watch())  # an endless stream must not hold the drain for the whole grace
            call = c.generate_call(LONG_PROMPT, n, policy="long")
            first = await call.read()
            assert first.HasField("token")

            start = time.monotonic()
            stopping = asyncio.ensure_future(r.stop(5.0))
            assert (await health.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            health.cancel()
            code, _ = await rpc_error(c.generate_call("abc", 2))  # refused while draining
            assert code == grpc.StatusCode.UNAVAILABLE

            rest = []
            while (msg := await call.read()) is not grpc.aio.EOF:
                rest.append(msg)
            assert await call.code() == grpc.StatusCode.OK
            assert [m.token.index for m in rest[:-1]] == list(range(1, n))
            final = rest[-1].final
            assert final.finish_reason == chat_pb2.FINISH_REASON_LENGTH and final.usage.completion_tokens == n

            await stopping
            assert time.monotonic() - start < 4.0  # not the full grace: the alert watch ended on the drain
            await asyncio.wait_for(alerts.task, 1)
            assert alerts.error is None and alerts.got == []

            code, _ = await rpc_error(c.generate_call("abc", 2))  # stopped: nothing listens any more
            assert code == grpc.StatusCode.UNAVAILABLE
            code, _ = await rpc_error(c.health.Check(health_pb2.HealthCheckRequest()))
            assert code == grpc.StatusCode.UNAVAILABLE
            assert r.app.engine.running == 0
    run(body())


def test_server_request_timeout_ends_a_long_generation() -> None:
    async def body() -> None:
        async with rig("memory", request_timeout_seconds=0.3) as r:
            await _long_policy(r)
            call = r.client.generate_call(LONG_PROMPT, LONG, policy="long")  # no client deadline
            start = time.monotonic()
            received = 0
            with pytest.raises(grpc.aio.AioRpcError) as info:
                while (msg := await asyncio.wait_for(call.read(), 3)) is not grpc.aio.EOF:
                    assert msg.HasField("token")
                    received += 1
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert (info.value.details() or "").startswith("request_timeout_seconds:")
            assert 0.25 < time.monotonic() - start < 2.0 and 0 < received < LONG
            await eventually(lambda: r.app.engine.running == 0, "the slot to be freed", timeout=5)
            await eventually(lambda: _requests_total(r, GENERATE, "DEADLINE_EXCEEDED") == 1.0, "the timeout counted")
            res = await r.client.generate("abc", 3)  # short generations are unaffected
            assert res.final.finish_reason == chat_pb2.FINISH_REASON_LENGTH
    run(body())


def test_shutdown_cancels_streams_still_running_after_the_grace() -> None:
    async def body() -> None:
        async with rig("memory") as r:
            await _long_policy(r)
            call = r.client.generate_call(LONG_PROMPT, LONG, policy="long")
            assert (await call.read()).HasField("token")
            start = time.monotonic()
            stopping = asyncio.ensure_future(r.stop(0.3))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                while (msg := await call.read()) is not grpc.aio.EOF:
                    assert msg.HasField("token")  # never a FinalRecord: it is cut off
            assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
            await stopping
            assert 0.25 < time.monotonic() - start < 3.0
            assert r.app.engine.running == 0
    run(body())


def test_server_request_timeout_reaches_a_slow_reader() -> None:
    async def body() -> None:
        async with rig("memory", request_timeout_seconds=0.3) as r:
            # a receive window that stays small (no BDP probing): the server's writes soon wait on the reader
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{r.replica.port}", options=[("grpc.http2.bdp_probe", 0)])
            c = Client(channel, r.client.key)
            await c.upload_vector("v", {1: random_vector(1)})
            await _long_policy(r)
            wide = [monitor_spec(f"m{i:02d}" + "x" * 60, "v", 1e9) for i in range(64)]  # ~5 KB per token
            call = c.generate_call(LONG_PROMPT, LONG, policy="long", include_readings=True, monitors=wide)
            assert (await call.read()).HasField("token")
            await asyncio.sleep(0.6)  # a slow reader: the timeout expires while the server waits to write
            try:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    while (msg := await asyncio.wait_for(call.read(), 1.5)) is not grpc.aio.EOF:
                        assert msg.HasField("token")
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            except TimeoutError:
                raise AssertionError("the stream neither ended nor failed: no status reached the client") from None
            finally:
                call.cancel()
                await channel.close()
            await eventually(lambda: r.app.engine.running == 0, "the slot to be freed")
    run(body())
