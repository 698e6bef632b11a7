"""The compose stack without Docker (no engine here): its pieces run natively on loopback with the
stack's own files. `steerwatch serve --config deploy/steerwatch.compose.yaml` on the real default model
and its monitor pack, Redis, and Prometheus with deploy/prometheus/prometheus.yml (only the target's
address and the rules' path rewritten). Driven the way an operator does: the compose health check
command until SERVING, `steerwatch keys create` for a tenant key, a policy on a pack monitor, a chat
whose alerts show in-band, on the alerts page's API and in Prometheus, then SIGTERM and a clean drain.

Slow: the default model loads, and `engine: auto` starts vLLM's CPU build where it is installed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from service.client import SteerwatchClient
from service.models.default import default_model_dir
from tests.deploy.test_docker_compose import DEPLOY, compose
from tests.deploy.test_prometheus_live import _free_port, prometheus_from, query, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("prometheus") is None,
                       reason="needs redis-server and prometheus (scripts/test.sh installs them)"),
    pytest.mark.skipif(not default_model_dir().exists(), reason="needs `steerwatch prepare` (scripts/test.sh runs it)"),
]
ADMIN_KEY = "sw_admin_native_stack_0123456789"
BIN = Path(sys.executable).parent


@contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def healthy(command: list[str], env: dict[str, str]) -> bool:
    return subprocess.run(command, env=env, capture_output=True, timeout=30).returncode == 0


def test_the_stack_natively_serves_alerts_metrics_and_drains(tmp_path: Path) -> None:
    grpc_port, http_port, redis_port = _free_port(), _free_port(), _free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    service = compose()["services"]["steerwatch"]
    env = {**os.environ, "STEERWATCH_REDIS_URL": redis_url, "STEERWATCH_BOOTSTRAP_ADMIN_KEY": ADMIN_KEY,
           "STEERWATCH_HOST": "127.0.0.1", "STEERWATCH_PORT": str(grpc_port),
           "STEERWATCH_METRICS_PORT": str(http_port)}
    serve = [str(BIN / "steerwatch"), "serve", "--config", str(DEPLOY / "steerwatch.compose.yaml")]
    assert service["command"] == serve[1:3] + ["/etc/steerwatch/steerwatch.yaml"]
    check = [sys.executable if w == "python" else w for w in service["healthcheck"]["test"][1:]]
    check += ["--target", f"127.0.0.1:{grpc_port}"]

    with tempfile.TemporaryDirectory() as redis_dir, \
            process(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", redis_dir], env, tmp_path / "redis.log"), \
            process(serve, env, tmp_path / "steerwatch.log") as server:
        assert not healthy(check, env)
        wait_until(lambda: server.poll() is not None or healthy(check, env), "the compose health check", 600)
        assert server.poll() is None, (tmp_path / "steerwatch.log").read_text()[-3000:]

        tenant_key = subprocess.run([str(BIN / "steerwatch"), "keys", "create", "--tenant", "acme",
                                     "--redis-url", redis_url], env=env, capture_output=True, text=True,
                                    check=True, timeout=60).stdout.strip()
        alerts = asyncio.run(chat(f"127.0.0.1:{grpc_port}", tenant_key))
        assert alerts and all(a.monitor == "deception" and a.alert_id for a in alerts)

        page = json.loads(http_get(http_port, "/alerts/api/recent", tenant_key))
        assert [a["id"] for a in page["alerts"]] == [a.alert_id for a in alerts]

        config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
        with prometheus_from(config, f"127.0.0.1:{http_port}") as base:
            series = wait_until(lambda: query(base, 'steerwatch_alerts_total{monitor="pack:deception"}'),
                                "the alerts counter in Prometheus", 90)
            assert float(series[0]["value"][1]) == len(alerts)
            assert float(query(base, "steerwatch_serving")[0]["value"][1]) == 1

        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0, (tmp_path / "steerwatch.log").read_text()[-3000:]
        assert "draining" in (tmp_path / "steerwatch.log").read_text()


async def chat(target: str, key: str) -> list[object]:
    async with SteerwatchClient(target, key, timeout=120) as sw:
        await sw.put_policy("watch", {"monitors": [{"name": "deception", "kind": "probe", "source": "pack:deception",
                                                    "threshold": -1e9, "action": "alert"}]}, make_default=True)
        events = [e async for e in sw.generate([("user", "Tell me about the moon.")], max_tokens=6)]
    assert events[-1].WhichOneof("event") == "final"
    return [e.alert for e in events if e.WhichOneof("event") == "alert"]


def http_get(port: int, path: str, key: str) -> bytes:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - a local server
        return resp.read()  # type: ignore[no-any-return]
