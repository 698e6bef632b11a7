"""The Python client and the service CLI (serve, keys, chat, demo) against in-process replicas of a tiny model.

pytest-asyncio is not a dependency: each test drives its body with ``run`` (asyncio.run with a time
limit). CLI commands that talk to a replica run in a worker thread (``main`` starts its own event loop)
while the replica serves on the test's loop.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import grpc
import pytest
import torch

from service.cli import main
from service.client import SteerwatchClient, ablate, add, clamp, message, monitor
from service.models import tiny_llama
from service.protos import chat_pb2, common_pb2
from service.serve import Replica, start_replica
from service.settings import Settings
from service.store import open_store
from steering.errors import InvalidArgument, Unavailable
from tests.service.store_fixtures import REDIS_URL, delete_prefix, unique_prefix

T = TypeVar("T")
PAIRS = [("I love weddings.", "I love the weather."), ("A wedding today.", "The weather today.")]


def run(coro: Awaitable[T], timeout: float = 60.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


@asynccontextmanager
async def replica(store: Any = None) -> AsyncIterator[tuple[Replica, str]]:
    """A replica of its own tiny model (an engine owns its model) and a tenant key of tenant "acme"."""
    settings = Settings.load(None, host="127.0.0.1", port=0, metrics_port=0)
    r = await start_replica(settings, lm=tiny_llama(seed=0), store=store)
    try:
        key, _ = await r.app.store.create_key("acme", "tenant")
        yield r, key
    finally:
        await r.stop(0.5)


def client(r: Replica, key: str) -> SteerwatchClient:
    return SteerwatchClient(f"127.0.0.1:{r.port}", key, timeout=30)


def kinds(events: list[Any]) -> list[str]:
    return [e.WhichOneof("event") for e in events]


# ---- the client ----------------------------------------------------------------------------------
def test_helpers_build_protos() -> None:
    e = add("v", 1.5, layers=[1], phase="generation")
    assert (e.add.vector_id, e.add.coef, list(e.add.layers), e.add.phase) == ("v", 1.5, [1], common_pb2.PHASE_GENERATION)
    assert ablate("v").ablate.all_layers and list(ablate("v", [0, 1]).ablate.layers) == [0, 1]
    c = clamp("sae", 3, 2.0, max_multiple=True, layer=0)
    assert (c.clamp.feature, c.clamp.max_multiple, c.clamp.layer, c.clamp.has_layer) == (3, True, 0, True)
    m = monitor("m", "sae_feature", "sae", 0.5, action="stop", feature=7)
    assert (m.feature, m.action, m.has_layer) == (7, "stop", False)
    assert message("assistant", "hi").role == chat_pb2.ROLE_ASSISTANT
    for bad, field in ((lambda: add("v", 1, phase="later"), "phase"), (lambda: ablate("v", "most"), "layers"),
                       (lambda: message("bot", "x"), "role")):
        with pytest.raises(InvalidArgument) as err:
            bad()
        assert err.value.field == field


def test_every_client_method_round_trips() -> None:
    async def body() -> None:
        async with replica() as (r, key), client(r, key) as sw:
            info = await sw.info()
            assert (info.n_layers, info.d_model, "direction" in info.monitor_kinds) == (2, 64, True)
            assert await sw.health() == "SERVING"

            up = await sw.upload_vector("up", {0: [0.1] * 64, 1: torch.ones(64)}, method="manual", source="test")
            assert (list(up.layers), up.d_model, up.method) == ([0, 1], 64, "manual")
            made = await sw.create_vector_from_pairs("w", PAIRS, [1], position="mean")
            assert (made.vector_id, list(made.layers), made.method) == ("w", [1], "caa")
            assert (await sw.get_vector("w")).norm == made.norm
            assert [v.vector_id for v in await sw.list_vectors()] == ["up", "w"]

            doc = {"monitors": [{"name": "w", "kind": "direction", "source": "w", "threshold": -1e9, "action": "alert"}],
                   "steering": [{"kind": "add", "vector": "w", "coef": 1.0, "layers": [1]}]}
            first = await sw.put_policy("p", doc, make_default=True)
            second = await sw.put_policy("p", '{"description": "v2"}')
            assert (first.version, first.is_default, second.version, second.tenant) == (1, True, 2, "acme")
            assert "monitors" in (await sw.get_policy("p", version=1)).policy_json
            assert [p.name for p in await sw.list_policies()] == ["p"]
            await sw.put_policy("p", doc)  # v3: the monitor and steering again

            events = [e async for e in sw.generate("Hello", max_tokens=4, seed=3, temperature=0.5,
                                                    steering=[add("up", 0.5), ablate("up", [0])],
                                                    monitors=[monitor("m", "direction", "up", 1e9, layer=0)],
                                                    include_readings=True)]
            assert kinds(events)[-1] == "final" and "alert" in kinds(events)  # the default policy's monitor
            final = events[-1].final
            assert (final.policy, final.policy_version, final.usage.completion_tokens) == ("p", 3, 4)
            assert [(s.kind, s.origin) for s in final.steering] == [("add", "policy"), ("add", "request"),
                                                                   ("ablate", "request")]
            token = next(e.token for e in events if e.HasField("token"))
            assert set(token.readings) == {"w", "m"}
            alert_id = next(e.alert.alert_id for e in events if e.HasField("alert"))

            chat = [e async for e in sw.generate([("system", "Be brief."), {"role": "user", "content": "Hi"},
                                                  message("assistant", "Yes?"), ("user", "Go")], max_tokens=2)]
            assert chat[-1].final.usage.completion_tokens == 2

            async for alert in sw.watch_alerts(after_id="0"):
                assert (alert.alert_id, alert.monitor, alert.policy) == (alert_id, "w", "p")
                break

            async for _ in sw.generate("Hi", max_tokens=50):
                break  # leaving early cancels the call; the next one is served at once
            assert kinds([e async for e in sw.generate("Hi", max_tokens=1)])[-1] == "final"

            assert await sw.delete_policy("p") and await sw.delete_vector("up")
            assert [v.vector_id for v in await sw.list_vectors()] == ["w"]
    run(body())


def test_rpc_errors_surface_as_aio_rpc_errors() -> None:
    async def body() -> None:
        async with replica() as (r, key), client(r, key) as sw:
            await sw.create_vector_from_pairs("w", PAIRS, [1])
            cases = [(sw.get_policy("nope"), grpc.StatusCode.NOT_FOUND, "name"),
                     (sw.delete_vector("nope"), grpc.StatusCode.NOT_FOUND, "vector_id"),
                     (sw.upload_vector("x", {0: [1.0] * 3}), grpc.StatusCode.INVALID_ARGUMENT, "layers[0].values"),
                     (sw.list_policies(tenant="other"), grpc.StatusCode.PERMISSION_DENIED, "tenant"),
                     (sw.put_policy("q", "{"), grpc.StatusCode.INVALID_ARGUMENT, "policy_json")]
            for call, code, field in cases:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == code and (err.value.details() or "").startswith(field), err.value
            with pytest.raises(grpc.aio.AioRpcError) as err:
                _ = [e async for e in sw.generate("Hi", steering=[add("w", 100.0)])]
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "steering[0].coef" in (err.value.details() or "")
            async with SteerwatchClient(f"127.0.0.1:{r.port}", "sw_wrong") as bad:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await bad.info()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            async with SteerwatchClient(f"127.0.0.1:{r.port}", r.admin_key or "") as admin:
                assert (await admin.put_policy("p", {}, tenant="acme")).tenant == "acme"
                assert [p.name for p in await sw.list_policies()] == ["p"]
    run(body())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_on_grpc_metrics_alert_page_and_health(tmp_path: Any) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:steerwatch.internal"], check=True, capture_output=True)

    async def body() -> None:
        settings = Settings.load(None, host="127.0.0.1", port=0, metrics_port=0, tls_cert_file=str(cert),
                                 tls_key_file=str(key), http_tls=True)
        r = await start_replica(settings, lm=tiny_llama(seed=0))
        try:
            assert r.admin_key is not None
            for root in (str(cert), cert.read_bytes()):
                async with SteerwatchClient(f"127.0.0.1:{r.port}", r.admin_key, tls_root_cert=root) as sw:
                    assert (await sw.info()).n_layers == 2
            # the health command, with and without the CA
            target = ["--target", f"127.0.0.1:{r.port}", "--timeout", "5"]
            assert await asyncio.to_thread(main, ["health", *target, "--tls-root-cert", str(cert)]) == 0
            assert await asyncio.to_thread(main, ["health", *target]) == 1
            # as the Helm chart's TLS probes call it: 127.0.0.1, checked under the certificate's DNS name
            named = [*target, "--tls-root-cert", str(cert), "--tls-server-name"]
            assert await asyncio.to_thread(main, ["health", *named, "steerwatch.internal"]) == 0
            assert await asyncio.to_thread(main, ["health", *named, "impostor.example"]) == 1
            # http_tls: /metrics and the alerts page only over TLS, with the same certificate
            trusted = ssl.create_default_context(cafile=str(cert))
            url = f"https://127.0.0.1:{r.metrics_port}"
            silent = socket.create_connection(("127.0.0.1", r.metrics_port))  # connects, never says hello
            for path in ("/metrics", "/alerts/"):
                with await asyncio.to_thread(urllib.request.urlopen, url + path, timeout=5, context=trusted) as resp:
                    assert resp.status == 200
            with pytest.raises((urllib.error.URLError, ConnectionError)):
                await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{r.metrics_port}/metrics", timeout=5)
            silent.close()
        finally:
            await r.stop(0.5)
    run(body())


# ---- steerwatch chat -----------------------------------------------------------------------------
def chat_cli(r: Replica, key: str, *args: str) -> Awaitable[int]:
    return asyncio.to_thread(main, ["chat", "--target", f"127.0.0.1:{r.port}", "--api-key", key, *args])


def test_chat_one_turn_prints_tokens_alerts_and_summary(capsys: pytest.CaptureFixture[str]) -> None:
    async def body() -> tuple[int, int, str]:
        async with replica() as (r, key), client(r, key) as sw:
            await sw.create_vector_from_pairs("w", PAIRS, [1])
            await sw.put_policy("watch", {"monitors": [{"name": "w", "kind": "direction", "source": "w",
                                                         "threshold": -1e9, "action": "alert"}]})
            plain = [e async for e in sw.generate([("user", "Hello")], max_tokens=5)]
            ok = await chat_cli(r, key, "--max-tokens", "5", "--policy", "watch", "--readings", "Hello")
            missing = await chat_cli(r, key, "--policy", "missing", "Hello")
            return ok, missing, plain[-1].final.text
    ok, missing, text = run(body())
    out, err = capsys.readouterr()
    assert ok == 0 and text.strip() and text.strip()[:3] in out
    assert "[ALERT w " in out and "-> alert]" in out
    assert "[length, 5 tokens, policy watch v1," in out and "monitor w FIRED" in out
    assert missing == 1 and "error: NOT_FOUND: policy: no policy named 'missing'" in err


def test_chat_interactive_keeps_the_conversation(capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n\nHow are you?\n"))

    async def body() -> tuple[int, int]:
        async with replica() as (r, key):
            ok = await chat_cli(r, key, "--max-tokens", "3")
            monkeypatch.setattr("sys.stdin", io.StringIO("Hi\nAgain\n"))
            errors = await chat_cli(r, key, "--max-tokens", "999999")  # refused each turn, the loop goes on
            return ok, errors
    ok, errors = run(body())
    out, err = capsys.readouterr()
    assert (ok, errors) == (0, 0)
    assert out.count("[length, 3 tokens, no policy") == 2
    assert err.count("error: INVALID_ARGUMENT: sampling.max_tokens") == 2


def test_chat_needs_an_api_key(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STEERWATCH_API_KEY", raising=False)
    assert main(["chat", "Hello"]) == 2
    assert "--api-key" in capsys.readouterr().err


# ---- steerwatch demo, serve, keys ----------------------------------------------------------------
def test_demo_on_a_tiny_checkpoint(capsys: pytest.CaptureFixture[str], tiny_dir: Any) -> None:
    assert main(["demo", "--model", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    for part in ("1. vector 'weddings'", "2. calibration", "3. policy 'demo-weddings' v1",
                 "4. a conversation without a policy", "5. the same conversation under policy", "6. recap",
                 "monitor weddings FIRED", "[ALERT weddings", "steering applied under the policy: add weddings +2"):
        assert part in out, part
    received = int(out.split("alerts received on WatchAlerts: ")[1].split()[0])
    assert received >= 1 and out.count("weddings alert: peak") == received


def test_serve_with_a_bad_config_exits_2_naming_the_field(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("port: 99999\nlimits:\n  max_batch: 0\n")
    assert main(["serve", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "port: Input should be less than or equal to 65535" in err and "limits.max_batch" in err
    assert main(["serve", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read it" in capsys.readouterr().err
    cfg.write_text("prot: 1\n")
    assert main(["serve", "--config", str(cfg), "--metrics-port", "70000"]) == 2
    err = capsys.readouterr().err
    assert "prot:" in err and "metrics_port:" in err


def test_keys_create_needs_redis(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STEERWATCH_REDIS_URL", raising=False)
    assert main(["keys", "create", "--tenant", "acme"]) == 2
    err = capsys.readouterr().err
    assert "--redis-url" in err and "in-memory" in err
    assert main(["keys", "create", "--tenant", "bad tenant!", "--redis-url", REDIS_URL]) == 2
    assert "--tenant" in capsys.readouterr().err


def test_keys_create_mints_a_key_that_authenticates(capsys: pytest.CaptureFixture[str]) -> None:
    prefix = unique_prefix()
    try:
        run(_ping_redis())
        assert main(["keys", "create", "--tenant", "acme", "--redis-url", REDIS_URL, "--prefix", prefix]) == 0
        secret = capsys.readouterr().out.strip().splitlines()[-1]
        assert secret.startswith("sw_")

        async def body() -> list[Any]:
            async with replica(await open_store(REDIS_URL, prefix=prefix)) as (r, _), client(r, secret) as sw:
                await sw.put_policy("mine", {})
                return await sw.list_policies()
        assert [(p.name, p.tenant) for p in run(body())] == [("mine", "acme")]
    finally:
        run(delete_prefix(REDIS_URL, prefix))


async def _ping_redis() -> None:
    try:
        store = await open_store(REDIS_URL)
    except Unavailable as exc:
        pytest.fail(f"these tests need Redis at STEERWATCH_TEST_REDIS_URL={REDIS_URL!r}: {exc}")
    await store.close()
