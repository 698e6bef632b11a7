"""Batched activation collection equals one-text forwards; spans, skipping and the resumable stream."""

from __future__ import annotations

import pytest
import torch

from monitors.capture import recording
from monitors.train.activations import (
    char_starts,
    collect_activations,
    iter_activations,
    prefix_starts,
    shuffled_epochs,
    token_stream,
)
from service.models import encode_prompt

TEXTS = ["Hello world", "a", "The quick brown fox jumps over the lazy dog", "xy z", "Paris is in France.", "ok"]
PAD = 258


pytestmark = pytest.mark.usefixtures("single_thread")


def _enc(tiny):
    return lambda t: encode_prompt(tiny.tokenizer, t)


def _single(tiny, text: str, layer: int) -> torch.Tensor:
    with torch.inference_mode(), recording(tiny.layers, [layer]) as store:
        tiny.model(input_ids=torch.tensor([_enc(tiny)(text)]), use_cache=False)
        return store[layer][0]


def test_batched_rows_match_one_text_forwards_and_drop_bos(tiny):
    acts = collect_activations(tiny.model, tiny.layers, _enc(tiny), TEXTS, [0, 1], pad_id=PAD, batch_size=4)
    assert acts.counts().tolist() == [len(_enc(tiny)(t)) - 1 for t in TEXTS]
    for i, text in enumerate(TEXTS):
        rows = acts.text_index == i
        assert acts.position[rows].tolist() == list(range(1, len(_enc(tiny)(text))))
        for layer in (0, 1):
            torch.testing.assert_close(acts.acts[layer][rows], _single(tiny, text, layer)[1:], atol=1e-4, rtol=0)


def test_span_starts_keep_only_the_tokens_after_the_prefix(tiny):
    enc = _enc(tiny)
    texts = ["Instruction: be honest. Paris is in France.", "Q? 42"]
    prefixes = ["Instruction: be honest. ", "Q? "]
    starts = prefix_starts(enc, texts, prefixes)
    assert starts == [len(enc(p)) for p in prefixes]  # byte tokens: the boundary is clean
    assert char_starts(enc, texts, [len(p) for p in prefixes]) == starts
    acts = collect_activations(tiny.model, tiny.layers, enc, texts, [1], pad_id=PAD, starts=starts)
    for i, (text, prefix) in enumerate(zip(texts, prefixes, strict=True)):
        ids = acts.token_id[acts.text_index == i].tolist()
        assert tiny.tokenizer.decode(ids) == text[len(prefix):]


def test_prefix_rule_counts_a_merged_boundary_token_in_the_span():
    vocab = {"ab": 1, "a": 2, "b": 3, "c": 4, " ": 5}

    def greedy(text: str) -> list[int]:  # longest match first, like a BPE merge of "a"+"b"
        out, i = [0], 0
        while i < len(text):
            piece = text[i:i + 2] if text[i:i + 2] in vocab else text[i]
            out.append(vocab[piece])
            i += len(piece)
        return out

    # prefix "ca" tokenizes [c, a] but in "cab" the a merges with b: the span starts at "ab"
    assert prefix_starts(greedy, ["cab", "c b"], ["ca", "c "]) == [2, 3]


def test_skip_tokens_continues_the_stream_where_it_stopped(tiny):
    enc = _enc(tiny)
    full = torch.cat([b.acts[1] for b in iter_activations(tiny.model, tiny.layers, enc, TEXTS, [1], pad_id=PAD,
                                                          batch_size=2)])
    for skip in (0, 5, 13, full.shape[0] - 1, full.shape[0]):
        rest = [b.acts[1] for b in iter_activations(tiny.model, tiny.layers, enc, TEXTS, [1], pad_id=PAD,
                                                    batch_size=2, skip_tokens=skip)]
        got = torch.cat(rest) if rest else torch.zeros(0, full.shape[1])
        assert torch.equal(got, full[skip:])  # the batch holding the resume point is run whole


def test_token_stream_reopens_after_n_rows_across_epochs(tiny):
    stream = token_stream(tiny.model, tiny.layers, _enc(tiny), TEXTS, 0, pad_id=PAD, batch_size=3, epochs=2, seed=1)
    full = torch.cat(list(stream(0)))
    per_epoch = sum(len(_enc(tiny)(t)) - 1 for t in TEXTS)
    assert full.shape[0] == 2 * per_epoch
    assert not torch.equal(full[:per_epoch], full[per_epoch:])  # a new order each epoch
    for skip in (7, per_epoch, per_epoch + 3):
        assert torch.equal(torch.cat(list(stream(skip))), full[skip:])


def test_shuffled_epochs_mix_tokens_and_reopen_exactly():
    rows = torch.arange(50.0)[:, None].expand(50, 3)
    stream = shuffled_epochs(rows, seed=2, chunk=8, epochs=3)
    full = torch.cat(list(stream(0)))
    assert full.shape[0] == 150
    for e in range(3):  # every epoch is a permutation of all rows, each a different one
        assert sorted(full[50 * e:50 * (e + 1), 0].tolist()) == list(range(50))
    assert not torch.equal(full[:50], full[50:100])
    for skip in (0, 13, 50, 77, 149):
        assert torch.equal(torch.cat(list(stream(skip))), full[skip:])
