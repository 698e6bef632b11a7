"""The real default model (Gemma 3 270M): a CAA vector measurably shifts the next-token distribution
and the generation; monitors read it. Slow: loads the real model (still runs in CI)."""

from __future__ import annotations

import pytest
import torch

from service.engines.hf import HFEngine
from service.engines.types import FinalEvent, GenerationRequest, Sampling, TokenEvent
from service.models import encode_prompt
from steering.batch import BatchPlan, row_of
from steering.compile import compile_spec
from steering.extract import mean_difference
from steering.spec import AddEdit, InterventionSpec, ReadSpec

pytestmark = pytest.mark.slow

POS = ["I love talking about weddings.", "Weddings are the best topic.", "Let me tell you about a wedding."]
NEG = ["I love talking about the weather.", "The weather is the best topic.", "Let me tell you about the weather."]
PROMPT = "I went up to my friend and said"


@pytest.fixture(scope="module")
def engine(_default_model_session):
    lm = _default_model_session
    vec = mean_difference(lm.model, lm.layers, lambda t: encode_prompt(lm.tokenizer, t), POS, NEG, [6], position="mean")
    eng = HFEngine(lm)
    eng.registry.add_vector("weddings", vec)
    with eng:
        yield eng


def next_token_probs(engine, coef: float) -> torch.Tensor:
    lm = engine.lm
    ids = torch.tensor([encode_prompt(lm.tokenizer, PROMPT)])
    spec = InterventionSpec(edits=[AddEdit(vector="weddings", coef=coef, layers=[6])])
    plan = BatchPlan([compile_spec(spec, engine.registry, engine.shape)], lm.d_model)
    with torch.inference_mode():
        engine.hooks.set_step(plan, torch.full((ids.shape[1],), row_of(0, "prompt")))
        try:
            logits = lm.model(input_ids=ids).logits[0, -1].float()
        finally:
            engine.hooks.set_step(None, None)
    return torch.softmax(logits, -1)


def test_caa_vector_shifts_the_next_token_distribution(engine):
    tok = engine.lm.tokenizer
    base, steered = next_token_probs(engine, 0.0), next_token_probs(engine, 2.0)
    kl = float((steered * (steered.clamp_min(1e-12).log() - base.clamp_min(1e-12).log())).sum())
    assert kl > 0.05, kl
    wedding_ids = sorted({tok.encode(w, add_special_tokens=False)[0] for w in (" wedding", " bride", " married", " marry")})
    assert float(steered[wedding_ids].sum()) > 2 * float(base[wedding_ids].sum())


def test_steered_generation_talks_about_weddings_and_the_monitor_sees_it(engine):
    # read after this layer's edits: the monitor must see the steering that is applied in the same step
    reads = [ReadSpec(name="weddings", kind="direction", source="weddings", layer=6, after_edits=True)]

    def run(coef: float):
        edits = [AddEdit(vector="weddings", coef=coef, layers=[6])] if coef else []
        return engine.run(GenerationRequest(prompt=PROMPT, sampling=Sampling(max_tokens=20),
                                            interventions=InterventionSpec(edits=edits, reads=reads)))

    plain, steered = run(0.0), run(2.0)
    text = steered[-1].text.lower()
    assert isinstance(steered[-1], FinalEvent)
    assert any(w in text for w in ("wedd", "brid", "marr")), text
    assert not any(w in plain[-1].text.lower() for w in ("wedd", "brid", "marr"))

    def mean_reading(evs):
        vals = [e.readings["weddings"] for e in evs if isinstance(e, TokenEvent)]
        return sum(vals) / len(vals)

    norm = engine.registry.vector("weddings").norm()
    assert mean_reading(steered) - mean_reading(plain) > norm  # 2 x |v| added, minus the text's own drift
