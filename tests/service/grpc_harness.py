"""Shared helpers of the gRPC integration tests (tests/service/test_grpc_*.py).

A real replica (``service.serve.start_replica``) on 127.0.0.1:0 with a tiny random LLaMA, a real
grpc.aio channel, and a store of either kind: the embedded MemoryStore, or a RedisStore on the test
Redis (STEERWATCH_TEST_REDIS_URL) under a unique key prefix that is deleted afterwards.

pytest-asyncio is not a dependency: every test drives its async body with ``run`` (asyncio.run with a
time limit, so a hang fails the test instead of stalling the suite).
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import cache
from typing import Any, TypeVar

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.models.loading import LoadedModel
from service.protos import (
    alert_pb2,
    alert_pb2_grpc,
    chat_pb2,
    chat_pb2_grpc,
    common_pb2,
    model_pb2,
    model_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    vector_pb2,
    vector_pb2_grpc,
)
from service.serve import Replica, start_replica
from service.settings import Settings
from service.store import open_store, redis_store
from service.store.base import Store

T = TypeVar("T")
REDIS_URL = os.environ.get("STEERWATCH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
STORES = ["memory", "redis"]
N_LAYERS, D_MODEL = 3, 64
TEST_TIMEOUT_S = 30.0
MODEL_NAME = "tiny-llama-seed1"


# ---- the model -----------------------------------------------------------------------------------
@cache
def tiny_lm(copy: int = 0) -> LoadedModel:
    """tiny_llama(n_layers=3, d_model=64, seed=1), built once per process per ``copy``.

    Copies have identical weights. A replica's engine installs hooks on its model and owns it from its
    own thread, so replicas running at the same time, or an in-process engine next to a running
    replica, each take a copy of their own.
    """
    from service.models.tiny import tiny_llama

    return tiny_llama(n_layers=N_LAYERS, d_model=D_MODEL, seed=1)


def random_vector(seed: int, scale: float = 1.0) -> list[float]:
    """d_model deterministic float values."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(D_MODEL, generator=g) * scale).tolist()


# ---- running ---------------------------------------------------------------------------------------
def run(coro: Awaitable[T], timeout: float = TEST_TIMEOUT_S) -> T:
    """Run one test body on a fresh event loop; fail it after ``timeout`` seconds."""
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


async def eventually(check: Callable[[], Any], what: str, timeout: float = 5.0) -> None:
    """Wait until ``check()`` is truthy; fail naming ``what`` otherwise."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


async def engine_idle(app: Any, what: str = "the engine to be idle") -> None:
    """No request running or queued. A finished request stays counted in ``engine.running`` until the
    engine thread's next turn (after its FinalRecord may have reached the client), hence the short wait."""
    await eventually(lambda: app.engine.running == 0 and app.engine.queued == 0, what, timeout=1.0)


