"""ChatService.Generate end to end: policy monitors and steering, request additions, the audit record,
parity with an in-process HFEngine run, the stop action, and ModelService.Info / health."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2

from service.engines.hf import HFEngine
from service.engines.types import FinalEvent, GenerationRequest, Sampling, TokenEvent
from service.models import encode_prompt
from service.protos import chat_pb2, common_pb2
from steering.spec import AddEdit, InterventionSpec, ReadSpec
from steering.vectors import make_vector
from tests.service.grpc_harness import (
    D_MODEL,
    MODEL_NAME,
    N_LAYERS,
    STORES,
    add_entry,
    add_steering,
    direction_monitor,
    engine_idle,
    monitor_spec,
    one_torch_thread,
    policy_doc,
    random_vector,
    rig,
    rpc_error,
    run,
    tiny_lm,
)

PROMPT = "Tell me a story"  # greedy on the tiny model: no EOS within the first 200 tokens
N = 12
STEER = random_vector(11, scale=1.0)
PROBE = random_vector(12, scale=1.0)
POLICY_COEF, REQUEST_COEF = 3.0, -2.0
NEVER = 1e9  # a threshold no reading reaches


def _policy() -> str:
    return policy_doc([direction_monitor("mon", "probe", NEVER, action="alert", layer=1)],
                      [add_steering("steer", POLICY_COEF, [1])])


def _engine_run(edits: list[AddEdit], reads: list[ReadSpec]) -> list[TokenEvent | FinalEvent]:
    """The same generation on an in-process HFEngine (own model copy, no server)."""
    lm = tiny_lm(1)
    with one_torch_thread(), HFEngine(lm) as eng:
        eng.registry.add_vector("acme/steer", make_vector({1: torch.tensor(STEER, dtype=torch.float32)}))
        eng.registry.add_vector("acme/probe", make_vector({1: torch.tensor(PROBE, dtype=torch.float32)}))
        req = GenerationRequest(prompt=PROMPT, sampling=Sampling(max_tokens=N),
                                interventions=InterventionSpec(edits=edits, reads=reads))
        return [e for e in eng.run(req) if isinstance(e, TokenEvent | FinalEvent)]


def _summary_matches_readings(summary: chat_pb2.MonitorSummary, values: list[float]) -> None:
    peak = max(values)
    assert summary.peak_score == pytest.approx(peak, abs=1e-12)
    assert summary.peak_token == values.index(peak)  # first token at the peak
    assert not summary.fired and summary.threshold == NEVER


@pytest.mark.parametrize("store_kind", STORES)
def test_generate_with_policy_and_request_steering_and_monitors(store_kind: str) -> None:
    async def body() -> tuple:
        async with rig(store_kind) as r:
            c = r.client
            baseline = await c.generate(PROMPT, N)
            steer = await c.upload_vector("steer", {1: STEER}, method="caa", source="unit test")
            assert (steer.vector_id, list(steer.layers), steer.d_model, steer.method) == ("steer", [1], D_MODEL, "caa")
            await c.upload_vector("probe", {1: PROBE})
            record = await c.put_policy("safety", _policy(), make_default=True)
            assert (record.name, record.version, record.is_default, record.tenant) == ("safety", 1, True, "acme")

            steered = await c.generate(PROMPT, N, request_id="req-policy.1", include_readings=True)
            both = await c.generate(PROMPT, N, include_readings=True,
                                    steering=[add_entry("probe", REQUEST_COEF, [2], common_pb2.PHASE_GENERATION)],
                                    monitors=[monitor_spec("req-mon", "steer", NEVER, layer=2)])
            no_readings = await c.generate(PROMPT, N)
            await engine_idle(r.app)
            return baseline, steered, both, no_readings

    baseline, steered, both, no_readings = run(body())
    prompt_tokens = len(encode_prompt(tiny_lm().tokenizer, PROMPT))

    # the policy-less baseline: nothing applied, nothing monitored
    b = baseline.final
    assert (b.policy, b.policy_version, list(b.steering), list(b.monitors)) == ("", 0, [], [])
    assert b.finish_reason == chat_pb2.FINISH_REASON_LENGTH and len(baseline.tokens) == N

    for res, readings in ((steered, {"mon"}), (both, {"mon", "req-mon"})):
        f = res.final
        assert f.finish_reason == chat_pb2.FINISH_REASON_LENGTH
        assert (f.usage.prompt_tokens, f.usage.completion_tokens) == (prompt_tokens, N)
        assert [t.index for t in res.tokens] == list(range(N))
        assert res.alerts == []
        assert (f.policy, f.policy_version, f.model) == ("safety", 1, MODEL_NAME)
        assert f.request_id == res.initial_metadata["x-request-id"]
        assert f.text == res.text + f.tail  # streamed deltas + held-back tail == whole output
        assert 0 <= f.timings.queue_seconds <= f.timings.total_seconds
        assert 0 < f.timings.ttft_seconds <= f.timings.total_seconds
        for t in res.tokens:
            assert set(t.readings) == readings
            assert all(math.isfinite(v) for v in t.readings.values())
        summaries = {m.monitor: m for m in f.monitors}
        assert set(summaries) == readings
        assert (summaries["mon"].action, summaries["mon"].threshold) == ("alert", NEVER)
        for name in readings:
            _summary_matches_readings(summaries[name], [t.readings[name] for t in res.tokens])

    assert steered.final.request_id == "req-policy.1"
    assert len(both.final.request_id) == 32 and both.final.request_id != steered.final.request_id

    policy_entry = common_pb2.AppliedSteering(kind="add", source="steer", value=POLICY_COEF, layers=[1], phase="both",
                                              origin="policy")
    request_entry = common_pb2.AppliedSteering(kind="add", source="probe", value=REQUEST_COEF, layers=[2],
                                               phase="generation", origin="request")
    assert list(steered.final.steering) == [policy_entry]
    assert list(both.final.steering) == [policy_entry, request_entry]
    req_summary = next(m for m in both.final.monitors if m.monitor == "req-mon")
    assert req_summary.action == "annotate"  # a request monitor without an action only annotates

    # steering changes greedy output; readings are only attached when asked for
    assert steered.token_ids != baseline.token_ids
    assert both.token_ids != steered.token_ids
    assert no_readings.token_ids == steered.token_ids
    assert all(not t.readings for t in no_readings.tokens)

    # parity: the same edits and reads on an in-process engine give the same tokens and readings
    policy_edit = AddEdit(vector="acme/steer", coef=POLICY_COEF, layers=[1], phase="both")
    request_edit = AddEdit(vector="acme/probe", coef=REQUEST_COEF, layers=[2], phase="generation")
    mon = ReadSpec(name="mon", kind="direction", source="acme/probe", layer=1)
    req_mon = ReadSpec(name="req-mon", kind="direction", source="acme/steer", layer=2)
    for res, edits, reads in ((steered, [policy_edit], [mon]), (both, [policy_edit, request_edit], [mon, req_mon])):
        events = _engine_run(edits, reads)
        tokens = [e for e in events if isinstance(e, TokenEvent)]
        final = events[-1]
        assert isinstance(final, FinalEvent) and final.finish_reason == "length"
        assert [t.token_id for t in tokens] == res.token_ids
        assert final.text == res.final.text
        for mine, theirs in zip(tokens, res.tokens, strict=True):
            assert mine.text == theirs.text
            for name, value in mine.readings.items():
                assert theirs.readings[name] == pytest.approx(value, abs=1e-6)
    assert [t.token_id for t in _engine_run([], []) if isinstance(t, TokenEvent)] == baseline.token_ids


@pytest.mark.parametrize("store_kind", STORES)
def test_stop_action_withholds_the_token_and_ends_with_policy(store_kind: str) -> None:
    async def body() -> None:
        async with rig(store_kind) as r:
            c = r.client
            await c.upload_vector("probe", {1: PROBE})
            free = await c.generate(PROMPT, N, include_readings=True, monitors=[monitor_spec("m", "probe", NEVER)])
            values = [t.readings["m"] for t in free.tokens]
            # a threshold first exceeded at token k >= 2 (the free run tells where)
            k = next(i for i in range(2, N) if values[i] > max(values[:i]))
            threshold = max(values[:k])
            await c.put_policy("guard", policy_doc([direction_monitor("m", "probe", threshold, action="stop")]))

            for thr, first_withheld in ((threshold, k), (-NEVER, 0)):  # mid-stream, and on the very first token
                if thr != threshold:
                    await c.put_policy("guard", policy_doc([direction_monitor("m", "probe", thr, action="stop")]))
                res = await c.generate(PROMPT, N, policy="guard", include_readings=True)
                kinds = [e.WhichOneof("event") for e in res.events]
                assert kinds == ["token"] * first_withheld + ["alert", "final"], kinds
                assert res.token_ids == free.token_ids[:first_withheld]  # nothing from the withheld token on
                (alert,) = res.alerts
                assert (alert.monitor, alert.action, alert.token_start, alert.token_end) == ("m", "stop",
                                                                                          first_withheld, first_withheld)
                assert alert.peak_score == pytest.approx(values[first_withheld], abs=1e-12) and alert.threshold == thr
                assert alert.alert_id and alert.request_id == res.final.request_id and alert.policy == "guard"
                assert alert.excerpt == res.text[-120:]  # the withheld token stays out of the excerpt too
                f = res.final
                assert f.finish_reason == chat_pb2.FINISH_REASON_POLICY
                assert f.text == res.text and f.tail == ""
                (summary,) = f.monitors
                assert summary.fired and summary.action == "stop"
                stored = await r.store.read_alerts("acme")
                assert stored[-1].alert_id == alert.alert_id
                assert (stored[-1].fields["monitor"], stored[-1].fields["action"]) == ("m", "stop")
                await engine_idle(r.app)

            # the replica goes on serving
            again = await c.generate(PROMPT, N)
            assert again.token_ids == free.token_ids and again.final.finish_reason == chat_pb2.FINISH_REASON_LENGTH
    run(body())


def test_stop_alert_excerpt_does_not_leak_the_withheld_token() -> None:
    async def body() -> None:
        async with rig("memory") as r:
            c = r.client
            await c.upload_vector("probe", {1: PROBE})
            await c.put_policy("guard", policy_doc([direction_monitor("m", "probe", -NEVER, action="stop")]))
            res = await c.generate(PROMPT, N, policy="guard")
            (alert,) = res.alerts
            assert res.tokens == [] and alert.action == "stop"
            assert alert.excerpt == res.text[-120:]  # only text the client was allowed to see
    run(body())


def test_request_steering_errors_name_the_request_field() -> None:
    """With a policy steering entry first in the merged spec, request errors still name steering[0]."""
    async def body() -> None:
        async with rig("memory") as r:
            c = r.client
            await c.upload_vector("steer", {1: STEER})
            await c.upload_vector("probe", {1: PROBE})
            await c.put_policy("safety", _policy(), make_default=True)
            code, details = await rpc_error(c.generate_call(steering=[add_entry("steer", 1.0, [N_LAYERS])]))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("steering[0].layers:"), details
            code, details = await rpc_error(c.generate_call(monitors=[monitor_spec("x", "probe", 0.0, layer=7)]))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("monitors[0].layer:"), details
            code, details = await rpc_error(c.generate_call(steering=[add_entry("steer", 4.5)]))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith("steering[0].coef:"), details
            code, details = await rpc_error(c.generate_call(monitors=[monitor_spec("mon", "probe", 0.0)]))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "unique" in details  # same name as the policy's
            assert (await c.generate(PROMPT, 2)).final.finish_reason == chat_pb2.FINISH_REASON_LENGTH
    run(body())


def test_server_limits_apply_without_a_policy() -> None:
    """A tenant with no default policy gets the server's limits: default_max_tokens, max_new_tokens, max_abs_coef."""
    async def body() -> None:
        async with rig("memory", max_new_tokens=64, default_max_tokens=8, max_abs_coef=10.0) as r:
            c = r.client
            res = await c.generate("zzz", max_tokens=0)  # neither request nor policy gives max_tokens
            assert (res.final.policy, res.final.usage.completion_tokens) == ("", 8)
            assert res.final.finish_reason == chat_pb2.FINISH_REASON_LENGTH
            assert (await c.generate("zzz", max_tokens=64)).final.usage.completion_tokens == 64
            code, details = await rpc_error(c.generate_call("zzz", max_tokens=65))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("sampling.max_tokens:"), details
            await c.upload_vector("steer", {1: STEER})
            res = await c.generate(PROMPT, 4, steering=[add_entry("steer", -10.0)])
            assert [s.value for s in res.final.steering] == [-10.0]
            code, details = await rpc_error(c.generate_call(steering=[add_entry("steer", 10.5)]))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith("steering[0].coef:"), details
    run(body())


