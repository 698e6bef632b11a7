"""The Grafana provisioning and the safety dashboard, checked without Grafana (not installable here):
the provisioning files against the compose stack, every panel's shape, and every PromQL expression
against the metric names and labels the server exports. ``dashboard_exprs()`` hands the expressions,
Grafana macros replaced, to checks that have promtool or a live Prometheus."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from service.metrics import Metrics
from tests.deploy.test_docker_compose import bind_mounts, compose, published

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "steerwatch-safety.json"
# Grafana's macros and this dashboard's variables, as a plain PromQL stand-in for each.
MACROS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$monitor": ".*"}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    out = []
    for p in (board or dashboard())["panels"]:
        out += [p, *p.get("panels", [])]
    return out


def datasource() -> dict[str, Any]:
    (ds,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())["datasources"]
    return ds


def _raw_exprs() -> list[str]:
    """Target expressions and variable queries as written in the dashboard (with Grafana macros)."""
    exprs = [t["expr"] for p in panels() for t in p.get("targets", [])]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            exprs.append(query)
    return exprs


def to_promql(expr: str) -> str:
    """Grafana's text as PromQL: macros and variables replaced; label_values(m, l) becomes the query
    Grafana sends for it (the series of m, grouped by l)."""
    if m := re.fullmatch(r"label_values\(\s*(.+?)\s*,\s*(\w+)\s*\)", expr):
        expr = f"count by ({m[2]}) ({m[1]})"
    for macro in sorted(MACROS, key=len, reverse=True):
        expr = expr.replace(macro, MACROS[macro])
    return expr


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard (targets, then variable queries), as plain PromQL that
    promtool or a Prometheus server accepts."""
    return [to_promql(e) for e in _raw_exprs()]


def exported() -> dict[str, set[str]]:
    """Series name -> label names, for every series /metrics can carry (counters gain _total, histograms
    _bucket with `le`, _sum and _count)."""
    m = Metrics()
    labels = {c._name: set(c._labelnames) for c in vars(m).values() if hasattr(c, "_labelnames")}
    suffixes = {"counter": {"_total": set()}, "gauge": {"": set()},
                "histogram": {"_bucket": {"le"}, "_sum": set(), "_count": set()}}
    out = {}
    for fam in m.registry.collect():
        for suffix, extra in suffixes[fam.type].items():
            out[fam.name + suffix] = labels[fam.name] | extra
    return out


def test_provisioning_files_parse_and_point_at_the_compose_stack():
    ds = datasource()
    assert ds["type"] == "prometheus" and ds["uid"] == "steerwatch-prometheus" and ds["access"] == "proxy"
    services = compose()["services"]
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", ds["url"]).groups()
    assert host in services and int(port) in published(services[host]).values()
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())["global"]
    assert ds["jsonData"]["timeInterval"] == scrape["scrape_interval"], "$__rate_interval builds on it"
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "steerwatch.yaml").read_text())["providers"]
    assert provider["type"] == "file"
    mounts = bind_mounts(services["grafana"])
    assert mounts[provider["options"]["path"]][0] == DASHBOARD.parent, "the provider reads where compose mounts"
    for sub in ("datasources", "dashboards"):
        assert mounts[f"/etc/grafana/provisioning/{sub}"][0] == GRAFANA / "provisioning" / sub
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


def test_every_query_uses_the_provisioned_datasource():
    uid, board = datasource()["uid"], dashboard()
    queried = [p for p in panels(board) if p.get("targets")]
    assert queried
    for p in queried:
        assert p["datasource"] == {"type": "prometheus", "uid": uid}, p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == uid, p["title"]
    for var in board["templating"]["list"]:
        assert var["datasource"]["uid"] == uid, var["name"]


