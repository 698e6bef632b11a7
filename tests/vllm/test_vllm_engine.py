"""The vLLM engine against the HF engine (the reference) on the same tiny LLaMA, float32, greedy.

Parity means: the same tokens, and readings within float32 tolerance (vLLM's CPU attention kernels sum
in another order than transformers' SDPA). Requests are submitted concurrently, so vLLM batches them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import torch

from monitors.sae import build_sae, parse_config
from service.engines.types import Event, FinalEvent, GenerationRequest, PromptEvent, Sampling, TokenEvent
from steering.errors import InvalidArgument, LimitExceeded, NotFound
from tests.monitors.test_sae_fixtures import make_cfg
from tests.vllm.conftest import SKIP_REASON, TINY

pytest.importorskip("vllm", reason=SKIP_REASON)

PROMPTS = ["Hello", "The quick brown fox jumps over", "Once upon a time, in a land far away,"]
RTOL, ATOL = 1e-3, 1e-4


def req(prompt: str, spec: dict | None = None, max_tokens: int = 10, **sampling: Any) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, sampling=Sampling(max_tokens=max_tokens, ignore_eos=True, **sampling),
                             interventions=spec or {})


def tokens(evs: list[Event]) -> list[int]:
    return [e.token_id for e in evs if isinstance(e, TokenEvent)]


def final(evs: list[Event]) -> FinalEvent:
    assert isinstance(evs[-1], FinalEvent)
    return evs[-1]


def readings(evs: list[Event]) -> dict[str, list[float]]:
    """Prompt readings then each token's, per name."""
    out: dict[str, list[float]] = {}
    for e in evs:
        if isinstance(e, PromptEvent):
            for k, v in e.readings.items():
                out.setdefault(k, []).extend(v)
        elif isinstance(e, TokenEvent):
            for k, v in e.readings.items():
                out.setdefault(k, []).append(v)
    return out


def run_vllm(loop_thread, engine, reqs: list[GenerationRequest]) -> list[list[Event]]:
    async def go() -> list[list[Event]]:
        return list(await asyncio.gather(*(engine.run(r) for r in reqs)))
    return loop_thread.run(go())


def assert_same(hf_evs: list[Event], v_evs: list[Event]) -> None:
    assert final(v_evs).error is None, final(v_evs).error
    assert tokens(v_evs) == tokens(hf_evs)
    assert final(v_evs).text == final(hf_evs).text
    want, got = readings(hf_evs), readings(v_evs)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(torch.tensor(got[name]), torch.tensor(want[name]), rtol=RTOL, atol=ATOL)


def tiny_sae() -> Any:
    d, n = TINY["d_model"], 32
    g = torch.Generator().manual_seed(11)
    t = {"W_enc": torch.randn(d, n, generator=g) * 0.2, "b_enc": torch.zeros(n),
         "W_dec": torch.randn(n, d, generator=g) * 0.2, "b_dec": torch.zeros(d)}
    cfg = make_cfg("standard", d_in=d, d_sae=n, metadata={"model_name": "toy", "hook_name": "blocks.1.hook_resid_post"})
    return build_sae(parse_config(cfg, "test"), t, "test")


@pytest.fixture(scope="module", autouse=True)
def _saes(hf_tiny, vllm_tiny):
    sae = tiny_sae()
    hf_tiny.registry.add_sae("sae", sae, replace=True)
    vllm_tiny.registry.add_sae("sae", sae, replace=True)


SPECS = {
    "add-both": {"edits": [{"kind": "add", "vector": "push", "coef": 2.0, "layers": [1]}]},
    "add-generation-read": {"edits": [{"kind": "add", "vector": "push", "coef": 1.5, "phase": "generation"}],
                            "reads": [{"name": "p", "kind": "direction", "source": "nudge", "layer": 2}]},
    "ablate-all": {"edits": [{"kind": "ablate", "vector": "push"}],
                   "reads": [{"name": "a", "kind": "direction", "source": "push", "layer": 1, "after_edits": True}]},
    "clamp-and-feature": {"edits": [{"kind": "clamp", "sae": "sae", "feature": 3, "value": 6.0}],
                          "reads": [{"name": "f3", "kind": "sae_feature", "source": "sae", "feature": 3},
                                    {"name": "f5", "kind": "sae_feature", "source": "sae", "feature": 5}]},
    "read-only": {"reads": [{"name": "c", "kind": "direction", "source": "nudge", "layer": 0, "metric": "cosine"}]},
}


def test_plain_greedy_equals_hf(hf_tiny, vllm_tiny, loop_thread):
    reqs = [req(p, max_tokens=16) for p in PROMPTS]
    for hf_evs, v_evs in zip([hf_tiny.run(r) for r in reqs], run_vllm(loop_thread, vllm_tiny, reqs), strict=True):
        assert_same(hf_evs, v_evs)
        assert final(v_evs).completion_tokens == 16