def test_model_info_and_health() -> None:
    async def body() -> None:
        async with rig("memory", max_prompt_tokens=300, max_new_tokens=100, default_max_tokens=50) as r:
            c = r.client
            info = await c.info()
            assert (info.model, info.n_layers, info.d_model, info.engine) == (MODEL_NAME, N_LAYERS, D_MODEL, "hf")
            assert (info.max_prompt_tokens, info.max_new_tokens) == (300, 100)
            assert set(info.monitor_kinds) == {"probe", "direction", "sae_feature"}
            assert list(info.saes) == [] and list(info.probes) == []
            assert (await rpc_error(c.with_key("").info()))[0] == grpc.StatusCode.UNAUTHENTICATED
            serving = health_pb2.HealthCheckResponse.SERVING
            for service in ("", "steerwatch.v1.ChatService", "steerwatch.v1.PolicyService",
                            "steerwatch.v1.VectorService", "steerwatch.v1.AlertService", "steerwatch.v1.ModelService"):
                assert await c.health_status(service) == serving, service
            code, _ = await rpc_error(c.health.Check(health_pb2.HealthCheckRequest(service="no.such.Service")))
            assert code == grpc.StatusCode.NOT_FOUND
    run(body())


@pytest.mark.parametrize("store_kind", STORES)
def test_prompt_scoped_monitors(store_kind: str) -> None:
    async def body() -> None:
        async with rig(store_kind) as r:
            c = r.client
            await c.upload_vector("probe", {1: PROBE})
            prompt_alert = direction_monitor("on-prompt", "probe", -NEVER, action="alert", scope="prompt")
            both = direction_monitor("both", "probe", -NEVER, action="annotate", scope="both")
            await c.put_policy("p", policy_doc([prompt_alert, both]))
            res = await c.generate("abc", 3, policy="p")
            kinds = [e.WhichOneof("event") for e in res.events]
            assert kinds == ["alert", "alert", "alert", "token", "token", "token", "final"], kinds
            on_prompt = [(a.monitor, a.phase, a.token_start, a.token_end) for a in res.alerts[:2]]
            assert on_prompt == [("on-prompt", "prompt", 0, 0), ("both", "prompt", 0, 0)]  # fired on the BOS position
            assert (res.alerts[2].monitor, res.alerts[2].phase, res.alerts[2].token_start) == ("both", "generation", 0)
            assert res.alerts[0].alert_id and not res.alerts[1].alert_id  # annotate: in-band only
            assert [x.fields["monitor"] for x in await r.store.read_alerts("acme")] == ["on-prompt"]
            summary = {m.monitor: m for m in res.final.monitors}
            assert summary["on-prompt"].fired and summary["on-prompt"].peak_token == -1

            # a stop on the prompt: not one token reaches the client
            await c.put_policy("p", policy_doc([{**prompt_alert, "action": "stop"}]))
            res = await c.generate("abc", 3, policy="p")
            assert [e.WhichOneof("event") for e in res.events] == ["alert", "final"]
            assert res.final.finish_reason == chat_pb2.FINISH_REASON_POLICY and res.final.text == ""
            assert res.alerts[0].excerpt == ""
            await engine_idle(r.app)
    run(body())


