"""Token attribution of monitor scores: the math on the tiny LLaMA, then one check on the real model."""

from __future__ import annotations

import copy
import json
import math
import types

import pytest
import torch

from monitors.attribution import (
    Attribution,
    attribute,
    explain_top,
    reader_score_fn,
    sae_feature_score_fn,
)
from monitors.capture import recording
from monitors.probes import make_direction, make_probe
from monitors.sae import build_sae, parse_config
from service.models import encode_prompt
from steering.errors import FailedPrecondition, InvalidArgument
from tests.monitors.test_sae_fixtures import make_cfg, make_tensors

PROMPT = "please summarise the quarterly report"
METHODS = ("grad_x_input", "occlusion")
PLANT = ord("#")  # a byte the prompt does not contain


@pytest.fixture(scope="module")
def ids(tiny) -> list[int]:
    return encode_prompt(tiny.tokenizer, PROMPT)


def direction(seed: int = 1) -> torch.Tensor:
    return torch.randn(64, generator=torch.Generator().manual_seed(seed))


def residual_at(model, layers, layer: int, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode(), recording(layers, [layer]) as store:
        model(input_ids=torch.tensor([ids]))
    return store[layer][0]


def test_grad_x_input_matches_finite_differences_in_float64(tiny, ids):
    model = copy.deepcopy(tiny.model).double()
    for module in model.modules():  # LlamaRMSNorm computes in float32 whatever the input; keep float64
        if type(module).__name__ == "LlamaRMSNorm":
            module.forward = types.MethodType(_rms_norm_64, module)
    layers = model.model.layers
    score_fn = reader_score_fn(make_direction(direction()))
    target, layer = 20, 1
    a = attribute(model, layers, ids, score_fn, layer, target=target)
    embeds = model.get_input_embeddings()(torch.tensor([ids[: target + 1]])).detach()

    def score(e: torch.Tensor) -> float:
        out: list[torch.Tensor] = []
        handle = layers[layer].register_forward_hook(lambda m, i, o: out.append(o[0] if isinstance(o, tuple) else o))
        try:
            with torch.no_grad():
                model(inputs_embeds=e, use_cache=False)
        finally:
            handle.remove()
        return float(score_fn(out[0][0])[target])

    assert a.score == pytest.approx(score(embeds), rel=1e-9)
    eps = 1e-6
    for pos in (3, 11, target):  # d/dt score(e with e_pos scaled by t) at t=1 is grad_pos · e_pos
        up, down = embeds.clone(), embeds.clone()
        up[0, pos] *= 1 + eps
        down[0, pos] *= 1 - eps
        numeric = (score(up) - score(down)) / (2 * eps)
        assert a.per_token[pos] == pytest.approx(numeric, rel=1e-6, abs=1e-12)


def _rms_norm_64(self, x: torch.Tensor) -> torch.Tensor:
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


@pytest.mark.parametrize("method", METHODS)
def test_later_positions_are_exactly_zero_and_do_not_change_earlier_ones(tiny, ids, method):
    fn = reader_score_fn(make_direction(direction()))
    target = 12
    a = attribute(tiny.model, tiny.layers, ids, fn, 1, target=target, method=method)
    assert len(a.per_token) == len(ids) and a.target == target
    assert a.per_token[target + 1:] == [0.0] * (len(ids) - target - 1)
    assert any(v != 0.0 for v in a.per_token[1:target + 1])
    cut = attribute(tiny.model, tiny.layers, ids[: target + 1], fn, 1, method=method, target=-1)
    assert cut.score == pytest.approx(a.score, rel=1e-5)
    assert cut.per_token == pytest.approx(a.per_token[: target + 1], rel=1e-4, abs=1e-7)
    assert all(pos <= target for pos, _ in a.top(len(ids)))


@pytest.mark.parametrize("layer", [0, 1])
def test_planted_token_leads_both_methods_and_is_the_default_target(tiny, ids, layer):
    """A reader along the planted token's embedding peaks where that token sits, and explaining that
    peak points back at it (BOS and position 0 aside)."""
    w = tiny.model.get_input_embeddings().weight[PLANT].detach()
    fn = reader_score_fn(make_direction(w))
    for pos in (2, 15, len(ids) - 3):
        planted = list(ids)
        planted[pos] = PLANT
        for method in METHODS:
            a = attribute(tiny.model, tiny.layers, planted, fn, layer, method=method)
            assert a.target == pos, (method, pos)
            assert a.top(1)[0][0] == pos, (method, pos, a.top(3))


@pytest.mark.parametrize("pos", [2, 15, 25])
def test_occlusion_is_the_exact_counterfactual_and_ranks_the_planted_token(tiny, ids, pos):
    """Reader = how the last token's layer-0 residual changes when ``#`` replaces the token at ``pos``.
    Occluding ``pos`` with the original token is exactly that change; no other earlier token matters as much."""
    planted = list(ids)
    planted[pos] = PLANT
    delta = residual_at(tiny.model, tiny.layers, 0, planted)[-1] - residual_at(tiny.model, tiny.layers, 0, ids)[-1]
    fn = reader_score_fn(make_direction(delta))
    last = len(ids) - 1
    occ = attribute(tiny.model, tiny.layers, planted, fn, 0, method="occlusion", target=-1, baseline_id=ids[pos])
    assert occ.per_token[pos] == pytest.approx(float(delta.norm()), rel=1e-4)
    grad = attribute(tiny.model, tiny.layers, planted, fn, 0, method="grad_x_input", target=-1)
    for a in (occ, grad):  # the target's own token reaches the residual directly; leave it out
        assert [p for p, _ in a.top(len(ids)) if p != last][0] == pos, (a.method, a.top(4))


def test_occlusion_batches_agree_and_bos_is_left_alone(tiny, ids):
    fn = reader_score_fn(make_direction(direction(2)))
    runs = [attribute(tiny.model, tiny.layers, ids, fn, 1, method="occlusion", batch_size=b, baseline_id=258)
            for b in (1, 5, 64)]
    for other in runs[1:]:
        assert other.per_token == pytest.approx(runs[0].per_token, abs=1e-6)
    a = runs[0]
    assert a.bos and a.per_token[0] == 0.0
    assert all(pos != 0 for pos, _ in a.top(len(ids)))
    zero = attribute(tiny.model, tiny.layers, ids, fn, 1, method="occlusion", target=a.target)
    assert zero.score == pytest.approx(a.score) and zero.per_token != a.per_token


def test_no_bos_means_position_zero_counts(tiny, ids):
    fn = reader_score_fn(make_direction(direction()))
    a = attribute(tiny.model, tiny.layers, ids[1:], fn, 1, method="occlusion", target=-1)
    assert not a.bos and a.per_token[0] != 0.0
    assert 0 in [pos for pos, _ in a.top(len(ids))]


def test_grad_leaves_no_state_and_works_under_inference_mode(tiny, ids):
    fn = reader_score_fn(make_direction(direction()))
    plain = attribute(tiny.model, tiny.layers, ids, fn, 1, target=-1)
    with torch.inference_mode():
        inside = attribute(tiny.model, tiny.layers, ids, fn, 1, target=-1)
        weight = torch.randn(64)  # an inference tensor, as a reader built inside a server request would be
    assert inside.per_token == pytest.approx(plain.per_token, rel=1e-6, abs=1e-9)
    attribute(tiny.model, tiny.layers, ids, reader_score_fn(make_direction(weight)), 1)
    assert all(not p.requires_grad and p.grad is None for p in tiny.model.parameters())
    assert torch.is_grad_enabled()


def test_logit_option_explains_the_linear_part_of_a_saturated_probe(tiny, ids):
    w = direction(3)
    h = residual_at(tiny.model, tiny.layers, 1, ids)
    z = h @ (w / w.norm())
    probe = make_probe(w / w.norm(), bias=30.0 - float(z.min()))  # sigmoid ~1 everywhere: saturated
    prob = attribute(tiny.model, tiny.layers, ids, reader_score_fn(probe), 1, target=-1)
    logit = attribute(tiny.model, tiny.layers, ids, reader_score_fn(probe, logit=True), 1, target=-1)
    assert prob.score == pytest.approx(1.0, abs=1e-6)
    assert logit.score == pytest.approx(float(z[-1]) + probe.bias, rel=1e-5)
    assert max(abs(v) for v in prob.per_token) < 1e-9 < max(abs(v) for v in logit.per_token)
    mild = make_probe(w / w.norm(), bias=-float(z[-1]))  # score 0.5 at the target: sigmoid' = 1/4
    a = attribute(tiny.model, tiny.layers, ids, reader_score_fn(mild), 1, target=-1)
    b = attribute(tiny.model, tiny.layers, ids, reader_score_fn(mild, logit=True), 1, target=-1)
    assert a.per_token == pytest.approx([v / 4 for v in b.per_token], rel=1e-4, abs=1e-9)


def test_sae_feature_score_fn_uses_the_saes_encoder_and_differentiates(tiny, ids):
    cfg = make_cfg("jumprelu", "constant_norm_rescale")
    cfg.update(d_in=64, d_sae=32)
    sae = build_sae(parse_config(cfg, "test"), make_tensors("threshold", d_in=64, d_sae=32), "test")
    h = residual_at(tiny.model, tiny.layers, 1, ids)
    full = sae.encode(h)
    feature = int(full.sum(0).argmax())
    fn = sae_feature_score_fn(sae, feature)
    assert torch.allclose(fn(h), full[:, feature], atol=1e-6)
    a = attribute(tiny.model, tiny.layers, ids, fn, 1)
    assert a.score == pytest.approx(float(full[:, feature][1:].max()), rel=1e-5)
    assert any(v != 0.0 for v in a.per_token)
    with pytest.raises(InvalidArgument, match=r"feature: 32 is out of range; allowed 0\.\.31"):
        sae_feature_score_fn(sae, 32)


def test_a_monitor_built_in_inference_mode_fails_clearly_for_gradients_only(tiny, ids):
    cfg = make_cfg("topk", k=5)  # TopK encodes with the whole encoder, an inference tensor here
    cfg.update(d_in=64, d_sae=32)
    with torch.inference_mode():
        sae = build_sae(parse_config(cfg, "test"), make_tensors("plain", d_in=64, d_sae=32), "test")
        feature = int(sae.encode(residual_at(tiny.model, tiny.layers, 1, ids)).sum(0).argmax())
    fn = sae_feature_score_fn(sae, feature)
    assert attribute(tiny.model, tiny.layers, ids, fn, 1, method="occlusion").score > 0
    with pytest.raises(FailedPrecondition, match="score_fn: .*inference_mode.*use method=occlusion"):
        attribute(tiny.model, tiny.layers, ids, fn, 1)


def test_explain_top_is_a_small_json_dict(tiny, ids):
    fn = reader_score_fn(make_direction(direction()))
    out = explain_top(tiny.model, tiny.layers, ids, fn, 1, method="occlusion", target=-1, top=3)
    a = attribute(tiny.model, tiny.layers, ids, fn, 1, method="occlusion", target=-1)
    assert json.loads(json.dumps(out)) == out
    assert out["method"] == "occlusion" and out["target"] == len(ids) - 1 and out["score"] == pytest.approx(a.score)
    assert [r["position"] for r in out["top"]] == [p for p, _ in a.top(3)]
    assert all(r["token_id"] == ids[r["position"]] for r in out["top"])


def test_top_orders_by_magnitude_and_validates():
    a = Attribution("occlusion", 3, 1.0, [9.0, -2.0, 0.5, 2.0, 7.0], bos=True)
    assert a.top(2) == [(1, -2.0), (3, 2.0)]
    assert a.top(10) == [(1, -2.0), (3, 2.0), (2, 0.5)]
    assert Attribution("occlusion", 3, 1.0, [9.0, -2.0, 0.5, 2.0, 7.0]).top(1) == [(0, 9.0)]
    with pytest.raises(InvalidArgument, match="top"):
        a.top(-1)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"layer": 2}, r"layer: 2 is out of range; allowed 0\.\.1"),
    ({"layer": -1}, r"layer: -1 is out of range; allowed 0\.\.1"),
    ({"target": 99}, r"target: 99 is out of range; allowed 0\.\.37 \(or -38\.\.-1"),
    ({"target": -39}, r"target: -39 is out of range"),
    ({"method": "saliency"}, r"method: 'saliency' not allowed; use one of grad_x_input, occlusion"),
    ({"input_ids": []}, r"input_ids: is empty"),
    ({"input_ids": [256, 300]}, r"input_ids\[1\]: token id 300 is out of range; allowed 0\.\.258"),
    ({"method": "occlusion", "baseline_id": 259}, r"baseline_id: 259 is out of range; allowed 0\.\.258"),
    ({"method": "occlusion", "batch_size": 0}, r"batch_size: 0 is not allowed"),
    ({"score_fn": lambda h: h.sum()}, r"score_fn: returned \[\]; it must map a residual"),
    ({"score_fn": lambda h: h.sum(-1).detach()}, r"score_fn: its scores carry no gradient"),
])
def test_errors_name_the_argument_and_range(tiny, ids, kwargs, message):
    args = {"input_ids": ids, "score_fn": reader_score_fn(make_direction(direction())), "layer": 1, **kwargs}
    with pytest.raises(InvalidArgument, match=message) as err:
        attribute(tiny.model, tiny.layers, **args)
    assert err.value.field == message.split(":")[0].replace("\\", "")


