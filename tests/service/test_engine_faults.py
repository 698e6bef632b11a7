"""Faults inside the engine, through the real gRPC server: one request's failure stays its own, a dead
engine turns health NOT_SERVING, a thousand cancelled streams leave nothing behind, and SIGTERM under
load drains every in-flight stream to its final record."""

from __future__ import annotations

import asyncio
import gc
import signal
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from service.protos import chat_pb2
from tests.service.grpc_harness import add_steering, engine_idle, eventually, policy_doc, rig, rpc_error, run
from tests.service.test_grpc_lifecycle import LONG, LONG_PROMPT, _long_policy


async def read_rest(call: Any) -> list[Any]:
    """The rest of a stream already read from with read() (grpc forbids mixing it with iteration)."""
    out = []
    while (msg := await call.read()) is not grpc.aio.EOF:
        out.append(msg)
    return out


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def test_a_request_whose_edit_blows_up_fails_alone_with_a_reason() -> None:
    async def body() -> None:
        async with rig("memory") as r:
            c = r.client
            await c.upload_vector("huge", {1: [3e38] * 64})  # finite, but times 16 it is not
            await c.put_policy("boom", policy_doc([], [add_steering("huge", 16.0)], max_abs_coef=16.0))
            plain = (await c.generate("Tell me a story", 8)).token_ids
            bad, *good = await asyncio.gather(c.generate("abc", 8, policy="boom"),
                                              *[c.generate("Tell me a story", 8) for _ in range(3)])
            assert bad.final.finish_reason == chat_pb2.FINISH_REASON_ERROR
            assert "non-finite" in bad.final.error
            for g in good:  # the batch mates: untouched, token for token
                assert g.token_ids == plain and g.final.error == ""
            await engine_idle(r.app)

    run(body())


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's death
def test_a_dead_engine_turns_health_not_serving_and_ends_its_requests() -> None:
    async def body() -> None:
        async with rig("memory") as r:
            c = r.client
            await _long_policy(r)
            call = c.generate_call(LONG_PROMPT, LONG, policy="long")
            assert (await call.read()).HasField("token")

            def fatal() -> None:
                raise SystemExit("simulated fatal engine error")  # not an Exception: kills the thread

            r.app.engine.call(fatal)
            await eventually(lambda: not r.app.engine.alive, "the engine thread to die")
            await eventually(lambda: r.app.metrics.serving._value.get() == 0, "serving gauge 0", timeout=5)
            assert await c.health_status() == NOT_SERVING
            assert await c.health_status("steerwatch.v1.ChatService") == NOT_SERVING
            rest = await read_rest(call)  # the in-flight stream ends, with a final record saying why
            final = rest[-1].final
            assert final.finish_reason in (chat_pb2.FINISH_REASON_CANCELLED, chat_pb2.FINISH_REASON_ERROR)
            assert "engine" in final.error
            code, details = await rpc_error(c.generate_call("abc", 2))
            assert code == grpc.StatusCode.UNAVAILABLE and "engine: not running" in details

    run(body())


def test_a_thousand_cancelled_streams_leak_nothing() -> None:
    async def body() -> None:
        async with rig("memory") as r:
            c = r.client
            await _long_policy(r)
            await c.generate("abc", 2)  # warm

            async def cancel_after_first_token() -> None:
                call = c.generate_call(LONG_PROMPT, LONG, policy="long")
                assert (await call.read()).HasField("token")
                call.cancel()

            gc.collect()
            tasks_before = len(asyncio.all_tasks())
            for _ in range(20):
                await asyncio.gather(*[cancel_after_first_token() for _ in range(50)])
            await engine_idle(r.app, "every cancelled request to leave the engine")
            await eventually(lambda: r.app.streams.open("acme") == 0, "every stream slot to be free")
            await eventually(lambda: len(asyncio.all_tasks()) <= tasks_before, "the RPC tasks to end", timeout=5)
            engine = r.app.engine
            assert engine.running == 0 and engine.queued == 0 and engine._running == []
            assert (await c.generate("abc", 3)).final.usage.completion_tokens >= 1  # still serving

    run(body(), timeout=180)


def test_sigterm_under_load_drains_every_stream_to_its_final_record() -> None:
    async def body() -> None:
        async with rig("memory", grace=10.0, grace_seconds=10.0) as r:
            c = r.client
            await r.client.put_policy("mid", policy_doc(max_tokens=300, default_max_tokens=16))
            calls = [c.generate_call(LONG_PROMPT, 300, policy="mid") for _ in range(12)]
            for call in calls:
                assert (await call.read()).HasField("token")
            r.replica.handle._on_signal(signal.SIGTERM)  # what the installed handler does on SIGTERM
            await eventually(lambda: r.replica.handle.draining.is_set(), "the drain to start")
            code, _ = await rpc_error(c.generate_call("abc", 2))
            assert code == grpc.StatusCode.UNAVAILABLE  # new streams refused while draining
            for call in calls:  # no torn stream: every one ends with its final record and OK
                rest = await read_rest(call)
                assert rest[-1].HasField("final") and rest[-1].final.usage.completion_tokens == 300
                assert await call.code() == grpc.StatusCode.OK
            r.stopped = True

    run(body(), timeout=120)