def test_stop_strings_seeds_and_ablation() -> None:
    async def body() -> None:
        async with rig("memory") as r:
            c = r.client
            free = await c.generate(PROMPT, N)
            stop_at = free.text[1]  # the second character of the free output
            req = chat_pb2.GenerateRequest(prompt=PROMPT, sampling=chat_pb2.SamplingParams(max_tokens=N, stop=[stop_at]))
            events = [e async for e in c.chat.Generate(req, metadata=c.md())]
            final = events[-1].final
            streamed = "".join(e.token.text for e in events if e.HasField("token"))
            assert final.finish_reason == chat_pb2.FINISH_REASON_STOP_STRING
            assert final.text == free.text[:1] and stop_at not in final.text
            assert streamed + final.tail == final.text

            def sampled(seed: int) -> chat_pb2.GenerateRequest:
                return chat_pb2.GenerateRequest(prompt=PROMPT, sampling=chat_pb2.SamplingParams(
                    max_tokens=N, temperature=1.0, seed=seed, has_seed=True))

            runs = []
            for seed in (7, 7, 8):
                events = [e async for e in c.chat.Generate(sampled(seed), metadata=c.md())]
                runs.append([e.token.token_id for e in events if e.HasField("token")])
            assert runs[0] == runs[1] != runs[2]
            assert runs[0] != free.token_ids

            await c.upload_vector("steer", {1: STEER})
            ablate = common_pb2.SteeringEntry(ablate=common_pb2.Ablate(vector_id="steer", all_layers=True,
                                                                       phase=common_pb2.PHASE_PROMPT))
            res = await c.generate(PROMPT, N, steering=[ablate])
            assert list(res.final.steering) == [common_pb2.AppliedSteering(
                kind="ablate", source="steer", value=0.0, layers=list(range(N_LAYERS)), phase="prompt",
                origin="request")]
            assert res.token_ids != free.token_ids
    run(body())