def test_the_dashboard_is_well_formed():
    board = dashboard()
    assert board["uid"] == "steerwatch-safety" and board["schemaVersion"] >= 36 and board["title"]
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels(board):
        assert p["type"] in {"timeseries", "stat", "text", "row"}, p["type"]
        assert p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] >= 1 and g["x"] + g["w"] <= 24 and g["h"] >= 1 and g["y"] >= 0, p["title"]
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs)), p["title"]
    # panels on one line must not overlap
    cells = set()
    for p in panels(board):
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel at {(x, y)}"
                cells.add((x, y))
    (monitor,) = [v for v in board["templating"]["list"] if v["name"] == "monitor"]
    assert monitor["includeAll"] and monitor["allValue"] == ".*", "=~\"$monitor\" must match every monitor on All"


def test_exprs_name_only_exported_metrics_and_their_labels():
    series = exported()
    assert "steerwatch_responses_total" in series, "service/metrics.py must export steerwatch_responses_total"
    for raw in _raw_exprs():
        expr = to_promql(raw)
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), raw
        names = re.findall(r"\b(steerwatch_\w+)", expr)
        assert names, raw
        for name in names:
            assert name in series, f"{name} is not exported: {raw}"
        known = set().union(*(series[n] for n in names))
        for selector in re.findall(r"steerwatch_\w+\{([^}]*)\}", expr):
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector):
                assert label in known, f"no label {label} on {names}: {raw}"
        for grouping in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            for label in re.findall(r"\w+", grouping):
                assert label in known, f"no label {label} to group by on {names}: {raw}"


def test_legends_name_only_grouped_labels():
    for p in panels():
        for t in p.get("targets", []):
            grouped = {lb for g in re.findall(r"\bby\s*\(([^)]*)\)", t["expr"]) for lb in re.findall(r"\w+", g)}
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")):
                assert label in grouped, f"{p['title']}: legend {{{{{label}}}}} is summed away"


def test_the_panels_cover_safety_and_service():
    by_panel = {p["title"]: " ".join(t["expr"] for t in p.get("targets", [])) for p in panels()}

    def some(pattern: str) -> bool:
        return any(re.search(pattern, e) for e in by_panel.values())

    assert some(r"sum by \(monitor, action\) \(rate\(steerwatch_alerts_total"), "alerts per monitor and action"
    assert some(r'steerwatch_responses_total\{alerted="true"\}.*/ sum\(rate\(steerwatch_responses_total\['), \
        "share of responses with an alert"
    assert some(r'steerwatch_alerts_total\{action="stop"'), "stop actions"
    assert some(r"sum by \(kind\) \(rate\(steerwatch_interventions_total"), "steering by kind"
    for hist in ("time_to_first_token", "time_per_output_token"):
        for q in ("0.5", "0.99"):
            assert some(rf"histogram_quantile\({q}, sum by \(le\) \(rate\(steerwatch_{hist}_seconds_bucket"), (hist, q)
    assert some(r'steerwatch_requests_total\{code!="OK"\}'), "errors by code"
    assert some(r"rate\(steerwatch_generated_tokens_total"), "tokens/s"
    assert some(r"steerwatch_queue_depth") and some(r"steerwatch_batch_size") and some(r"sum\(steerwatch_serving\)")
    assert all("[$__rate_interval]" in e or "[$__range]" in e for e in by_panel.values() if "rate(" in e)


def test_the_text_panel_links_the_live_alerts_page():
    (text,) = [p for p in panels() if p["type"] == "text"]
    assert text["options"]["mode"] == "markdown"
    content = text["options"]["content"]
    assert re.search(r"\[[^]]+\]\(http://localhost:\d+/alerts/\)", content), "a markdown link to the page"
    sw = compose()["services"]["steerwatch"]
    for port in re.findall(r"localhost:(\d+)/alerts", content):
        assert published(sw)[int(port)] == 9090, "the host port of steerwatch's metrics port, which serves /alerts/"


def test_dashboard_exprs_are_plain_promql():
    exprs = dashboard_exprs()
    assert len(exprs) == len(_raw_exprs()) >= 15
    assert not any("$" in e or "label_values" in e for e in exprs)
    assert "count by (monitor) (steerwatch_alerts_total)" in exprs
