"""The Prometheus scrape config and alert rules, checked without Prometheus (promtool is not
installable here): every rule names only metrics the server exports, carries a severity and a
runbook anchor that exists in docs/operations.md."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from service.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"


def exported() -> set[str]:
    """Every series name /metrics can carry (counters gain _total, histograms _bucket/_sum/_count)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {f.name + s for f in Metrics().registry.collect() for s in suffixes[f.type]}


def test_rules_reference_only_exported_metrics_and_have_runbooks():
    rules = [r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    names, ops = exported(), (ROOT / "docs" / "operations.md").read_text().lower()
    assert {r["alert"] for r in rules} >= {"SteerwatchMonitorAlertSpike", "SteerwatchStopActionRate",
                                           "SteerwatchErrorRate", "SteerwatchTTFTSLO", "SteerwatchTPOTSLO",
                                           "SteerwatchEngineDown"}
    for rule in rules:
        for metric in re.findall(r"\b(steerwatch_[a-z_]+)", rule["expr"]):
            assert metric in names, f"{rule['alert']}: {metric} is not exported"
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert re.fullmatch(r"\d+[smh]", rule["for"])
        anchor = rule["annotations"]["runbook"].split("#", 1)[1]
        assert f"### {anchor}" in ops, f"{rule['alert']}: no runbook section in docs/operations.md"
        assert rule["expr"].count("(") == rule["expr"].count(")")


def test_scrape_config_loads_the_rules_and_scrapes_metrics():
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert cfg["rule_files"] == ["/etc/prometheus/alerts.yml"]
    job = cfg["scrape_configs"][0]
    assert job["job_name"] == "steerwatch" and job["metrics_path"] == "/metrics"