@pytest.mark.parametrize("name", sorted(SPECS))
def test_steering_and_readings_equal_hf(hf_tiny, vllm_tiny, loop_thread, name):
    reqs = [req(p, SPECS[name]) for p in PROMPTS]
    results = run_vllm(loop_thread, vllm_tiny, reqs)
    for r, v_evs in zip(reqs, results, strict=True):
        assert_same(hf_tiny.run(r), v_evs)


def test_steering_changes_the_output(hf_tiny, vllm_tiny, loop_thread):
    plain, steered = run_vllm(loop_thread, vllm_tiny, [req(PROMPTS[1]), req(PROMPTS[1], SPECS["add-both"])])
    assert tokens(plain) != tokens(steered)  # guards the parity tests against an inert hook


def test_unsteered_request_in_a_steered_batch_equals_its_solo_run(vllm_tiny, loop_thread):
    plain = req(PROMPTS[2], {"reads": [{"name": "c", "kind": "direction", "source": "nudge", "layer": 1}]}, 20)
    solo = run_vllm(loop_thread, vllm_tiny, [plain])[0]
    mixed = run_vllm(loop_thread, vllm_tiny, [req(PROMPTS[0], SPECS["add-both"], 20), plain,
                                              req(PROMPTS[1], SPECS["ablate-all"], 20),
                                              req(PROMPTS[2], SPECS["clamp-and-feature"], 20)])
    assert tokens(mixed[1]) == tokens(solo)
    # not bit-identical: vLLM's CPU GEMMs block differently for another batch size, edits or none
    torch.testing.assert_close(torch.tensor(readings(mixed[1])["c"]), torch.tensor(readings(solo)["c"]),
                               rtol=1e-5, atol=1e-6)


def test_conditional_steering_equals_hf(hf_tiny, vllm_tiny, loop_thread):
    spec = {"reads": [{"name": "w", "kind": "direction", "source": "nudge", "layer": 0}],
            "gates": [{"name": "g", "reading": "w", "threshold": -1e9, "aggregation": "max", "scope": "generation"}],
            "edits": [{"kind": "add", "vector": "push", "coef": 2.0, "layers": [1], "when": "g"}]}
    for r, v_evs in zip([req(p, spec) for p in PROMPTS], run_vllm(loop_thread, vllm_tiny, [req(p, spec) for p in PROMPTS]),
                        strict=True):
        hf_evs = hf_tiny.run(r)
        assert_same(hf_evs, v_evs)
        assert [e.gates for e in v_evs if isinstance(e, TokenEvent)] == [e.gates for e in hf_evs if isinstance(e, TokenEvent)]
        assert any(e.gates == ["g"] for e in v_evs if isinstance(e, TokenEvent))


def test_gate_on_prompt_is_reported_with_its_position(hf_tiny, vllm_tiny, loop_thread):
    spec = {"reads": [{"name": "w", "kind": "direction", "source": "nudge", "layer": 0}],
            "gates": [{"name": "g", "reading": "w", "threshold": -1e9, "aggregation": "max", "scope": "both"}],
            "edits": [{"kind": "add", "vector": "push", "coef": 2.0, "layers": [1], "when": "g"}]}
    r = req(PROMPTS[1], spec)
    v_evs = run_vllm(loop_thread, vllm_tiny, [r])[0]
    hf_evs = hf_tiny.run(r)
    assert_same(hf_evs, v_evs)
    assert v_evs[0].gates == hf_evs[0].gates == {"g": 0}


def test_cancel_mid_stream_frees_the_request_in_the_worker(vllm_tiny, loop_thread):
    async def go() -> tuple[int, list[dict[str, Any]]]:
        stream = vllm_tiny.open_stream(req(PROMPTS[0], SPECS["read-only"], max_tokens=400))
        seen = 0
        async for ev in stream:
            seen += isinstance(ev, TokenEvent)
            if seen == 3:
                stream.cancel()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stats = await vllm_tiny.worker_stats()
            if stats[0]["requests"] == 0 and vllm_tiny.running == 0:
                break
            await asyncio.sleep(0.2)
        return seen, stats
    seen, stats = loop_thread.run(go())
    assert 3 <= seen < 400
    assert stats[0]["requests"] == 0
    assert vllm_tiny.running == 0 and vllm_tiny.readouts.open_count == 0


def test_many_cancels_leave_nothing_behind(vllm_tiny, loop_thread):
    async def go() -> dict[str, Any]:
        streams = [vllm_tiny.open_stream(req(p, SPECS["add-generation-read"], max_tokens=300)) for p in PROMPTS * 4]
        await asyncio.sleep(0.5)
        for s in streams:
            s.cancel()
        for s in streams:
            async for _ in s:
                pass
        await asyncio.sleep(1.0)
        # one more request runs a step, which is when the worker drops finished ids
        await vllm_tiny.run(req("x", max_tokens=2))
        return (await vllm_tiny.worker_stats())[0]
    stats = loop_thread.run(go())
    assert stats["requests"] == 0 and vllm_tiny.running == 0 and vllm_tiny.readouts.open_count == 0


def _with_cache_info(vllm_tiny, loop_thread, r: GenerationRequest) -> tuple[list[Event], int]:
    async def go() -> tuple[list[Event], int]:
        stream = vllm_tiny.open_stream(r)
        evs = [ev async for ev in stream]
        return evs, stream.num_cached_tokens
    return loop_thread.run(go())


