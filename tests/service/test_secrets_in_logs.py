"""No secret reaches a log line or an error message: the bootstrap admin key, tenant keys (good and
wrong ones), and the Redis password, through a replica's whole life: start, traffic, refused keys, a
Redis outage and its return, bad settings, and shutdown. Everything is logged at DEBUG, libraries too."""

from __future__ import annotations

import asyncio
import logging
import shutil

import grpc
import pytest

from service.serve import start_replica
from service.settings import ConfigError, Settings
from service.store import open_store
from steering.errors import Unavailable
from tests.service.grpc_harness import (
    Client,
    direction_monitor,
    policy_doc,
    random_vector,
    rpc_error,
    run,
    tiny_lm,
)
from tests.service.test_store_outage import _free_port, private_redis

BOOTSTRAP = "sw_admin_BOOTSTRAP-SECRET-4f9a2c"
REDIS_PASSWORD = "redis-PASSWORD-SECRET-77b1"
WRONG_KEY = "sw_WRONG-KEY-SECRET-0d3e"


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_no_secret_is_ever_logged(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = [BOOTSTRAP, REDIS_PASSWORD, WRONG_KEY]

    async def body() -> None:
        with private_redis("--requirepass", REDIS_PASSWORD) as redis:
            url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis.port}/0"
            for _ in range(100):
                try:
                    store = await open_store(url)
                    break
                except Unavailable as exc:
                    assert REDIS_PASSWORD not in str(exc)
                    await asyncio.sleep(0.05)
            settings = Settings.load(None, host="127.0.0.1", port=0, metrics_port=0, redis_url=url,
                                     bootstrap_admin_key=BOOTSTRAP)
            replica = await start_replica(settings, lm=tiny_lm(), store=store)
            tenant_key, _ = await store.create_key("acme", "tenant")
            secrets.append(tenant_key)
            client = Client(grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}"), tenant_key)
            try:
                await client.upload_vector("v", {1: random_vector(0)})
                await client.put_policy("p", policy_doc([direction_monitor("m", "v", -1e9)]), make_default=True)
                await client.generate("abc", 3)
                for call in (client.with_key(WRONG_KEY).generate_call("abc", 2),
                             client.with_key(BOOTSTRAP + "x").generate_call("abc", 2),
                             client.generate_call("abc", 2, policy="missing")):
                    await rpc_error(call)
                redis.stop()  # store errors, queued alerts, a broken invalidation stream: all logged
                await client.generate("abc", 2)
                await rpc_error(client.with_key(WRONG_KEY).generate_call("abc", 2))
            finally:
                await client.channel.close()
                await replica.stop(0)
            with pytest.raises(Unavailable) as info:  # an unreachable Redis: the error names the URL
                await open_store(f"redis://:{REDIS_PASSWORD}@127.0.0.1:{_free_port()}/0")
            assert "***" in str(info.value) and REDIS_PASSWORD not in str(info.value)

    run(body(), timeout=90)
    with pytest.raises(ConfigError) as bad:
        Settings.load(None, bootstrap_admin_key="short-SECRET")
    assert "short-SECRET" not in str(bad.value)

    out, err = capfd.readouterr()
    text = caplog.text + out + err
    assert "store is unavailable" in text or "queueing alerts" in text  # the outage was logged
    for secret in secrets:
        assert secret not in text, f"a secret reached the logs: {secret[:12]}..."
