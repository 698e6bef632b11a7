"""Load and overload through the real gRPC API (service/bench/load.py).

The load test runs concurrent streaming clients of four tenants with different policies (alerts,
a stop rule, annotations, steering, nothing) against a replica on the default model with a Redis
store for a fixed time, and checks that nothing is lost: one FinalRecord per request, usage equal to
the deltas received, every stored alert in the tenant's Redis Stream and on its WatchAlerts exactly
once and in order, and no alert of another tenant on a tenant's watch. The overload test fires many
more calls than batch + queue at a tiny model: the excess is refused at once with RESOURCE_EXHAUSTED,
the rest complete.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest

from service.bench.load import (
    TenantLoad,
    build_report,
    burst,
    burst_markdown,
    default_tenants,
    markdown,
    run_load,
)
from service.pack import MANIFEST, default_pack_dir
from service.protos import chat_pb2
from service.serve import start_replica
from service.settings import Settings
from tests.service.grpc_harness import (
    delete_prefix,
    direction_monitor,
    monitor_spec,
    open_test_store,
    policy_doc,
    random_vector,
    rig,
    run,
    unique_prefix,
)

CLIENTS = 24  # 6 per tenant: more than max_batch (16), so requests also wait in the queue
DURATION_S = 30.0
MAX_TOKENS = 24


@pytest.mark.slow
def test_load_on_the_default_model_loses_nothing(default_model) -> None:
    if not (default_pack_dir(default_model.name) / MANIFEST).is_file():
        pytest.fail(f"no default pack at {default_pack_dir(default_model.name)}: run `steerwatch pack build` "
                    "(scripts/test.sh does)")

    async def body():
        prefix = unique_prefix()
        store = await open_test_store("redis", prefix)
        settings = Settings.load(None, model="default", engine="hf", host="127.0.0.1", port=0, metrics_port=0)
        try:
            try:
                replica = await start_replica(settings, lm=default_model, store=store)
            except BaseException:
                await store.close()
                raise
            try:
                target = f"127.0.0.1:{replica.port}"
                tenants = await default_tenants(target, store, prefix="load", max_tokens=MAX_TOKENS)
                return await run_load(target, tenants, CLIENTS, DURATION_S, store=store,
                                      info={"test": "tests/reliability/test_load.py"})
            finally:
                await replica.stop(0.0)
        finally:
            await delete_prefix(prefix)

    report = run(body(), timeout=240)
    print()
    print(markdown(report))
    total = report.total
    assert report.errors == 0
    # every tenant ran, and the policies did what they do: alerts stored for a, annotations for c
    assert all(row.requests >= 2 for row in report.rows[:-1]), [(r.name, r.requests) for r in report.rows]
    a, b, c, d = report.rows[:4]
    assert a.alerts_stored > 0, "the deception probe never fired: was the monitor pack rebuilt differently?"
    assert c.alerts_inband > 0, "SAE feature 853 never fired: was the monitor pack rebuilt differently?"
    assert c.alerts_stored == c.alerts_redis == c.alerts_watched == 0  # annotate: in-band only
    assert d.alerts_inband == d.alerts_redis == d.alerts_watched == 0
    assert b.alerts_stored == b.stops and b.stops > 0
    assert total.alerts_redis == total.alerts_watched == total.alerts_stored
    # the no-loss properties, usage of policy-stopped requests included
    problems = report.violations
    assert not problems, "\n".join(f"{v.kind} {v.tenant}: {v.detail}" for v in problems[:20])


def test_load_on_the_tiny_model_loses_nothing_and_the_checks_catch_a_loss() -> None:
    """The runner and its checks in the fast suite: three tenants (alerts, a stop rule, nothing)."""
    async def body():
        async with rig("redis") as r:
            tenants = []
            for name, monitors in (("t-alert", [direction_monitor("m", "v", 0.0)]),
                                   ("t-stop", [direction_monitor("m", "v", 0.03, action="stop", aggregation="count",
                                                                 window=4, count=2)]),
                                   ("t-none", [])):
                c = await r.tenant_client(name)
                if monitors:
                    await c.upload_vector("v", {1: random_vector(3)})
                    await c.put_policy("p", policy_doc(monitors), make_default=True)
                tenants.append(TenantLoad(name, c.key, description=", ".join(f"{m['action']} > {m['threshold']}"
                                                                              for m in monitors) or "no policy",
                                          max_tokens=16, prompts=("Tell me a story", "abc", "xyz")))
            target = f"127.0.0.1:{r.replica.port}"
            return await run_load(target, tenants, 6, 2.0, store=r.store), tenants

    report, tenants = run(body(), timeout=60)
    print()
    print(markdown(report))
    alert, stop, none = report.rows[:3]
    assert report.errors == 0 and alert.alerts_stored > 0 and none.alerts_inband == 0
    # the no-loss properties, usage of policy-stopped requests included
    assert not report.violations, report.violations[:5]
    assert 0 < stop.stops < stop.requests and stop.alerts_stored == stop.stops

    def recheck(watched=None, streams=None):
        rep = build_report(tenants, report.clients, report.duration_s, report.wall_s, report.requests,
                           watched or report.watched, streams or report.streams)
        return {v.kind for v in rep.violations}

    assert recheck() == set()
    got = report.watched["t-alert"]
    assert len(got) >= 2
    assert recheck({**report.watched, "t-alert": got[1:]}) == {"lost"}
    assert recheck({**report.watched, "t-alert": got + got[-1:]}) == {"duplicate"}
    assert recheck({**report.watched, "t-alert": [got[1], got[0], *got[2:]]}) == {"order"}
    assert recheck({**report.watched, "t-none": got[:1]}) == {"isolation"}
    changed = copy.deepcopy(got)
    changed[0].excerpt += "!"
    assert recheck({**report.watched, "t-alert": changed}) == {"content"}
    stream = report.streams["t-alert"]
    assert recheck(streams={**report.streams, "t-alert": stream[:-1]}) == {"lost"}
    extra = dataclasses.replace(stream[-1], alert_id="9999999999999-0")
    assert recheck(streams={**report.streams, "t-alert": [*stream, extra]}) == {"lost"}


def test_overload_refuses_the_excess_at_once_with_resource_exhausted() -> None:
    max_batch, max_queue, n = 2, 2, 24

    async def body():
        async with rig("redis", max_batch=max_batch, max_queue=max_queue) as r:
            target = f"127.0.0.1:{r.replica.port}"
            return await burst(target, r.client.key, n, max_tokens=200)

    calls = run(body(), timeout=60)
    print()
    print(burst_markdown(calls))
    accepted = [c for c in calls if c.code == "OK"]
    refused = [c for c in calls if c.code != "OK"]
    assert {c.code for c in refused} == {"RESOURCE_EXHAUSTED"}, {(c.code, c.details) for c in refused}
    assert all(c.details.startswith("limits.max_queue:") for c in refused), refused[0].details
    # at least a queue's worth was accepted, at most what fits (running + waiting)
    assert max_queue <= len(accepted) <= max_batch + max_queue, len(accepted)
    latencies = sorted(c.latency_s for c in refused)
    p99 = latencies[max(0, -(-99 * len(latencies) // 100) - 1)]
    assert p99 < 0.5, latencies
    assert max(latencies) < min(c.latency_s for c in accepted)  # refused before any accepted one ended
    for c in accepted:  # the accepted ones ran normally to their end
        assert c.final is not None
        assert c.final.finish_reason in (chat_pb2.FINISH_REASON_LENGTH, chat_pb2.FINISH_REASON_STOP)
        assert c.final.usage.completion_tokens == c.deltas > 0


def test_usage_of_a_policy_stopped_request_counts_only_the_tokens_delivered() -> None:
    async def body():
        async with rig("memory") as r:
            c = r.client
            await c.upload_vector("v", {1: random_vector(5)})
            counts = []  # (usage.completion_tokens, token deltas received)
            for threshold in (-1e30, None):  # the very first token, then mid-stream
                if threshold is None:
                    free = await c.generate("Tell me a story", 32, include_readings=True,
                                            monitors=[monitor_spec("m", "v", 1e30)])
                    values = [t.readings["m"] for t in free.tokens]
                    k = next(i for i in range(2, len(values)) if values[i] > max(values[:i]))
                    threshold = max(values[:k])
                await c.put_policy("guard", policy_doc([direction_monitor("m", "v", threshold, action="stop")]))
                res = await c.generate("Tell me a story", 32, policy="guard")
                assert res.final.finish_reason == chat_pb2.FINISH_REASON_POLICY
                counts.append((res.final.usage.completion_tokens, len(res.tokens)))
            assert all(usage == deltas for usage, deltas in counts), counts
    run(body())