async def rpc_error(call: Awaitable[Any] | Any) -> tuple[grpc.StatusCode, str]:
    """The status code and details of a failing unary call or stream (the stream is read to its end)."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if hasattr(call, "read"):
            while await call.read() is not grpc.aio.EOF:
                pass
        else:
            await call
    return info.value.code(), info.value.details() or ""


async def open_test_store(kind: str, prefix: str | None = None) -> Store:
    """A MemoryStore, or a RedisStore under ``prefix`` (a fresh unique one when None)."""
    if kind == "memory":
        return await open_store(None)
    return await open_store(REDIS_URL, prefix=prefix or unique_prefix())


def unique_prefix() -> str:
    return f"swtest:{uuid.uuid4().hex}:"


async def delete_prefix(prefix: str) -> None:
    """Remove every Redis key under ``prefix``."""
    await redis_store.delete_prefix(REDIS_URL, prefix)


# ---- one replica and a client ---------------------------------------------------------------------------
def policy_doc(monitors: Iterable[dict[str, Any]] = (), steering: Iterable[dict[str, Any]] = (),
               description: str | None = None, **limits: Any) -> str:
    """A policy JSON document; ``limits`` go to its "limits" object."""
    doc: dict[str, Any] = {"monitors": list(monitors), "steering": list(steering)}
    if description is not None:
        doc["description"] = description
    if limits:
        doc["limits"] = limits
    return json.dumps(doc)


def direction_monitor(name: str, vector_id: str, threshold: float, action: str = "alert", layer: int = 1,
                      **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": "direction", "source": vector_id, "layer": layer, "threshold": threshold,
            "action": action, **extra}


def add_steering(vector_id: str, coef: float, layers: list[int] | None = None, phase: str = "both") -> dict[str, Any]:
    entry: dict[str, Any] = {"kind": "add", "vector": vector_id, "coef": coef, "phase": phase}
    if layers is not None:
        entry["layers"] = layers
    return entry


@dataclass
class Result:
    """One Generate stream, split by event kind (``events`` keeps the order)."""

    events: list[Any]
    initial_metadata: dict[str, str]

    @property
    def tokens(self) -> list[Any]:
        return [e.token for e in self.events if e.WhichOneof("event") == "token"]

    @property
    def alerts(self) -> list[Any]:
        return [e.alert for e in self.events if e.WhichOneof("event") == "alert"]

    @property
    def final(self) -> Any:
        finals = [e.final for e in self.events if e.WhichOneof("event") == "final"]
        assert len(finals) == 1, f"expected one FinalRecord, got {len(finals)}"
        assert self.events[-1].WhichOneof("event") == "final", "the FinalRecord must be the last message"
        return finals[0]

    @property
    def token_ids(self) -> list[int]:
        return [t.token_id for t in self.tokens]

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)


@dataclass
class Client:
    """Stubs on one channel, with one API key."""

    channel: grpc.aio.Channel
    key: str
    chat: Any = field(init=False)
    policies: Any = field(init=False)
    vectors: Any = field(init=False)
    alerts: Any = field(init=False)
    model: Any = field(init=False)
    health: Any = field(init=False)

    def __post_init__(self) -> None:
        self.chat = chat_pb2_grpc.ChatServiceStub(self.channel)
        self.policies = policy_pb2_grpc.PolicyServiceStub(self.channel)
        self.vectors = vector_pb2_grpc.VectorServiceStub(self.channel)
        self.alerts = alert_pb2_grpc.AlertServiceStub(self.channel)
        self.model = model_pb2_grpc.ModelServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def md(self, request_id: str | None = None, key: str | None = None) -> tuple[tuple[str, str], ...]:
        out = (("x-api-key", self.key if key is None else key),)
        return out + ((("x-request-id", request_id),) if request_id else ())

    def with_key(self, key: str) -> Client:
        return Client(self.channel, key)

    # ---- chat ----
    def generate_call(self, prompt: str = "Tell me a story", max_tokens: int = 8, request_id: str | None = None,
                      timeout: float | None = None, **fields: Any) -> Any:
        req = chat_pb2.GenerateRequest(prompt=prompt, sampling=chat_pb2.SamplingParams(max_tokens=max_tokens),
                                       **fields)
        return self.chat.Generate(req, metadata=self.md(request_id), timeout=timeout)

    async def generate(self, prompt: str = "Tell me a story", max_tokens: int = 8, request_id: str | None = None,
                       **fields: Any) -> Result:
        call = self.generate_call(prompt, max_tokens, request_id, **fields)
        events = [e async for e in call]
        return Result(events, dict(await call.initial_metadata()))

    # ---- policies ----
    async def put_policy(self, name: str, document: str, make_default: bool = False, tenant: str = "") -> Any:
        return await self.policies.PutPolicy(policy_pb2.PutPolicyRequest(
            name=name, policy_json=document, make_default=make_default, tenant=tenant), metadata=self.md())

    async def get_policy(self, name: str, version: int = 0, tenant: str = "") -> Any:
        return await self.policies.GetPolicy(policy_pb2.GetPolicyRequest(name=name, version=version, tenant=tenant),
                                             metadata=self.md())

    async def list_policies(self, tenant: str = "") -> list[Any]:
        resp = await self.policies.ListPolicies(policy_pb2.ListPoliciesRequest(tenant=tenant), metadata=self.md())
        return list(resp.policies)

    async def delete_policy(self, name: str, tenant: str = "") -> Any:
        return await self.policies.DeletePolicy(policy_pb2.DeletePolicyRequest(name=name, tenant=tenant),
                                                metadata=self.md())

    # ---- vectors ----
    async def upload_vector(self, vector_id: str, per_layer: dict[int, list[float]], replace: bool = False,
                            tenant: str = "", method: str = "", source: str = "") -> Any:
        layers = [vector_pb2.LayerValues(layer=layer, values=values) for layer, values in per_layer.items()]
        return await self.vectors.UploadVector(vector_pb2.UploadVectorRequest(
            vector_id=vector_id, layers=layers, replace=replace, tenant=tenant, method=method, source=source),
            metadata=self.md())

    async def get_vector(self, vector_id: str, tenant: str = "") -> Any:
        return await self.vectors.GetVector(vector_pb2.GetVectorRequest(vector_id=vector_id, tenant=tenant),
                                            metadata=self.md())

    async def list_vectors(self, tenant: str = "") -> list[Any]:
        resp = await self.vectors.ListVectors(vector_pb2.ListVectorsRequest(tenant=tenant), metadata=self.md())
        return list(resp.vectors)

    async def delete_vector(self, vector_id: str, tenant: str = "") -> Any:
        return await self.vectors.DeleteVector(vector_pb2.DeleteVectorRequest(vector_id=vector_id, tenant=tenant),
                                               metadata=self.md())

    # ---- alerts, model, health ----
    def watch(self, after_id: str = "", tenant: str = "") -> Any:
        return self.alerts.WatchAlerts(alert_pb2.WatchAlertsRequest(after_id=after_id, tenant=tenant),
                                       metadata=self.md())

    async def info(self) -> Any:
        return await self.model.Info(model_pb2.InfoRequest(), metadata=self.md())

    async def health_status(self, service: str = "") -> int:
        return (await self.health.Check(health_pb2.HealthCheckRequest(service=service))).status


def add_entry(vector_id: str, coef: float, layers: Iterable[int] = (), phase: int = 0) -> Any:
    """A request-level SteeringEntry adding a vector."""
    return common_pb2.SteeringEntry(add=common_pb2.AddVector(vector_id=vector_id, coef=coef, layers=list(layers),
                                                             phase=phase))


def monitor_spec(name: str, vector_id: str, threshold: float, action: str = "annotate", layer: int = 1) -> Any:
    """A request-level direction MonitorSpec."""
    return chat_pb2.MonitorSpec(name=name, kind="direction", source=vector_id, layer=layer, has_layer=True,
                                threshold=threshold, action=action)


@dataclass
class Rig:
    """A running replica, a channel to it and a tenant key of tenant ``acme``."""

    replica: Replica
    client: Client
    store_kind: str
    prefix: str | None
    stopped: bool = False

    async def stop(self, grace: float) -> None:
        """Drain and stop the replica (the rig then only cleans up)."""
        self.stopped = True
        await self.replica.stop(grace)

    @property
    def app(self) -> Any:
        return self.replica.app

    @property
    def store(self) -> Store:
        return self.replica.app.store

    async def tenant_client(self, tenant: str, role: str = "tenant") -> Client:
        secret, _ = await self.store.create_key(tenant, role)  # type: ignore[arg-type]
        return self.client.with_key(secret)

    def metrics_text(self) -> str:
        url = f"http://127.0.0.1:{self.replica.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - a local test server
            return resp.read().decode()


def settings(**limits: Any) -> Settings:
    return Settings.load(None, host="127.0.0.1", port=0, metrics_port=0, limits=limits)


async def start(store_kind: str, *, lm_copy: int = 0, prefix: str | None = None, **limits: Any,
                ) -> tuple[Replica, str | None]:
    """Start a replica on a fresh store (Redis: ``prefix``, or a unique one)."""
    if store_kind == "redis":
        prefix = prefix or unique_prefix()
    store = await open_test_store(store_kind, prefix)
    replica = await start_replica(settings(**limits), lm=tiny_lm(lm_copy), store=store)
    return replica, prefix


@asynccontextmanager
async def rig(store_kind: str = "memory", *, lm_copy: int = 0, grace: float = 0.0, **limits: Any,
              ) -> AsyncIterator[Rig]:
    """A replica with a tenant key (tenant ``acme``) and a channel; stopped and cleaned up afterwards."""
    with one_torch_thread():
        async with _rig(store_kind, lm_copy=lm_copy, grace=grace, **limits) as r:
            yield r


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one intra-op thread while a test runs (restored afterwards).

    The tiny model gains nothing from a second thread, and on a small shared machine two OpenMP threads
    spin against any other load: a 400-token generation then takes seconds instead of 0.4 s, enough to
    break the timing assumptions of the cancel and drain tests.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@asynccontextmanager
async def _rig(store_kind: str, *, lm_copy: int, grace: float, **limits: Any) -> AsyncIterator[Rig]:
    replica, prefix = await start(store_kind, lm_copy=lm_copy, **limits)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}")
    r: Rig | None = None
    try:
        secret, _ = await replica.app.store.create_key("acme", "tenant")
        r = Rig(replica, Client(channel, secret), store_kind, prefix)
        yield r
    finally:
        await channel.close()
        if r is None or not r.stopped:
            await replica.stop(grace)
        if prefix is not None:
            await delete_prefix(prefix)


class Watcher:
    """Reads a WatchAlerts stream into ``got`` on a background task."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.got: list[Any] = []
        self.error: grpc.aio.AioRpcError | None = None
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for alert in self.call:
                self.got.append(alert)
        except grpc.aio.AioRpcError as e:
            self.error = e
        except asyncio.CancelledError:
            pass

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.wait({self.task}, timeout=5)


async def live_watch(store: Store, tenant: str, call: Any) -> Watcher:
    """Start reading ``call`` (a WatchAlerts from now on) and prove it is live.

    A "from now" watch resolves its start inside the servicer, at an unknown moment after the call is
    made; markers are added to the tenant's stream (through the store) until one arrives, so whatever is
    added after that is certain to be seen. ``got`` is emptied of the markers before returning.
    """
    w = Watcher(call)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not w.got:
        assert w.error is None, f"the watch failed: {w.error}"
        assert loop.time() < deadline, "the alert watch never became live"
        await store.add_alert(tenant, {"monitor": "marker", "action": "alert"})
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)  # markers already in flight
    assert all(a.monitor == "marker" for a in w.got)
    w.got.clear()
    return w
