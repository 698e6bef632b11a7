"""The logit lens at the last layer reproduces the model's own next-token distribution."""

from __future__ import annotations

import torch

from monitors.capture import recording
from monitors.lens import logit_lens


def test_last_layer_lens_equals_model_logits(tiny):
    ids = torch.tensor([[1, 72, 101, 108, 108, 111]])
    with torch.inference_mode(), recording(tiny.layers) as store:
        logits = tiny.model(input_ids=ids).logits[0, -1]
    resid = torch.stack([store[layer][0, -1] for layer in range(tiny.n_layers)])
    lens = logit_lens(resid, tiny.final_norm, tiny.lm_head, top=5)
    probs = torch.softmax(logits.float(), -1)
    top = probs.topk(5)
    assert [c.token_id for c in lens[-1]] == top.indices.tolist()
    torch.testing.assert_close(torch.tensor([c.prob for c in lens[-1]]), top.values, atol=1e-5, rtol=1e-5)
