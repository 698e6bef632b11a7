"""Top-activating contexts: the tracker against brute force, a planted feature, rendered snippets."""

from __future__ import annotations

import json

import pytest
import torch

from monitors.sae import build_sae, parse_config
from monitors.train.activations import TokenActivations, iter_activations
from monitors.train.top_examples import LEFT, RIGHT, TopTracker, render, strongest, track
from service.models import encode_prompt

pytestmark = pytest.mark.usefixtures("single_thread")


def brute_top(f: torch.Tensor, text_index: torch.Tensor, top: int) -> list[list[tuple[float, int]]]:
    """Per feature: the best (activation, text) over texts (one per text, positives only)."""
    out = []
    for j in range(f.shape[1]):
        per_text = {}
        for r in range(f.shape[0]):
            t, v = int(text_index[r]), float(f[r, j])
            if v > 0 and v > per_text.get(t, float("-inf")):
                per_text[t] = v
        out.append(sorted(((v, t) for t, v in per_text.items()), reverse=True)[:top])
    return out


def test_tracker_matches_brute_force_over_batches():
    g = torch.Generator().manual_seed(0)
    tracker = TopTracker(7, top=3)
    all_f, all_t = [], []
    text = 0
    for _ in range(5):  # batches of whole texts
        lens = torch.randint(1, 6, (4,), generator=g)
        ti = torch.arange(text, text + 4).repeat_interleave(lens)
        text += 4
        f = torch.relu(torch.randn(ti.numel(), 7, generator=g) - 0.5)
        pos = torch.cat([torch.arange(int(n)) for n in lens]) + 1
        tracker.update(f, ti, pos)
        all_f.append(f)
        all_t.append(ti)
    f, ti = torch.cat(all_f), torch.cat(all_t)
    expected = brute_top(f, ti, 3)
    for j in range(7):
        got = tracker.entries(j)
        assert [(round(s, 5), t) for s, t, _ in got] == [(round(v, 5), t) for v, t in expected[j]]
        for s, t, p in got:  # the position is where that text reaches its maximum
            rows = (ti == t).nonzero().flatten()
            assert float(f[rows[p - 1], j]) == pytest.approx(s)
    assert strongest(tracker, 2) == sorted(range(7), key=lambda j: -expected[j][0][0] if expected[j] else 0)[:2]


def _planted_sae(d_in: int, direction: torch.Tensor, bias: float = 0.0):
    """A standard SAE whose feature 1 reads ``direction`` (plus ``bias``); features 0 and 2 never fire."""
    w_enc = torch.zeros(d_in, 3)
    w_enc[:, 1] = direction
    tensors = {"W_enc": w_enc, "b_enc": torch.tensor([-1.0, bias, -1.0]), "W_dec": torch.eye(3, d_in),
               "b_dec": torch.zeros(d_in)}
    cfg = parse_config({"architecture": "standard", "d_in": d_in, "d_sae": 3, "apply_b_dec_to_input": False}, "test")
    return build_sae(cfg, tensors, "test")


def test_planted_feature_finds_the_planted_tokens():
    d = 8
    direction = torch.zeros(d)
    direction[3] = 1.0
    rows, ti, pos = [], [], []
    planted = {2: (4, 5.0), 5: (2, 9.0), 7: (1, 3.0)}  # text -> (position, activation)
    for t in range(9):
        for p in range(1, 7):
            x = torch.zeros(d)
            x[0] = 1.0
            if planted.get(t, (None,))[0] == p:
                x[3] = planted[t][1]
            rows.append(x)
            ti.append(t)
            pos.append(p)
    acts = TokenActivations({0: torch.stack(rows)}, torch.tensor(ti), torch.tensor(pos), torch.zeros(len(ti), dtype=torch.long), 9)
    batches = [acts.select(range(0, 4)), acts.select(range(4, 9))]
    feats, tracker = track(_planted_sae(d, direction), batches, 0, features=[1, 0], top=5)
    assert feats == [1, 0]
    assert [(s, t, p) for s, t, p in tracker.entries(0)] == [(9.0, 5, 2), (5.0, 2, 4), (3.0, 7, 1)]
    assert tracker.entries(1) == []  # feature 0 never fires


def test_rendered_snippets_mark_the_token_on_the_tiny_model(tiny):
    def enc(t: str) -> list[int]:
        return encode_prompt(tiny.tokenizer, t)

    texts = ["one two three four five six", "the zebra eats grass", "nothing here at all"]
    batches = list(iter_activations(tiny.model, tiny.layers, enc, texts, [1], pad_id=258, batch_size=2))
    # a feature that fires on the 'z' byte only: its residual direction is the embedding difference
    x = torch.cat([b.acts[1] for b in batches])
    tok = torch.cat([b.token_id for b in batches])
    z = ord("z")
    direction = x[tok == z].mean(0) - x[tok != z].mean(0)
    unit = direction / direction.norm()
    # fires only where the projection beats every other token's
    sae = _planted_sae(64, unit, bias=-float((x[tok != z] @ unit).max()))
    feats, tracker = track(sae, batches, 1, features=[1], top=3)
    out = render(feats, tracker, texts, enc, lambda ids: tiny.tokenizer.decode(ids, skip_special_tokens=True),
                 window=4, text_ids=["a", "b", "c"], feature_max=torch.tensor([0.0, 7.5, 0.0]))
    ex = out[0].examples
    assert len(ex) == 1 and ex[0].text_id == "b" and ex[0].token == "z"
    assert ex[0].snippet == f"the {LEFT}z{RIGHT}ebra"
    assert ex[0].position == enc(texts[1]).index(z)
    assert out[0].max_activation == 7.5
    json.dumps([fe.to_json() for fe in out])  # JSON-able
