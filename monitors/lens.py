"""Logit lens and per-token top SAE features: the two views users need when debugging a monitor.

The logit lens decodes a layer's residual stream through the model's final norm and unembedding, so
the last layer reproduces the model's own logits and earlier layers show what the stream already
"predicts" there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Candidate:
    token_id: int
    prob: float


def logit_lens(resid: torch.Tensor, final_norm: nn.Module, lm_head: nn.Module, top: int) -> list[list[Candidate]]:
    """resid [n_layers, d_model] (one position, every layer) -> top candidates per layer."""
    with torch.inference_mode():
        w = next(lm_head.parameters(), None)
        x = resid.to(w.dtype if w is not None and w.is_floating_point() else resid.dtype)
        logits = lm_head(final_norm(x)).float()
    probs = torch.softmax(logits, dim=-1)
    values, idx = probs.topk(top, dim=-1)
    return [[Candidate(int(i), float(v)) for v, i in zip(vs, ids, strict=True)] for vs, ids in zip(values, idx, strict=True)]


def top_features(sae: Any, resid: torch.Tensor, top: int) -> list[list[tuple[int, float]]]:
    """resid [T, d_model] -> for each token, the ``top`` most active SAE features (index, activation)."""
    f = sae.encode(resid.float())
    values, idx = f.topk(min(top, f.shape[-1]), dim=-1)
    return [[(int(i), float(v)) for v, i in zip(vs, ids, strict=True) if v > 0] for vs, ids in zip(values, idx, strict=True)]
