"""The live alerts view's HTTP side on a real replica: the page and its headers, the JSON API's auth,
tenant rule and parameter errors, its agreement with the in-band alerts, and 503 when Redis is gone.
(The page's script is tested in headless Chromium: tests/deploy/test_alert_view_browser.py.)"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

import grpc
import pytest

from service.protos import policy_pb2
from service.serve import start_replica
from service.settings import Settings
from service.store import open_store
from steering.errors import Unavailable
from tests.service.grpc_harness import (
    Client,
    direction_monitor,
    policy_doc,
    random_vector,
    rig,
    rpc_error,
    run,
    tiny_lm,
)

FIRES = -1e9  # every token exceeds it: one alert per generation


def http(port: int, path: str, key: str | None = None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """A blocking request to the replica's HTTP port (call it from a thread: the API waits on the loop)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - a local test server
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


async def api(port: int, query: str, key: str | None) -> tuple[int, dict[str, Any]]:
    status, _, body = await asyncio.to_thread(http, port, "/alerts/api/recent" + query, key)
    return status, json.loads(body)


def test_page_and_assets_are_served_with_a_strict_policy() -> None:
    async def body() -> None:
        async with rig("memory") as r:
            port = r.replica.metrics_port
            status, headers, page = await asyncio.to_thread(http, port, "/alerts/")
            assert status == 200 and headers["Content-Type"].startswith("text/html")
            assert b'<script src="app.js"></script>' in page
            csp = headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
            for asset, ctype in (("app.js", "text/javascript"), ("app.css", "text/css")):
                status, headers, data = await asyncio.to_thread(http, port, "/alerts/" + asset)
                assert status == 200 and headers["Content-Type"].startswith(ctype) and data
            # urllib follows the redirect from /alerts to /alerts/
            status, _, page2 = await asyncio.to_thread(http, port, "/alerts")
            assert status == 200 and page2 == page
            assert (await asyncio.to_thread(http, port, "/alerts/nope"))[0] == 404
            assert (await asyncio.to_thread(http, port, "/elsewhere"))[0] == 404
            assert (await asyncio.to_thread(http, port, "/alerts/api/recent", None, "POST"))[0] == 405
            status, _, metrics = await asyncio.to_thread(http, port, "/metrics")
            assert status == 200 and b"steerwatch_requests_total" in metrics

    run(body())


@pytest.mark.parametrize("store_kind", ["memory", "redis"])
def test_api_returns_the_in_band_alerts_of_the_keys_tenant(store_kind: str) -> None:
    async def body() -> None:
        async with rig(store_kind) as r:
            port = r.replica.metrics_port
            acme, other = r.client, await r.tenant_client("globex")
            admin = await r.tenant_client("ops", role="admin")
            for c in (acme, other):
                await c.upload_vector("v", {1: random_vector(0)})
                await c.put_policy("p", policy_doc([direction_monitor("mon", "v", FIRES)]), make_default=True)
            in_band = [(await acme.generate("abc", 4)).alerts[0] for _ in range(3)]
            await other.generate("abc", 2)

            status, got = await api(port, "", acme.key)
            assert status == 200 and got["tenant"] == "acme"
            assert [a["id"] for a in got["alerts"]] == [a.alert_id for a in in_band]  # oldest first
            for a, b in zip(got["alerts"], in_band, strict=True):
                assert (a["monitor"], a["action"], a["excerpt"]) == (b.monitor, b.action, b.excerpt)
                assert (a["token_start"], a["token_end"], a["request_id"]) == (b.token_start, b.token_end, b.request_id)
                assert a["peak_score"] == pytest.approx(b.peak_score) and a["threshold"] == FIRES
            assert got["last_id"] == in_band[-1].alert_id

            status, latest = await api(port, "?count=2", acme.key)
            assert [a["id"] for a in latest["alerts"]] == [a.alert_id for a in in_band[1:]]
            status, newer = await api(port, f"?after={in_band[0].alert_id}", acme.key)
            assert [a["id"] for a in newer["alerts"]] == [a.alert_id for a in in_band[1:]]
            status, none = await api(port, f"?after={in_band[-1].alert_id}", acme.key)
            assert none["alerts"] == [] and none["last_id"] == in_band[-1].alert_id

            status, theirs = await api(port, "", other.key)  # isolation: only globex's one alert
            assert len(theirs["alerts"]) == 1 and theirs["tenant"] == "globex"
            status, as_admin = await api(port, "?tenant=acme", admin.key)
            assert status == 200 and [a["id"] for a in as_admin["alerts"]] == [a.alert_id for a in in_band]

    run(body())


