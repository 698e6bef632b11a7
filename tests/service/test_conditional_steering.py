"""Conditional steering in the HF engine: a gate latches inside the step where its rule fires and
switches its edits on from that very position; everything before, and every other request in the
batch, is untouched."""

from __future__ import annotations

import threading

import pytest
import torch

from service.engines.hf import EngineLimits, HFEngine
from service.engines.types import GenerationRequest, PromptEvent, Sampling, TokenEvent
from service.models import encode_prompt
from service.models.tiny import tiny_llama
from steering.errors import InvalidArgument
from steering.spec import AddEdit, GateSpec, InterventionSpec, ReadSpec
from steering.vectors import make_vector

N = 14
COEF = 30.0
PROMPTS = ["Hello there", "The quick brown fox jumps", "Steering vectors change behaviour."]


@pytest.fixture(scope="module")
def lm():
    return tiny_llama(n_layers=3, d_model=64, seed=1)


@pytest.fixture(scope="module")
def engine(lm):
    eng = HFEngine(lm, limits=EngineLimits(max_prompt_tokens=200, max_new_tokens=64, max_abs_coef=50))
    g = torch.Generator().manual_seed(7)
    eng.registry.add_vector("watch", make_vector({0: torch.randn(64, generator=g)}))
    eng.registry.add_vector("push", make_vector({2: torch.randn(64, generator=g)}))
    with eng:
        yield eng


READ = ReadSpec(name="w", kind="direction", source="watch", layer=0)


def spec(threshold: float | None, **gate) -> InterventionSpec:
    if threshold is None:
        return InterventionSpec(reads=[READ])
    return InterventionSpec(reads=[READ], gates=[GateSpec(name="g", reading="w", threshold=threshold, **gate)],
                            edits=[AddEdit(vector="push", coef=COEF, layers=[2], when="g")])


def req(prompt: str, interventions: InterventionSpec) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, sampling=Sampling(max_tokens=N, ignore_eos=True),
                             interventions=interventions)


def token_events(events) -> list[TokenEvent]:
    return [e for e in events if isinstance(e, TokenEvent)]


def threshold_firing_at(readings: list[float], k_min: int = 3) -> tuple[float, int]:
    """A threshold the max rule first exceeds at token k (a new running maximum after k_min)."""
    for k in range(k_min, len(readings)):
        if readings[k] > max(readings[:k]) + 1e-3:
            return (readings[k] + max(readings[:k])) / 2, k
    pytest.skip("no new running maximum in the plain run's readings")


def reference(lm, prompt: str, plain_tokens: list[int], k: int, vec: torch.Tensor) -> list[int]:
    """Greedy decoding, full forward each step, adding COEF*vec after layer 2 at every position from
    the one that predicts token k: the semantics a gate latching on token k's reading must have."""
    ids = encode_prompt(lm.tokenizer, prompt)
    start = len(ids) + k - 1

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        h[:, start:] += COEF * vec
        return (h, *output[1:]) if isinstance(output, tuple) else h

    seq = ids + plain_tokens[:k]
    handle = lm.layers[2].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            while len(seq) < len(ids) + N:
                logits = lm.model(input_ids=torch.tensor([seq])).logits[0, -1]
                seq.append(int(logits.argmax()))
    finally:
        handle.remove()
    return seq[len(ids):]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_gate_switches_steering_on_at_the_firing_token(engine, lm, prompt):
    plain = token_events(engine.run(req(prompt, spec(None))))
    readings = [t.readings["w"] for t in plain]
    threshold, k = threshold_firing_at(readings)
    gated = token_events(engine.run(req(prompt, spec(threshold))))
    assert [t.token_id for t in gated[:k]] == [t.token_id for t in plain[:k]]
    assert [t.readings["w"] for t in gated[:k + 1]] == readings[:k + 1]  # read at layer 0, before the edit
    assert [t.gates for t in gated] == [[]] * k + [["g"]] + [[]] * (N - k - 1)
    vec = engine.registry.vector("push").at(2)
    assert [t.token_id for t in gated] == reference(lm, prompt, [t.token_id for t in plain], k, vec)
    assert [t.token_id for t in gated[k:]] != [t.token_id for t in plain[k:]]  # the steering did act