def test_a_too_strong_edit_fails_alone() -> None:
    """Non-finite logits end that generation with FINISH_REASON_ERROR; a request batched with it is unaffected."""
    async def body() -> None:
        async with rig("memory") as r:
            c = r.client
            await c.upload_vector("huge", {1: [3e37] * D_MODEL})
            solo = await c.generate("zzz", 40)
            bad, good = await asyncio.gather(c.generate("abc", 40, steering=[add_entry("huge", 16.0)]),
                                             c.generate("zzz", 40))
            assert bad.final.finish_reason == chat_pb2.FINISH_REASON_ERROR and bad.tokens == []
            assert [s.source for s in bad.final.steering] == ["huge"]
            assert good.final.finish_reason == chat_pb2.FINISH_REASON_LENGTH
            assert good.token_ids == solo.token_ids
            await engine_idle(r.app)
            assert (await c.generate("abc", 3)).final.finish_reason == chat_pb2.FINISH_REASON_LENGTH
    run(body())


@pytest.mark.parametrize("store_kind", STORES)
def test_policy_conditional_steering_alerts_and_switches_on(store_kind: str) -> None:
    """A steer monitor fires on the first generated token's state: the alert says 'steer', lands in the
    stream, the gated entry is recorded with its `when`, and the output is the steered one from there."""
    async def body() -> None:
        async with rig(store_kind) as r:
            c = r.client
            await c.upload_vector("probe", {1: PROBE})
            await c.upload_vector("push", {1: random_vector(5, 8.0)})
            steer = direction_monitor("trigger", "probe", -NEVER, action="steer", layer=0)
            gated = {**add_steering("push", 3.0, [1], phase="generation"), "when": "trigger"}
            await c.put_policy("cond", policy_doc([steer], [gated]))
            await c.put_policy("plain", policy_doc([direction_monitor("trigger", "probe", NEVER, layer=0)]))
            await c.put_policy("never", policy_doc([{**steer, "threshold": NEVER}], [gated]))
            res = await c.generate(PROMPT, N, policy="cond")
            plain = await c.generate(PROMPT, N, policy="plain")
            never = await c.generate(PROMPT, N, policy="never")
            (alert,) = res.alerts
            assert (alert.monitor, alert.action, alert.phase, alert.token_start, alert.token_end) == \
                ("trigger", "steer", "generation", 0, 0)
            assert alert.alert_id and [x.fields["action"] for x in await r.store.read_alerts("acme")] == ["steer"]
            assert [(s.when, s.origin) for s in res.final.steering] == [("trigger", "policy")]
            tokens = [t.token_id for t in res.tokens]
            assert tokens[0] == plain.tokens[0].token_id  # chosen by the last prompt position: never gated
            assert tokens != [t.token_id for t in plain.tokens]
            assert [t.token_id for t in never.tokens] == [t.token_id for t in plain.tokens]
            summary = {m.monitor: m for m in res.final.monitors}
            assert summary["trigger"].fired and summary["trigger"].action == "steer"
            await engine_idle(r.app)
    run(body())