def test_api_refuses_bad_keys_other_tenants_and_bad_parameters() -> None:
    async def body() -> None:
        async with rig("memory") as r:
            port, key = r.replica.metrics_port, r.client.key
            status, headers, raw = await asyncio.to_thread(http, port, "/alerts/api/recent")
            assert status == 401 and headers["WWW-Authenticate"] == "Bearer" and b"Authorization: Bearer" in raw
            assert (await api(port, "", "sw_not_a_key"))[0] == 401
            status, err = await api(port, "?tenant=globex", key)
            assert status == 403 and err["field"] == "tenant" and "admin" in err["error"]
            admin = await r.tenant_client("ops", role="admin")
            for query, field in (("?count=0", "count"), ("?count=501", "count"), ("?count=x", "count"),
                                 ("?after=abc", "after"), ("?after=1-", "after"), ("?tenant=%7Bx%7D", "tenant")):
                status, err = await api(port, query, admin.key)
                assert status == 400 and err["field"] == field, (query, err)
            assert (await api(port, "?count=500", key))[0] == 200

    run(body())


def test_alert_view_can_be_switched_off() -> None:
    async def body() -> None:
        settings = Settings.load(None, host="127.0.0.1", port=0, metrics_port=0, alert_view=False)
        replica = await start_replica(settings, lm=tiny_lm(), store=await open_store(None))
        try:
            assert (await asyncio.to_thread(http, replica.metrics_port, "/alerts/"))[0] == 404
            assert (await asyncio.to_thread(http, replica.metrics_port, "/metrics"))[0] == 200
        finally:
            await replica.stop(0)

    run(body())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server to run a private Redis")
def test_while_redis_is_down_the_api_answers_503_and_rpcs_unavailable() -> None:
    """A replica's private Redis stops: the alerts API says 503 and RPCs UNAVAILABLE (retryable) at once,
    never a hang, a 500 or INTERNAL."""
    port = _free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)

    async def body() -> None:
        for _ in range(100):
            try:
                store = await open_store(f"redis://127.0.0.1:{port}/0")
                break
            except Unavailable:  # not up yet
                await asyncio.sleep(0.05)
        settings = Settings.load(None, host="127.0.0.1", port=0, metrics_port=0)
        replica = await start_replica(settings, lm=tiny_lm(), store=store)
        secret, _ = await store.create_key("acme", "tenant")
        client = Client(grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}"), secret)
        try:
            assert (await api(replica.metrics_port, "", secret))[0] == 200
            assert await client.list_policies() == []
            proc.terminate()
            proc.wait(10)
            started = time.monotonic()
            status, err = await api(replica.metrics_port, "", secret)
            assert status == 503 and "store" in err["error"], err
            for call in (client.policies.ListPolicies(policy_pb2.ListPoliciesRequest(), metadata=client.md()),
                         client.generate_call("abc", 2)):
                code, details = await rpc_error(call)
                assert code == grpc.StatusCode.UNAVAILABLE and "store is unavailable" in details, (code, details)
            assert time.monotonic() - started < 10
        finally:
            await client.channel.close()
            await replica.stop(0)

    try:
        run(body(), timeout=60)
    finally:
        proc.kill()


def test_the_http_port_bounds_its_connections() -> None:
    """Idle connections beyond the bound are answered 503 at once instead of each holding a thread; once
    they go, the port serves again."""
    async def body() -> None:
        from service.metrics import Metrics, _BoundedServer

        metrics = Metrics()
        port = metrics.start_http(0, "127.0.0.1")
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(_BoundedServer.max_connections)]
        try:
            await asyncio.sleep(0.2)
            status, _, _ = await asyncio.to_thread(http, port, "/metrics")
            assert status == 503
        finally:
            for s in idle:
                s.close()
        await asyncio.sleep(0.2)
        status, _, body = await asyncio.to_thread(http, port, "/metrics")
        assert status == 200 and b"steerwatch_requests_total" in body
        await asyncio.to_thread(metrics.stop_http)

    run(body())
