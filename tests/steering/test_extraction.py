"""CAA and refusal-direction extraction on a tiny model with a planted direction, plus the scoring math."""

from __future__ import annotations

import math

import pytest
import torch

from monitors.train.activations import collect_activations
from service.models import encode_prompt
from steering.caa import ab_texts, caa_vector, last_token_starts
from steering.errors import InvalidArgument
from steering.refusal import Runner, ablating, find_refusal_direction, refusal_score

PLANT = 40.0


def unit(seed: int, d: int = 64) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def plant(tiny, layer: int, u: torch.Tensor, marker: int):
    """After ``layer``, add PLANT * u at every position whose token is ``marker`` (and later ones)."""
    state: dict[str, torch.Tensor] = {}

    def pre(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        state["on"] = ((ids == marker).long().cumsum(-1) > 0).float()

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h + PLANT * state["on"][..., None] * u.to(h)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    return [tiny.model.register_forward_pre_hook(pre, with_kwargs=True), tiny.layers[layer].register_forward_hook(hook)]


def encoder(tiny):
    return lambda text: encode_prompt(tiny.tokenizer, text)


def test_ab_texts_end_on_the_answer_letter():
    pos, neg = ab_texts("Is it? \n\nChoices:\n (A) yes\n (B) no", "(B)", "(A)")
    assert pos.endswith("Answer: (B") and neg.endswith("Answer: (A") and pos[:-1] == neg[:-1]


def test_caa_recovers_a_planted_direction_and_the_sweep_finds_its_layer(tiny):
    u = unit(1)
    encode = encoder(tiny)
    marker = encode("X")[-1]
    questions = [f"Question {i}: is {w} good?" for i, w in enumerate(["tea", "rain", "maps", "jazz", "salt", "ink",
                                                                       "moss", "fog", "lamps", "ice", "wool", "oak"])]
    pairs = [ab_texts(q, "(X)", "(Y)") for q in questions]
    texts = [p for p, _ in pairs] + [n for _, n in pairs]
    handles = plant(tiny, 0, u, marker)
    try:
        acts = collect_activations(tiny.model, tiny.layers, encode, texts, [0, 1], pad_id=0,
                                   starts=last_token_starts(encode, texts))
    finally:
        for h in handles:
            h.remove()
    n = len(pairs)
    result = caa_vector({k: a[:n] for k, a in acts.acts.items()}, {k: a[n:] for k, a in acts.acts.items()},
                        holdout=0.25, seed=0)
    v0 = result.vector.at(0)
    assert torch.nn.functional.cosine_similarity(v0, u, dim=0) > 0.99
    assert result.best.layer in (0, 1) and result.best.pair_accuracy == 1.0 and result.n_heldout == 3


def test_caa_needs_two_pairs():
    with pytest.raises(InvalidArgument, match="at least 2"):
        caa_vector({0: torch.zeros(1, 4)}, {0: torch.zeros(1, 4)})


def test_refusal_score_is_log_odds_of_the_refusal_tokens():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    p = 0.2 + 0.4
    assert float(refusal_score(logits, [1, 3])[0]) == pytest.approx(math.log(p) - math.log(1 - p), abs=1e-5)


def test_ablation_hook_removes_the_direction_at_every_layer(tiny):
    u = unit(2)
    out = []
    with ablating(tiny.layers, u * 3.0), torch.inference_mode():  # registered first: runs before the recorder
        rec = [layer.register_forward_hook(lambda m, a, o: out.append((o[0] if isinstance(o, tuple) else o) @ u))
               for layer in tiny.layers]
        try:
            tiny.model(input_ids=torch.tensor([encoder(tiny)("hello")]))
        finally:
            for h in rec:
                h.remove()
    assert all(float(x.abs().max()) < 1e-4 for x in out)


def test_refusal_candidates_recover_the_planted_direction(tiny):
    u = unit(3)
    encode = encoder(tiny)
    marker = encode("!")[-1]
    harmful = [f"do bad! thing {i}" for i in range(10)]
    harmless = [f"do good. thing {i}" for i in range(10)]
    handles = plant(tiny, 0, u, marker)
    try:
        runner = Runner(tiny.model, tiny.layers, encode, pad_id=0, batch_size=4)
        result = find_refusal_direction(runner, harmful[2:], harmless[2:], harmful[:2], harmless[:2], [ord("I")],
                                        layers=[0], n_positions=2, max_kl=10.0)
    finally:
        for h in handles:
            h.remove()
    assert [(c.layer, c.position) for c in result.candidates] == [(0, -2), (0, -1)]
    r = result.vector.at(0)
    assert torch.nn.functional.cosine_similarity(r, u, dim=0) > 0.99  # both positions follow the marker
    assert result.vector.layers == [0, 1]  # the same r at every layer, for ablation
    assert all(c.kl >= 0 for c in result.candidates)


def test_refusal_needs_both_classes(tiny):
    runner = Runner(tiny.model, tiny.layers, encoder(tiny), pad_id=0)
    with pytest.raises(InvalidArgument, match="need harmful and harmless"):
        find_refusal_direction(runner, [], ["x"], ["y"], ["z"], [1], layers=[0])


def test_neutral_kl_is_zero_for_an_edit_that_changes_nothing_and_grows_with_the_coefficient(tiny):
    from contextlib import nullcontext

    from steering.evaluate import NeutralKL, add_edit

    runner = Runner(tiny.model, tiny.layers, encoder(tiny), pad_id=0, batch_size=2)
    kl = NeutralKL(runner, ["a quiet morning", "the river bends", "green hills"], last=3)
    assert kl(lambda: nullcontext()) == pytest.approx(0.0, abs=1e-6)  # a real second pass, not the shortcut
    small, large = (kl(add_edit(runner, 0, unit(4), c)) for c in (1.0, 8.0))
    assert 0 < small < large
