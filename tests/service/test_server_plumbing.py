"""The server plumbing end to end: a real grpc.aio server on 127.0.0.1:0, a real channel, tiny servicers."""

from __future__ import annotations

import asyncio
import contextvars
import os
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, Field

from service import context as ctx
from service.metrics import Metrics
from service.protos import chat_pb2, chat_pb2_grpc, model_pb2, model_pb2_grpc, policy_pb2, policy_pb2_grpc
from service.server import ServerHandle, build_server
from service.settings import ConfigError, Settings
from service.store.base import Principal
from service.store.memory import MemoryStore
from steering import errors

T = TypeVar("T")
ADMIN_KEY = "admin-key-0123456789"
INFO = "/steerwatch.v1.ModelService/Info"
GENERATE = "/steerwatch.v1.ChatService/Generate"
GET_POLICY = "/steerwatch.v1.PolicyService/GetPolicy"
ERRORS: dict[str, tuple[type[errors.SteerwatchError], grpc.StatusCode]] = {
    "InvalidArgument": (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    "NotFound": (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    "AlreadyExists": (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    "LimitExceeded": (errors.LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    "FailedPrecondition": (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    "Unavailable": (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    "PermissionDenied": (ctx.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    "Unauthenticated": (ctx.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
}


class _Strange(errors.SteerwatchError):
    grpc_status = "NO_SUCH_CODE"


class _Req(BaseModel):
    count: int = Field(ge=1, le=10)


def _fail(kind: str) -> None:
    """Raise the error a test asks for by name."""
    if kind in ERRORS:
        raise ERRORS[kind][0](f"{kind}: detail for the caller", field="x")
    if kind == "runtime":
        raise RuntimeError("secret internal detail")
    if kind == "validation":
        _Req(count=99)
    if kind == "strange":
        raise _Strange("strange: detail")


# The generated bases give every other method its UNIMPLEMENTED default (typed Any: stubs load at runtime).
_Servicers: Any = type("_Servicers", (model_pb2_grpc.ModelServiceServicer, chat_pb2_grpc.ChatServiceServicer,
                                      policy_pb2_grpc.PolicyServiceServicer), {})


@dataclass
class App(_Servicers):
    """Test servicers (other methods: the generated UNIMPLEMENTED defaults); ``seen`` records (principal, request id) as the servicer saw them."""

    seen: list[tuple[Principal | None, str]] = field(default_factory=list)
    step_s: float = 0.0

    async def Info(self, request: Any, context: Any) -> Any:
        self.seen.append((ctx.principal.get(), ctx.current_request_id()))
        return model_pb2.InfoResponse(model="test", n_layers=2, d_model=64, engine="hf")

    async def GetPolicy(self, request: Any, context: Any) -> Any:
        _fail(request.name)
        return policy_pb2.PolicyRecord(name=ctx.current_request_id(), tenant=ctx.tenant_for(request.tenant))

    async def Generate(self, request: Any, context: Any) -> AsyncIterator[Any]:
        """prompt "<n>" or "<n>:<error kind>": n tokens, then the error (if any)."""
        n, _, kind = request.prompt.partition(":")
        for i in range(int(n)):
            if self.step_s:
                await asyncio.sleep(self.step_s)
            yield chat_pb2.GenerateResponse(token=chat_pb2.TokenDelta(index=i, text=f"t{i}"))
        _fail(kind)


def _add(app: App) -> Any:
    def add(server: grpc.aio.Server) -> list[str]:
        model_pb2_grpc.add_ModelServiceServicer_to_server(app, server)
        chat_pb2_grpc.add_ChatServiceServicer_to_server(app, server)
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(app, server)
        return ["steerwatch.v1.ModelService", "steerwatch.v1.ChatService", "steerwatch.v1.PolicyService"]
    return add


@dataclass
class Rig:
    handle: ServerHandle
    channel: grpc.aio.Channel
    app: App
    metrics: Metrics
    key: str  # a tenant key of tenant "acme"

    def auth(self, key: str | None = None, **extra: str) -> tuple[tuple[str, str], ...]:
        return (("x-api-key", key or self.key), *extra.items())

    async def info(self, metadata: Any = None) -> Any:
        return await model_pb2_grpc.ModelServiceStub(self.channel).Info(model_pb2.InfoRequest(), metadata=metadata)

    async def policy(self, name: str, tenant: str = "", key: str | None = None) -> Any:
        req = policy_pb2.GetPolicyRequest(name=name, tenant=tenant)
        return await policy_pb2_grpc.PolicyServiceStub(self.channel).GetPolicy(req, metadata=self.auth(key))

    def generate(self, prompt: str) -> Any:
        req = chat_pb2.GenerateRequest(prompt=prompt)
        return chat_pb2_grpc.ChatServiceStub(self.channel).Generate(req, metadata=self.auth())

    async def health(self, service: str = "") -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status


@asynccontextmanager
async def rig(serving: bool = True, step_s: float = 0.0, channel_credentials: grpc.ChannelCredentials | None = None,
              **settings: Any) -> AsyncIterator[Rig]:
    store, metrics, app = MemoryStore(), Metrics(), App(step_s=step_s)
    cfg = Settings(host="127.0.0.1", port=0, bootstrap_admin_key=ADMIN_KEY, **settings)
    handle = build_server(cfg, store, metrics, _add(app))
    await handle.start()
    if serving:
        await handle.set_serving()
    key, _ = await store.create_key("acme", "tenant")
    target = f"127.0.0.1:{handle.port}"
    channel = (grpc.aio.secure_channel(target, channel_credentials) if channel_credentials
               else grpc.aio.insecure_channel(target))
    try:
        yield Rig(handle, channel, app, metrics, key)
    finally:
        await channel.close()
        await handle.drain_and_stop(0)
        await asyncio.to_thread(metrics.stop_http)  # shutdown() waits up to 0.5 s for the serve loop


def run(coro: Awaitable[T], timeout: float = 15.0) -> T:
    """Run one test body; a hang fails the test instead of stalling the suite."""
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


async def _code_of(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


async def _drain_stream(call: Any) -> tuple[list[Any], grpc.StatusCode, str]:
    got: list[Any] = []
    try:  # read(), not async-for: a call may not mix the two styles and some tests read() first
        while (msg := await call.read()) is not grpc.aio.EOF:
            got.append(msg)
    except grpc.aio.AioRpcError as e:
        return got, e.code(), e.details() or ""
    return got, await call.code(), await call.details()


# ---- authentication and request ids ------------------------------------------------------------
def test_auth_and_request_id() -> None:
    async def body() -> None:
        async with rig() as r:
            assert await _code_of(r.info()) == (grpc.StatusCode.UNAUTHENTICATED,
                                                "missing API key: send it as x-api-key metadata")
            assert await _code_of(r.info(r.auth("sw_wrong"))) == (grpc.StatusCode.UNAUTHENTICATED,
                                                                   "unknown or revoked API key")
            assert r.app.seen == []  # the servicer never ran

            call = model_pb2_grpc.ModelServiceStub(r.channel).Info(
                model_pb2.InfoRequest(), metadata=r.auth(**{"x-request-id": "req-1.A_b"}))
            assert (await call).model == "test"
            assert ("x-request-id", "req-1.A_b") in tuple(await call.initial_metadata())
            principal, rid = r.app.seen[-1]
            assert principal is not None and (principal.tenant, principal.role) == ("acme", "tenant")
            assert rid == "req-1.A_b"

            await r.info((("authorization", f"Bearer {ADMIN_KEY}"), ("x-request-id", "bad id!")))
            principal, rid = r.app.seen[-1]
            assert principal is not None and principal.role == "admin"
            assert len(rid) == 32 and rid != "bad id!"  # invalid ids are replaced by a fresh uuid4 hex

            assert await r.health() == health_pb2.HealthCheckResponse.SERVING  # health needs no key
    run(body())


def test_tenant_for_rules() -> None:
    def as_(role: str) -> contextvars.Context:
        c = contextvars.copy_context()
        c.run(ctx.principal.set, Principal("acme", role, "k_1"))  # type: ignore[arg-type]
        return c

    tenant, admin = as_("tenant"), as_("admin")
    assert tenant.run(ctx.tenant_for, "") == "acme"
    assert tenant.run(ctx.tenant_for, "acme") == "acme"
    with pytest.raises(ctx.PermissionDenied) as e:
        tenant.run(ctx.tenant_for, "other")
    assert e.value.field == "tenant" and e.value.grpc_status == "PERMISSION_DENIED"
    assert admin.run(ctx.tenant_for, "other") == "other"
    assert admin.run(ctx.tenant_for, "") == "acme"
    with pytest.raises(ctx.Unauthenticated):
        contextvars.Context().run(ctx.current_principal)

    async def body() -> None:  # the same rules through a real RPC
        async with rig() as r:
            assert (await r.policy("ok", tenant="other", key=ADMIN_KEY)).tenant == "other"
            code, details = await _code_of(r.policy("ok", tenant="other"))
            assert code == grpc.StatusCode.PERMISSION_DENIED and details.startswith("tenant:")
    run(body())


# ---- error mapping ------------------------------------------------------------------------
def test_errors_map_to_status_codes() -> None:
    async def body() -> None:
        async with rig() as r:
            for kind, (_, code) in ERRORS.items():
                assert await _code_of(r.policy(kind)) == (code, f"{kind}: detail for the caller"), kind
                got, stream_code, details = await _drain_stream(r.generate(f"0:{kind}"))
                assert (got, stream_code, details) == ([], code, f"{kind}: detail for the caller"), kind
            assert await _code_of(r.policy("strange")) == (grpc.StatusCode.INTERNAL, "strange: detail")

            code, details = await _code_of(r.policy("validation"))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert details.startswith("invalid request: count: Input should be less than or equal to 10")

            call = policy_pb2_grpc.PolicyServiceStub(r.channel).GetPolicy(
                policy_pb2.GetPolicyRequest(name="runtime"), metadata=r.auth(**{"x-request-id": "rid-7"}))
            code, details = await _code_of(call)
            assert (code, details) == (grpc.StatusCode.INTERNAL, "internal error (request id rid-7)")
            assert ("x-request-id", "rid-7") in tuple(await call.initial_metadata())
    run(body())


def test_error_mid_stream_after_two_messages() -> None:
    async def body() -> None:
        async with rig() as r:
            got, code, details = await _drain_stream(r.generate("2:LimitExceeded"))
            assert [m.token.text for m in got] == ["t0", "t1"]
            assert (code, details) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "LimitExceeded: detail for the caller")
            got, code, details = await _drain_stream(r.generate("2:runtime"))
            assert len(got) == 2 and code == grpc.StatusCode.INTERNAL
            assert details.startswith("internal error (request id ") and "secret" not in details
            got, code, _ = await _drain_stream(r.generate("3"))
            assert len(got) == 3 and code == grpc.StatusCode.OK
    run(body())


def test_message_size_limit() -> None:
    async def body() -> None:
        async with rig(limits={"max_message_bytes": 1024}) as r:
            got, code, _ = await _drain_stream(r.generate("1" + " " * 2000))
            assert (got, code) == ([], grpc.StatusCode.RESOURCE_EXHAUSTED)
    run(body())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls(tmp_path: Any) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)

    async def body() -> None:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        async with rig(channel_credentials=creds, tls_cert_file=str(cert), tls_key_file=str(key)) as r:
            assert (await r.info(r.auth())).model == "test"
            async with grpc.aio.insecure_channel(f"127.0.0.1:{r.handle.port}") as plain:
                stub = model_pb2_grpc.ModelServiceStub(plain)
                code, _ = await _code_of(stub.Info(model_pb2.InfoRequest(), metadata=r.auth(), timeout=2))
                assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    run(body())


# ---- health, reflection, metrics ------------------------------------------------------------
def test_health_and_reflection() -> None:
    async def body() -> None:
        async with rig(serving=False) as r:
            not_serving, serving = health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING
            assert await r.health() == not_serving
            assert await r.health("steerwatch.v1.ChatService") == not_serving
            await r.handle.set_serving()
            assert await r.health() == serving
            assert await r.health("steerwatch.v1.ChatService") == serving

            stub = reflection_pb2_grpc.ServerReflectionStub(r.channel)
            replies = [m async for m in stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]))]
            names = {s.name for s in replies[0].list_services_response.service}
            assert names == {"steerwatch.v1.ModelService", "steerwatch.v1.ChatService", "steerwatch.v1.PolicyService",
                             "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    run(body())


def test_metrics_endpoint() -> None:
    async def body() -> None:
        async with rig() as r:
            port = r.metrics.start_http(0, "127.0.0.1")
            await r.info(r.auth())
            await _code_of(r.info())
            await _drain_stream(r.generate("2:LimitExceeded"))
            r.metrics.observe_engine(running=3, queued=1)
            url = f"http://127.0.0.1:{port}/metrics"
            text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for family in text_string_to_metric_families(text) for s in family.samples}
            requests = "steerwatch_requests_total"
            assert samples[(requests, (("code", "OK"), ("method", INFO)))] == 1
            assert samples[(requests, (("code", "UNAUTHENTICATED"), ("method", INFO)))] == 1
            assert samples[(requests, (("code", "RESOURCE_EXHAUSTED"), ("method", GENERATE)))] == 1
            assert samples[("steerwatch_request_duration_seconds_count", (("method", INFO),))] == 2
            assert samples[("steerwatch_batch_size", ())] == 3 and samples[("steerwatch_queue_depth", ())] == 1
    run(body())


# ---- drain and signals ------------------------------------------------------------------
def test_drain_lets_in_flight_finish_and_refuses_new_calls() -> None:
    async def body() -> None:
        async with rig(step_s=0.1) as r:
            watch = health_pb2_grpc.HealthStub(r.channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            stream = r.generate("6")
            first = await stream.read()
            assert first.token.text == "t0"

            drain = asyncio.create_task(r.handle.drain_and_stop(5.0))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert r.handle.draining.is_set()
            watch.cancel()  # a watcher would otherwise hold the drain for the whole grace period
            await asyncio.sleep(0.05)
            code, _ = await _code_of(r.info(r.auth()))
            assert code == grpc.StatusCode.UNAVAILABLE
            rest, code, _ = await _drain_stream(stream)
            assert len(rest) == 5 and code == grpc.StatusCode.OK
            await drain
            assert not drain.cancelled()
    run(body())


def test_drain_cancels_after_grace() -> None:
    async def body() -> None:
        async with rig(step_s=0.2) as r:
            stream = r.generate("100")
            await stream.read()
            await r.handle.drain_and_stop(0.3)
            got, code, _ = await _drain_stream(stream)
            assert len(got) < 99 and code != grpc.StatusCode.OK
            await asyncio.sleep(0.05)  # the server task's finally (metrics) runs after stop returns
            assert _counted(r.metrics, GENERATE) == {"CANCELLED"}
    run(body())


def test_deadline_is_counted_as_deadline_exceeded() -> None:
    async def body() -> None:
        async with rig(step_s=0.1) as r:
            call = chat_pb2_grpc.ChatServiceStub(r.channel).Generate(
                chat_pb2.GenerateRequest(prompt="50"), metadata=r.auth(), timeout=0.25)
            got, code, _ = await _drain_stream(call)
            assert 0 < len(got) < 50 and code == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.sleep(0.1)
            assert _counted(r.metrics, GENERATE) == {"DEADLINE_EXCEEDED"}
    run(body())


def _counted(metrics: Metrics, method: str) -> set[str]:
    """The status codes counted for ``method``."""
    return {s.labels["code"] for s in list(metrics.requests.collect())[0].samples
            if s.labels.get("method") == method and s.name.endswith("_total")}


def test_sigterm_drains_once() -> None:
    async def body() -> None:
        async with rig() as r:
            r.handle.install_signal_handlers(asyncio.get_running_loop())
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # a second signal joins the first drain
            await asyncio.wait_for(r.handle.wait_for_termination(), 5)
            code, _ = await _code_of(r.info(r.auth()))
            assert code == grpc.StatusCode.UNAVAILABLE
    run(body())


# ---- settings --------------------------------------------------------------------------
def test_settings_yaml_env_and_errors(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "steerwatch.yaml"
    cfg.write_text("port: 1234\nlimits:\n  max_batch: 8\n  max_queue: 9\nprobes:\n  - {id: p1, path: /p, layer: 3}\n")
    monkeypatch.setenv("STEERWATCH_CONFIG", str(cfg))
    monkeypatch.setenv("STEERWATCH_LIMITS__MAX_QUEUE", "5")
    s = Settings.load()
    assert (s.port, s.limits.max_batch, s.limits.max_queue, s.probes[0].layer) == (1234, 8, 5, 3)

    monkeypatch.setenv("STEERWATCH_LIMITS__MAX_BATCH", "5000")
    with pytest.raises(ConfigError, match=r"limits\.max_batch: Input should be less than or equal to 1024"):
        Settings.load()
    monkeypatch.delenv("STEERWATCH_LIMITS__MAX_BATCH")
    with pytest.raises(ConfigError) as e:
        Settings.load(bootstrap_admin_key="short-secret", tls_cert_file=str(cfg))
    assert "bootstrap_admin_key: must be at least 16 characters" in str(e.value)
    assert "short-secret" not in str(e.value)
    with pytest.raises(ConfigError, match="tls_cert_file and tls_key_file go together"):
        Settings.load(tls_cert_file=str(cfg))
    cfg.write_text("bogus: 1\n")
    with pytest.raises(ConfigError, match="bogus: Extra inputs are not permitted"):
        Settings.load()