def test_explain_reports_which_tokens_drove_a_fired_monitor() -> None:
    async def body() -> None:
        async with rig("memory") as r:
            c = r.client
            await c.upload_vector("probe", {1: PROBE})
            explained = direction_monitor("why", "probe", -NEVER, action="alert", explain=True, aggregation="mean",
                                          window=2)
            quiet = direction_monitor("calm", "probe", NEVER, explain=True)
            await c.put_policy("p", policy_doc([explained, quiet]))
            res = await c.generate(PROMPT, 4, policy="p", include_readings=True)
            (ex,) = res.final.explanations  # only the monitor that fired is explained
            n_prompt = len(encode_prompt(tiny_lm().tokenizer, PROMPT))
            assert (ex.monitor, ex.method, ex.target, ex.error) == ("why", "grad_x_input", n_prompt - 1, "")
            # token 0's reading came from the last prompt position: the explanation recomputes that score
            assert ex.score == pytest.approx(res.tokens[0].readings["why"], rel=1e-3, abs=1e-3)
            assert 0 < len(ex.top) <= 8 and all(0 <= t.position < n_prompt for t in ex.top)
            assert [abs(t.attribution) for t in ex.top] == sorted((abs(t.attribution) for t in ex.top), reverse=True)
            await engine_idle(r.app)
    run(body())