@pytest.mark.slow
def test_topic_direction_on_the_default_model_points_at_the_topic_word(default_model):
    """A mean-difference 'ocean' direction at layer 6: explaining its projection at the last token of
    a prompt ending in 'ocean', and at the peak of a prompt with 'ocean' mid-sentence, ranks ' ocean'
    among the top 3 prompt tokens with both methods."""
    from steering.extract import mean_difference

    lm = default_model
    tok = lm.tokenizer

    def enc(text: str) -> list[int]:
        return encode_prompt(tok, text)

    frames = ["We walked along the {} all day long.", "I could hear the {} from my window at night.",
              "The {} looked calm this morning.", "She took a photo of the {} before leaving.",
              "They talked about the {} for hours.", "Nobody expected the {} to be so beautiful."]
    others = ["street", "city", "building", "road", "garden", "market"]
    vec = mean_difference(lm.model, lm.layers, enc, [f.format("ocean") for f in frames],
                          [f.format(w) for f in frames for w in others], [6], position="mean")
    fn = reader_score_fn(make_direction(vec.per_layer[6]))
    cases = [("Last summer my friends and I rented a small house right next to the ocean", -1),
             ("Every morning before work he went for a quick swim in the ocean and then had coffee.", None)]
    for prompt, target in cases:
        ids = enc(prompt)
        where = [i for i, t in enumerate(ids) if tok.decode([t]) == " ocean"]
        assert len(where) == 1
        for method in METHODS:
            a = attribute(lm.model, lm.layers, ids, fn, 6, method=method, target=target, baseline_id=tok.pad_token_id)
            assert a.bos and a.target == where[0], (prompt, method, a.target)
            assert where[0] in [pos for pos, _ in a.top(3)], (prompt, method, a.top(3))
            assert math.isfinite(a.score)
