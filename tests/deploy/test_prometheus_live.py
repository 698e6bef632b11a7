"""The Prometheus side for real, with Debian's prometheus and promtool (scripts/test.sh installs them):
the alert rules' unit tests, the scrape config, every dashboard expression through the PromQL parser,
and a live Prometheus scraping a running replica after real traffic: the rules evaluate without error
and every dashboard query answers, the key panels with the numbers the traffic implies."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.test_grafana_dashboard import dashboard_exprs
from tests.service.grpc_harness import add_steering, direction_monitor, policy_doc, random_vector, rig, run

PROMTOOL, PROMETHEUS = shutil.which("promtool"), shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMTOOL is None or PROMETHEUS is None,
                                reason="needs Debian's prometheus package (scripts/test.sh installs it)")
RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
FIRES, NEVER = -1e9, 1e9


def promtool(*args: str) -> str:
    done = subprocess.run([str(PROMTOOL), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    assert "SUCCESS: 7 rules found" in promtool("check", "rules", str(RULES_DIR / "alerts.yml"))
    assert "SUCCESS" in promtool("test", "rules", str(RULES_DIR / "alerts_test.yml"))


def test_scrape_config_and_dashboard_queries_parse(tmp_path: Path) -> None:
    config = yaml.safe_load((RULES_DIR / "prometheus.yml").read_text())
    config["rule_files"] = [str(RULES_DIR / "alerts.yml")]  # the container path, made local
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    promtool("check", "config", str(tmp_path / "prometheus.yml"))
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump(rules))
    promtool("check", "rules", str(tmp_path / "dashboard_rules.yml"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def prometheus(target_port: int) -> Iterator[str]:
    """A Prometheus scraping 127.0.0.1:target_port every second, with our rules."""
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "scrape_configs": [{"job_name": "steerwatch", "metrics_path": "/metrics", "static_configs": [{}]}]}
    with prometheus_from(config, f"127.0.0.1:{target_port}") as base:
        yield base


@contextmanager
def prometheus_from(config: dict[str, Any], target: str) -> Iterator[str]:
    """A Prometheus on a free loopback port running ``config`` with its one scrape job's target set to
    ``target`` and its rule file set to deploy/prometheus/alerts.yml; yields its base URL."""
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    config["rule_files"] = [str(RULES_DIR / "alerts.yml")]
    with tempfile.TemporaryDirectory() as work:
        Path(work, "prometheus.yml").write_text(yaml.safe_dump(config))
        port = _free_port()
        proc = subprocess.Popen([str(PROMETHEUS), f"--config.file={work}/prometheus.yml",
                                 f"--storage.tsdb.path={work}/data", f"--web.listen-address=127.0.0.1:{port}",
                                 "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def api(base: str, path: str, **params: str) -> Any:
    url = f"{base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - a local Prometheus
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]


def query(base: str, expr: str) -> list[dict[str, Any]]:
    return api(base, "query", query=expr)["result"]  # type: ignore[no-any-return]


def wait_until(check: Any, what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except OSError:  # Prometheus not listening yet
            value = None
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def scraped_after(base: str, since: float) -> bool:
    """Prometheus has scraped the target at least twice since ``since`` (unix seconds)."""
    result = query(base, 'timestamp(up{job="steerwatch"})')
    return bool(result) and float(result[0]["value"][1]) > since + 1.5


@pytest.mark.slow
def test_live_prometheus_scrapes_a_replica_and_answers_every_dashboard_query() -> None:
    async def traffic(r: Any) -> None:
        """One round: three responses, two with an alert (one a stop), steering on all; a client error."""
        c = r.client
        await c.generate("abc", 3, policy="watch")
        await c.generate("abc", 3, policy="halt")
        await c.generate("abc", 3, policy="quiet")
        await asyncio.gather(*[c.generate("x", 2, policy="quiet") for _ in range(2)])
        try:
            await c.generate("abc", 3, policy="missing")
        except Exception:  # noqa: BLE001 - NOT_FOUND is the point: an error for the errors panel
            pass

    async def body() -> None:
        async with rig("memory") as r:
            c = r.client
            await c.upload_vector("v", {1: random_vector(0)})
            steer = [add_steering("v", 0.5)]
            await c.put_policy("watch", policy_doc([direction_monitor("deception", "v", FIRES)], steer))
            await c.put_policy("halt", policy_doc([direction_monitor("deception", "v", FIRES, action="stop")], steer))
            await c.put_policy("quiet", policy_doc([direction_monitor("deception", "v", NEVER)], steer))
            with prometheus(r.replica.metrics_port) as base:
                await asyncio.to_thread(wait_until, lambda: query(base, 'up{job="steerwatch"} == 1'), "a scrape")
                for _ in range(2):  # two rounds between scrapes: counters rise inside the rate windows
                    started = time.time()
                    await traffic(r)
                    await asyncio.to_thread(wait_until, lambda s=started: scraped_after(base, s), "two scrapes")
                await asyncio.to_thread(check_queries, base)
                await asyncio.to_thread(check_rules, base)

    run(body(), timeout=180)


def check_queries(base: str) -> None:
    for expr in dashboard_exprs():
        query(base, expr)  # every panel's query is accepted by a real Prometheus ("success")
    by_action = {r["metric"]["action"]: float(r["value"][1]) for r in
                 query(base, "sum by (action) (rate(steerwatch_alerts_total[5m]))")}
    assert set(by_action) == {"alert", "stop"} and all(v > 0 for v in by_action.values())
    share = query(base, 'sum(increase(steerwatch_responses_total{alerted="true"}[5m])) / '
                        'sum(increase(steerwatch_responses_total[5m]))')
    assert 0.2 < float(share[0]["value"][1]) < 0.5  # 2 of 5 responses per round alert
    kinds = {r["metric"]["kind"] for r in query(base, "sum by (kind) (rate(steerwatch_interventions_total[5m]))")}
    assert kinds == {"add"}
    p99 = query(base, "histogram_quantile(0.99, sum by (le) (rate(steerwatch_time_to_first_token_seconds_bucket[5m])))")
    assert float(p99[0]["value"][1]) > 0
    codes = {r["metric"]["code"] for r in query(base, 'sum by (code) (rate(steerwatch_requests_total{code!="OK"}[5m]))')}
    assert "NOT_FOUND" in codes
    assert float(query(base, "steerwatch_serving")[0]["value"][1]) == 1
    labelled = query(base, "count by (monitor) (steerwatch_alerts_total)")
    assert [r["metric"]["monitor"] for r in labelled] == ["_tenant"]  # never the tenant's own monitor name


def check_rules(base: str) -> None:
    """Every rule evaluated against the real series without error, and none fires on healthy traffic."""
    def evaluated() -> list[dict[str, Any]] | None:
        rules = [rule for g in api(base, "rules")["groups"] for rule in g["rules"]]
        return rules if all(rule.get("lastEvaluation", "").startswith("20") for rule in rules) else None
    rules = wait_until(evaluated, "every rule to be evaluated")
    assert len(rules) == 7
    for rule in rules:
        assert rule["health"] == "ok" and not rule.get("lastError"), rule
        assert rule["state"] == "inactive", rule