def test_request_monitors_carry_rule_fields_and_conditional_steering() -> None:
    """A request's own monitors: count aggregation over a window (checked against the streamed readings)
    and a steer monitor switching on a request steering entry (`when`)."""
    from service import client as sw

    async def body() -> None:
        async with rig("memory") as r:
            c = r.client
            await c.upload_vector("probe", {1: PROBE})
            await c.upload_vector("push", {1: random_vector(5, 8.0)})
            plain = await c.generate(PROMPT, N, include_readings=True,
                                     monitors=[sw.monitor("m", "direction", "probe", NEVER, layer=1)])
            scores = [t.readings["m"] for t in plain.tokens]
            thr = sorted(scores)[len(scores) // 2]  # half the tokens are above it
            counted = sw.monitor("m", "direction", "probe", thr, layer=1, aggregation="count", window=3, count=2,
                                 action="annotate")
            res = await c.generate(PROMPT, N, include_readings=True, monitors=[counted])
            expected, armed = [], True
            for i in range(N):
                n = sum(s > thr for s in scores[max(0, i - 2):i + 1])
                if n >= 2 and armed:
                    expected.append(i)
                    armed = False
                elif n < 2:
                    armed = True
            assert [a.token_end for a in res.alerts] == expected and expected
            assert all(a.aggregation == "count" and a.value >= 2 for a in res.alerts)
            steer = sw.monitor("go", "direction", "probe", -NEVER, layer=0, action="steer")
            gated = sw.add("push", 3.0, [1], phase="generation", when="go")
            res = await c.generate(PROMPT, N, monitors=[steer], steering=[gated])
            assert [(a.monitor, a.action) for a in res.alerts] == [("go", "steer")]
            assert [t.token_id for t in res.tokens] != [t.token_id for t in plain.tokens]
            code, details = await rpc_error(c.generate(PROMPT, N, steering=[sw.add("push", 1.0, when="nope")]))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "steering[0].when" in details
            await engine_idle(r.app)
    run(body())