def test_a_gate_that_never_fires_leaves_the_output_bit_identical(engine):
    plain = token_events(engine.run(req(PROMPTS[1], spec(None))))
    never = token_events(engine.run(req(PROMPTS[1], spec(1e9))))
    assert [(t.token_id, t.readings) for t in never] == [(t.token_id, t.readings) for t in plain]


def test_prompt_scope_fires_in_prefill_and_steers_from_the_first_generated_position(engine, lm):
    prompt = PROMPTS[2]
    events = engine.run(req(prompt, spec(-1e9, scope="prompt")))
    (pe,) = [e for e in events if isinstance(e, PromptEvent)]
    assert pe.gates == {"g": 0}
    plain = token_events(engine.run(req(prompt, spec(None))))
    vec = engine.registry.vector("push").at(2)
    # generation rows start at the position predicting token 1: the prompt itself is never edited
    assert [t.token_id for t in token_events(events)] == reference(lm, prompt, [t.token_id for t in plain], 1, vec)


def test_batched_requests_gate_independently(engine):
    """Three requests in one batch: two gated with different thresholds, one plain; each equals its solo run."""
    plain = token_events(engine.run(req(PROMPTS[0], spec(None))))
    t0, _ = threshold_firing_at([t.readings["w"] for t in plain])
    plain2 = token_events(engine.run(req(PROMPTS[2], spec(None))))
    t2, _ = threshold_firing_at([t.readings["w"] for t in plain2], k_min=5)
    cases = [(PROMPTS[0], spec(t0)), (PROMPTS[1], spec(None)), (PROMPTS[2], spec(t2, aggregation="ema", alpha=0.7))]
    solo = [[t.token_id for t in token_events(engine.run(req(p, s)))] for p, s in cases]
    results: list[list[int]] = [[] for _ in cases]
    barrier = threading.Barrier(len(cases))

    def one(i: int) -> None:
        barrier.wait()
        results[i] = [t.token_id for t in token_events(engine.run(req(*cases[i])))]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == solo


def test_gated_edits_must_act_on_generated_tokens(engine):
    bad = InterventionSpec(reads=[READ], gates=[GateSpec(name="g", reading="w", threshold=0.0)],
                           edits=[AddEdit(vector="push", coef=1.0, layers=[2], when="g", phase="prompt")])
    with pytest.raises(InvalidArgument, match=r"edits\[0\].phase"):
        engine.run(req("x", bad))
    with pytest.raises(ValueError, match="when: 'nope' is not a gate"):
        InterventionSpec(reads=[READ], edits=[AddEdit(vector="push", coef=1.0, when="nope")])
    with pytest.raises(ValueError, match="gates\\[0\\].reading"):
        InterventionSpec(reads=[READ], gates=[GateSpec(name="g", reading="missing", threshold=0.0)])


def test_last_prompt_position_opens_the_generation_series(engine, lm):
    """Token 0's reading comes from the last prompt position: a generation-scoped gate that fires there
    is reported on token 0 (as the host rule would) and steers from the position predicting token 1."""
    prompt = PROMPTS[0]
    events = engine.run(req(prompt, spec(-1e9)))
    assert [e for e in events if isinstance(e, PromptEvent)][0].gates == {}
    gated = token_events(events)
    assert [t.gates for t in gated] == [["g"]] + [[]] * (N - 1)
    plain = token_events(engine.run(req(prompt, spec(None))))
    vec = engine.registry.vector("push").at(2)
    assert [t.token_id for t in gated] == reference(lm, prompt, [t.token_id for t in plain], 1, vec)
