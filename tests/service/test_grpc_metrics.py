"""The Prometheus endpoint after real traffic: exact counts by method/code, alerts by monitor/action,
interventions by kind, generated tokens; and no label value carrying a tenant, key or request id."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.service.grpc_harness import (
    add_entry,
    add_steering,
    direction_monitor,
    monitor_spec,
    policy_doc,
    random_vector,
    rig,
    rpc_error,
    run,
)

FIRES = -1e9  # every token exceeds it: one alert (one episode) per generation
TENANTS = ("tenant-zeta-7", "tenant-omega-9")
PRIVATE_MONITOR = "zeta-private-monitor"  # a request monitor's name: not a bounded label value
CHAT = "/steerwatch.v1.ChatService/Generate"


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return sum(v for lab, v in samples.get(name, []) if lab == labels)


def test_metrics_after_traffic() -> None:
    async def body() -> tuple[str, list[str], list[str], int]:
        async with rig("memory") as r:
            clients = [await r.tenant_client(t) for t in TENANTS]
            request_ids: list[str] = []
            tokens = 0
            for i, c in enumerate(clients):
                await c.upload_vector("v", {1: random_vector(i)})
                await c.put_policy("pol", policy_doc([direction_monitor("mon", "v", FIRES)], [add_steering("v", 1.0)]),
                                   make_default=True)
                for j in range(2):
                    rid = f"rid-metrics-{i}-{j}"
                    res = await c.generate("abc", 3 + j, request_id=rid)
                    assert res.final.request_id == rid and len(res.alerts) == 1
                    request_ids.append(rid)
                    tokens += res.final.usage.completion_tokens
            c = clients[0]
            res = await c.generate("abc", 2, steering=[add_entry("v", -1.0)],
                                   monitors=[monitor_spec(PRIVATE_MONITOR, "v", FIRES)])
            assert len(res.final.steering) == 2 and len(res.alerts) == 2
            tokens += res.final.usage.completion_tokens
            request_ids.append(res.final.request_id)
            for call in (c.generate_call(""), c.generate_call(policy="nope"), c.with_key("sw_bad").generate_call()):
                await rpc_error(call)
            return r.metrics_text(), request_ids, [cl.key for cl in clients], tokens

    text, request_ids, keys, tokens = run(body())
    s = _samples(text)
    assert _value(s, "steerwatch_requests_total", method=CHAT, code="OK") == 5
    assert _value(s, "steerwatch_requests_total", method=CHAT, code="INVALID_ARGUMENT") == 1
    assert _value(s, "steerwatch_requests_total", method=CHAT, code="NOT_FOUND") == 1
    assert _value(s, "steerwatch_requests_total", method=CHAT, code="UNAUTHENTICATED") == 1
    assert _value(s, "steerwatch_requests_total", method="/steerwatch.v1.PolicyService/PutPolicy", code="OK") == 2
    assert _value(s, "steerwatch_requests_total", method="/steerwatch.v1.VectorService/UploadVector", code="OK") == 2
    assert _value(s, "steerwatch_alerts_total", monitor="_tenant", action="alert") == 5  # a tenant's vector
    assert _value(s, "steerwatch_alerts_total", monitor="_request", action="annotate") == 1
    assert _value(s, "steerwatch_interventions_total", kind="add") == 6
    # every finished generation fired a monitor: five finals, all alerted, whatever their finish reason
    responses = s["steerwatch_responses_total"]
    assert sum(v for lab, v in responses if lab["alerted"] == "true") == 5
    assert sum(v for lab, v in responses if lab["alerted"] == "false") == 0
    assert _value(s, "steerwatch_generated_tokens_total") == tokens > 0
    assert _value(s, "steerwatch_time_to_first_token_seconds_count") == 5
    assert _value(s, "steerwatch_request_duration_seconds_count", method=CHAT) == 8
    assert {lab["method"] for lab, _ in s["steerwatch_requests_total"]} <= {
        CHAT, "/steerwatch.v1.PolicyService/PutPolicy", "/steerwatch.v1.VectorService/UploadVector"}

    secrets = [*TENANTS, *request_ids, *keys, PRIVATE_MONITOR, "acme", "mon"]  # "mon": a policy monitor's name
    for name, samples in s.items():
        for labels, _ in samples:
            for value in labels.values():
                assert not any(x in value for x in secrets), (name, labels)
