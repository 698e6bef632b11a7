"""The Helm chart, checked without helm (not installable here): values against the schema, the
settings it writes against the server's own Settings model, template references against values.yaml
and _helpers.tpl, and each manifest's static skeleton as YAML. docs/operations.md says what this does
and does not verify."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from service.settings import Settings

CHART = Path(__file__).resolve().parents[2] / "helm" / "steerwatch"
TEMPLATES = sorted((CHART / "templates").glob("*.yaml"))


def values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "steerwatch" and chart["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    assert [d["condition"] for d in chart["dependencies"]] == ["redis.enabled"]


def test_default_values_satisfy_the_schema():
    jsonschema.Draft202012Validator.check_schema(schema())
    jsonschema.validate(values(), schema())


@pytest.mark.parametrize("path,bad", [
    (("replicaCount",), -1),
    (("settings", "engine"), "tensorrt"),
    (("settings", "device"), "tpu"),
    (("secrets", "bootstrapAdminKey"), "short"),
    (("redis", "externalUrl"), "http://redis:6379"),
    (("ports", "grpc"), 70000),
    (("startupProbe", "failureThreshold"), 0),
    (("serviceMonitor", "interval"), "often"),
    (("unknownTopLevel",), True),
])
def test_the_schema_refuses_bad_values(path, bad):
    v = copy.deepcopy(values())
    node = v
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = bad
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(v, schema())


def test_an_enabled_autoscaler_needs_a_target():
    v = copy.deepcopy(values())
    v["autoscaling"].update(enabled=True, targetCPUUtilizationPercentage=None, targetQueueDepth=None)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(v, schema())
    v["autoscaling"]["targetQueueDepth"] = 2  # the GPU setting: queue depth alone
    jsonschema.validate(v, schema())
    v["updateStrategy"] = {"type": "Blue"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(v, schema())


def test_the_configmap_settings_load_in_the_server(tmp_path):
    """What the ConfigMap writes (host, ports, then values.settings) is valid steerwatch settings."""
    v = values()
    doc = {"host": "0.0.0.0", "port": v["ports"]["grpc"], "metrics_port": v["ports"]["metrics"], **v["settings"]}
    path = tmp_path / "steerwatch.yaml"
    path.write_text(yaml.safe_dump(doc))
    settings = Settings.load(str(path))
    assert settings.engine == v["settings"]["engine"] and settings.vllm.max_model_len == v["settings"]["vllm"]["max_model_len"]
    # the kubelet's grace period must outlast the server's drain
    assert v["terminationGracePeriodSeconds"] > settings.limits.grace_seconds


def test_every_values_path_and_helper_used_by_a_template_exists():
    v = values()
    helpers = set(re.findall(r'define "([^"]+)"', (CHART / "templates" / "_helpers.tpl").read_text()))
    sources = [*TEMPLATES, CHART / "templates" / "_helpers.tpl", CHART / "templates" / "NOTES.txt"]
    for path in sources:
        text = path.read_text()
        assert text.count("{{") == text.count("}}"), path.name
        for name in re.findall(r'include "([^"]+)"', text):
            assert name in helpers, f"{path.name}: include {name!r} is not defined"
        for ref in re.findall(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", text):
            node: Any = v
            for key in ref.strip(".").split("."):
                assert isinstance(node, dict) and key in node, f"{path.name}: .Values{ref} is not in values.yaml"
                node = node[key]


def _skeleton(text: str) -> Any:
    """The manifest with whole-line directives dropped and inline expressions replaced by a scalar."""
    lines = [ln for ln in text.splitlines() if not re.fullmatch(r"\s*\{\{-?.*-?\}\}\s*", ln)]
    return yaml.safe_load(re.sub(r"\{\{.*?\}\}", "X", "\n".join(lines)))


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_each_manifest_skeleton_is_a_labelled_kubernetes_object(template):
    doc = _skeleton(template.read_text())
    assert {"apiVersion", "kind", "metadata"} <= doc.keys()
    assert doc["metadata"]["name"] == "X"  # the release-qualified name from steerwatch.fullname
    assert 'include "steerwatch.labels"' in template.read_text()


def test_the_deployment_probes_grpc_health_runs_non_root_and_drains():
    text = (CHART / "templates" / "deployment.yaml").read_text()
    pod = _skeleton(text)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["timeoutSeconds"] >= 5, probe
    assert text.count('include "steerwatch.probeHandler"') == 3
    assert {p["name"] for p in container["ports"]} == {"grpc", "metrics"}
    assert "terminationGracePeriodSeconds" in pod
    v = values()
    assert v["podSecurityContext"]["runAsNonRoot"] is True
    assert v["startupProbe"]["periodSeconds"] * v["startupProbe"]["failureThreshold"] >= 600  # model load
    assert "nvidia.com/gpu" in v["resources"]["limits"]


def test_the_probe_handler_is_grpc_in_plaintext_and_the_verifying_health_command_with_tls():
    """kubelet's gRPC probe cannot speak TLS: the helper's TLS branch runs `python -m service.health`
    with the CA and the certificate's name, its plaintext branch the built-in gRPC probe."""
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    body = re.search(r'define "steerwatch.probeHandler" -\}\}(.*?)\{\{- end -\}\}\s*$', helpers, re.S)[1]
    with_tls, plain = body.split("{{- else -}}")
    plain = plain.split("{{- end -}}")[0]  # the if's own end
    exec_branch = yaml.safe_load(re.sub(r"\{\{-? if .*?\}\}", "", with_tls).replace("{{ .Values.ports.grpc }}", "50051")
                                 .replace("{{ .Values.tls.caKey }}", "ca.crt")
                                 .replace('{{ .Values.tls.serverName | quote }}', '"steerwatch.internal"'))
    command = exec_branch["exec"]["command"]
    assert command[:3] == ["python", "-m", "service.health"]
    assert command[command.index("--tls-root-cert") + 1] == "/etc/steerwatch/tls/ca.crt"
    assert command[command.index("--tls-server-name") + 1] == "steerwatch.internal"
    assert command[command.index("--target") + 1] == "127.0.0.1:50051"
    assert yaml.safe_load(plain.replace("{{ .Values.ports.grpc }}", "50051")) == {"grpc": {"port": 50051}}
    v = copy.deepcopy(values())
    v["tls"].update(enabled=True, secretName="steerwatch-tls")
    with pytest.raises(jsonschema.ValidationError):  # the probes need the certificate's name
        jsonschema.validate(v, schema())
    v["tls"]["serverName"] = "steerwatch.internal"
    jsonschema.validate(v, schema())