def test_prefix_cache_is_salted_for_steered_and_monitored_requests(hf_tiny, vllm_tiny, loop_thread):
    prompt = "A long shared system prompt that fills several cache blocks of sixteen tokens. " * 3
    plain1, _ = _with_cache_info(vllm_tiny, loop_thread, req(prompt))
    plain2, cached_plain = _with_cache_info(vllm_tiny, loop_thread, req(prompt))
    assert cached_plain > 0  # caching is on: plain requests share their prefix
    steer = req(prompt, {"edits": [{"kind": "add", "vector": "nudge", "coef": 3.0, "layers": [0]}]})
    steered, cached_steer = _with_cache_info(vllm_tiny, loop_thread, steer)
    assert cached_steer == 0  # never the plain prefix
    assert_same(hf_tiny.run(steer), steered)
    again, cached_again = _with_cache_info(vllm_tiny, loop_thread, steer)
    assert cached_again > 0 and tokens(again) == tokens(steered)  # same steering, same salt: shared
    watch = req(prompt, SPECS["read-only"])
    for _ in range(2):
        evs, cached = _with_cache_info(vllm_tiny, loop_thread, watch)
        assert cached == 0
        assert len(readings(evs)["c"]) == len(evs[0].token_ids) + 10  # every prompt token was read


@pytest.mark.parametrize("spec,error,field", [
    ({"edits": [{"kind": "add", "vector": "nope", "coef": 1.0}]}, NotFound, "edits[0].vector"),
    ({"edits": [{"kind": "add", "vector": "push", "coef": 99.0}]}, LimitExceeded, "edits[0].coef"),
    ({"edits": [{"kind": "add", "vector": "push", "coef": 1.0, "layers": [7]}]}, InvalidArgument, "edits[0].layers"),
    ({"reads": [{"name": "f", "kind": "sae_feature", "source": "sae", "feature": 999}]}, InvalidArgument, "reads[0].feature"),
])
def test_bad_requests_are_refused_like_the_hf_engine(hf_tiny, vllm_tiny, loop_thread, spec, error, field):
    async def go() -> None:
        vllm_tiny.open_stream(req("hi", spec))
    with pytest.raises(error) as v_err:
        loop_thread.run(go())
    with pytest.raises(error) as hf_err:
        hf_tiny.run(req("hi", spec))
    assert field in str(v_err.value) and str(v_err.value) == str(hf_err.value)


def test_oversized_prompt_is_refused(vllm_tiny, loop_thread):
    async def go() -> None:
        vllm_tiny.open_stream(req("x" * 600))
    with pytest.raises(LimitExceeded, match="prompt: 601 tokens is beyond the limit; allowed 1..511"):
        loop_thread.run(go())


def test_non_finite_edit_fails_its_request_alone(vllm_tiny, loop_thread):
    plain = req(PROMPTS[2], max_tokens=12)
    solo = run_vllm(loop_thread, vllm_tiny, [plain])[0]
    bad, good = run_vllm(loop_thread, vllm_tiny, [req(PROMPTS[1], {"edits": [
        {"kind": "add", "vector": "huge", "coef": 16.0, "layers": [1]}]}), plain])
    assert final(bad).finish_reason == "error" and "non-finite" in (final(bad).error or "")
    assert tokens(good) == tokens(solo)


def test_replaced_vector_reaches_the_workers(hf_tiny, vllm_tiny, loop_thread):
    from steering.vectors import make_vector

    spec = {"edits": [{"kind": "add", "vector": "swap", "coef": 2.0}]}
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        vec = make_vector({1: torch.randn(TINY["d_model"], generator=g) * 3})
        hf_tiny.registry.add_vector("swap", vec, replace=True)
        vllm_tiny.registry.add_vector("swap", vec, replace=True)
        assert_same(hf_tiny.run(req(PROMPTS[1], spec)), run_vllm(loop_thread, vllm_tiny, [req(PROMPTS[1], spec)])[0])


def test_stop_strings_and_eos_behave_like_hf(hf_tiny, vllm_tiny, loop_thread):
    r = GenerationRequest(prompt=PROMPTS[1], sampling=Sampling(max_tokens=30))
    hf_evs, v_evs = hf_tiny.run(r), run_vllm(loop_thread, vllm_tiny, [r])[0]
    assert tokens(v_evs) == tokens(hf_evs) and final(v_evs).finish_reason == final(hf_evs).finish_reason
    text = final(hf_evs).text
    if len(text) >= 4:
        stop = text[2:4]
        r2 = GenerationRequest(prompt=PROMPTS[1], sampling=Sampling(max_tokens=30, stop=[stop]))
        assert final(run_vllm(loop_thread, vllm_tiny, [r2])[0]).text == final(hf_tiny.run(r2)).text


def test_canary_saw_the_hooks(vllm_tiny):
    assert vllm_tiny.canary["plain"] != vllm_tiny.canary["steered"]
    assert all(v != 0.0 for v in vllm_tiny.canary["readings"])
