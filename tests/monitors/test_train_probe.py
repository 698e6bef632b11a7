"""Probe training: metric helpers, the logistic fit, splits, calibration, instructed pairs."""

from __future__ import annotations

import math

import pytest
import torch

from monitors.probes import load_probe, save_probe
from monitors.train.activations import TokenActivations
from monitors.train.probe import (
    DISHONEST_PREFIX,
    GENERALISATION,
    HONEST_PREFIX,
    Collector,
    auroc,
    fit_logistic,
    instructed_pairs,
    probe_text_scores,
    split_texts,
    sweep_layers,
    threshold_at_fpr,
    train_instructed_probe,
    train_probe,
)
from service.models import encode_prompt
from steering.errors import InvalidArgument

pytestmark = pytest.mark.usefixtures("single_thread")


def synthetic(n_texts: int = 200, d: int = 24, shift: float = 0.8, seed: int = 0) -> tuple[TokenActivations, torch.Tensor]:
    """Texts of 3-9 tokens; positives are shifted along one direction; offset and scale far from 0/1."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_texts) % 2 == 0
    text_index = torch.arange(n_texts).repeat_interleave(torch.randint(3, 10, (n_texts,), generator=g))
    direction = torch.randn(d, generator=g)
    x = torch.randn(text_index.numel(), d, generator=g) * 3 + 5 + labels[text_index].float()[:, None] * direction * shift
    zeros = torch.zeros_like(text_index)
    return TokenActivations({2: x, 3: torch.randn_like(x)}, text_index, zeros, zeros, n_texts), labels


def brute_auroc(scores: list[float], labels: list[bool]) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_equals_pair_counting_with_ties():
    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        n = 5 + trial
        scores = torch.randint(0, 4, (n,), generator=g).float().tolist()  # many ties
        labels = (torch.rand(n, generator=g) < 0.5).tolist()
        labels[0], labels[1] = True, False
        assert auroc(scores, labels) == pytest.approx(brute_auroc(scores, labels), abs=1e-12)
    assert auroc([0.1, 0.9], [False, True]) == 1.0
    assert auroc([0.5, 0.5], [False, True]) == 0.5
    with pytest.raises(InvalidArgument, match="both classes"):
        auroc([0.1, 0.2], [True, True])


def test_threshold_at_fpr_is_the_smallest_admissible_threshold():
    g = torch.Generator().manual_seed(2)
    for trial in range(30):
        neg = torch.randint(0, 20, (3 + trial * 7,), generator=g).double()  # with ties
        for fpr in (0.0, 0.01, 0.05, 0.2, 0.5):
            t = threshold_at_fpr(neg, fpr)
            assert float((neg > t).double().mean()) <= fpr
            lower = math.nextafter(t, -math.inf)
            assert float((neg > lower).double().mean()) > fpr  # any lower threshold flags too many
    with pytest.raises(InvalidArgument, match="empty"):
        threshold_at_fpr([], 0.01)


def test_separable_texts_give_auroc_one_and_high_recall_at_one_percent_fpr():
    acts, labels = synthetic(n_texts=400, shift=2.0)
    r = train_probe(acts, labels, 2)
    assert r.heldout.auroc > 0.999
    assert r.heldout.recall >= 0.95
    assert r.heldout.fpr <= 0.01
    assert r.heldout.n_pos == r.heldout.n_neg == 50
    assert r.reader.threshold == r.heldout.threshold and r.reader.layer == 2


def test_fit_is_the_regularised_optimum():
    acts, labels = synthetic()
    y = labels[acts.text_index].double()
    for c, intercept in ((0.1, False), (1.0, True)):
        fit = fit_logistic(acts.acts[2], labels[acts.text_index], c=c, fit_intercept=intercept)
        xs = ((acts.acts[2].double() - fit.mean) / fit.std)
        p = torch.sigmoid(xs @ fit.weight + fit.bias)
        grad_w = xs.t() @ (p - y) + fit.weight / c  # d/dw [sum logloss + |w|^2 / (2C)]
        assert float(grad_w.abs().max()) < 1e-4 * acts.n_tokens
        if intercept:
            assert abs(float((p - y).sum())) < 1e-4 * acts.n_tokens
        else:
            assert fit.bias == 0.0
    strong = fit_logistic(acts.acts[2], labels[acts.text_index], c=0.001)
    weak = fit_logistic(acts.acts[2], labels[acts.text_index], c=10.0)
    assert float(strong.weight.norm()) < float(weak.weight.norm())


def test_folded_probe_file_scores_like_the_training_space_model(tmp_path):
    acts, labels = synthetic()
    r = train_probe(acts, labels, 2, fit_intercept=True, name="syn")
    save_probe(r.reader, tmp_path / "p.safetensors", model="m")
    loaded = load_probe(tmp_path / "p.safetensors")
    x = acts.acts[2]
    torch.testing.assert_close(loaded.read(x).double(), torch.sigmoid(r.fit.logits(x)), atol=1e-5, rtol=0)
    assert loaded.threshold == pytest.approx(r.heldout.threshold) and loaded.layer == 2 and loaded.name == "syn"
    # the calibrated quantity is the per-text mean of what the served probe reports per token
    served = torch.zeros(acts.n_texts, dtype=torch.float64).index_add_(0, acts.text_index, loaded.read(x).double())
    torch.testing.assert_close(served / acts.counts(), probe_text_scores(r.fit, acts, 2), atol=1e-5, rtol=0)


def test_split_is_stratified_deterministic_and_keeps_groups_together():
    labels = torch.tensor([True] * 12 + [False] * 28)
    train, held = split_texts(labels, 0.25, seed=3)
    assert int(labels[held].sum()) == 3 and int((~labels[held]).sum()) == 7
    assert sorted(torch.cat([train, held]).tolist()) == list(range(40))
    assert torch.equal(split_texts(labels, 0.25, seed=3)[1], held)
    assert not torch.equal(split_texts(labels, 0.25, seed=4)[1], held)
    groups = torch.arange(20).repeat_interleave(2)
    pair_labels = torch.tensor([False, True] * 20)
    _, held = split_texts(pair_labels, 0.25, seed=0, groups=groups)
    assert held.numel() == 10 and set(groups[held].tolist()).isdisjoint(set(groups[_].tolist()))


def test_control_set_calibration_and_sweep_pick_the_informative_layer():
    acts, labels = synthetic(shift=1.0)
    control, _ = synthetic(n_texts=300, shift=0.0, seed=9)
    r = train_probe(acts, labels, 2, control=control, fpr=0.05)
    assert r.calibration.startswith("control set (300 texts)")
    ctrl_scores = probe_text_scores(r.fit, control, 2)
    assert float((ctrl_scores > r.heldout.threshold).double().mean()) <= 0.05
    sweep = sweep_layers(acts, labels, [3, 2])
    assert sweep.best.layer == 2 and sweep.results[0].heldout.auroc < 0.8  # layer 3 is noise


def test_a_missing_class_is_named():
    acts, _ = synthetic(n_texts=10)
    with pytest.raises(InvalidArgument, match="no negative"):
        train_probe(acts, [True] * 10, 2)


def test_instructed_pairs_score_only_the_fact_tokens(tiny):
    def enc(t: str) -> list[int]:
        return encode_prompt(tiny.tokenizer, t)

    facts = ["Paris is in France.", "Water boils at 100 C."]
    pairs = instructed_pairs(facts, enc)
    assert pairs.texts[:2] == [HONEST_PREFIX + facts[0], DISHONEST_PREFIX + facts[0]]
    assert pairs.labels == [False, True, False, True] and pairs.groups.tolist() == [0, 0, 1, 1]
    collector = Collector(tiny.model, tiny.layers, enc, pad_id=258)
    acts = collector.collect(pairs.texts, [1], pairs.starts)
    for i in range(len(pairs.texts)):
        assert tiny.tokenizer.decode(acts.token_id[acts.text_index == i].tolist()) == facts[i // 2]


def test_instructed_recipe_reports_generalisation_to_plain_statements(tiny):
    facts = [(f"The number {i} is {'even' if i % 2 == 0 else 'odd'}.", f"The number {i} is {'odd' if i % 2 == 0 else 'even'}.")
             for i in range(12)]
    collector = Collector(tiny.model, tiny.layers, lambda t: encode_prompt(tiny.tokenizer, t), pad_id=258)
    seen: list[int] = []
    sweep = train_instructed_probe(collector, facts, [0, 1], progress=lambda done, total: seen.append(total))
    assert {r.layer for r in sweep.results} == {0, 1}
    for r in sweep.results:
        g = r.extra[GENERALISATION]
        assert g.n_pos == g.n_neg == 3  # the 3 held-out facts, each true and false
        assert g.threshold == r.heldout.threshold
        assert r.n_train_pos == r.n_train_neg == 9
    assert set(seen) == {2 * 12 + 2 * 3}  # pairs, then the held-out facts as plain statements


@pytest.mark.slow
def test_instructed_probe_trains_on_the_default_model(default_model):
    from monitors.datasets import Fact, load_packaged, packaged

    if not packaged("instructed_facts").is_file():
        pytest.skip("the packaged instructed_facts dataset is not there yet")
    items = load_packaged("instructed_facts", Fact)[:40]
    lm = default_model
    collector = Collector(lm.model, lm.layers, lambda t: encode_prompt(lm.tokenizer, t), lm.tokenizer.pad_token_id or 0)
    sweep = train_instructed_probe(collector, [(f.fact, f.false) for f in items], [6])
    r = sweep.best
    assert r.layer == 6 and 0.0 <= r.heldout.auroc <= 1.0
    assert r.heldout.auroc > 0.7  # the instruction is visible to every fact token; a weak but real signal
    assert GENERALISATION in r.extra
