"""Difference-of-means vectors from contrastive texts (the CAA recipe, Rimsky et al. 2023).

v[L] = mean over positive texts of the residual stream at the chosen position, minus the same over
negative texts. Position "last" takes the final token (the answer letter in A/B prompts); "mean"
averages over the tokens of each text except the first: the first position (BOS) is an attention
sink whose residual norm is orders of magnitude larger (~55,000 on Gemma 3 270M against a few hundred
elsewhere), so with texts of different lengths it would dominate the difference of means.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from monitors.capture import recording
from steering.errors import invalid
from steering.vectors import SteeringVector, make_vector

Encode = Callable[[str], list[int]]


def activations(model: nn.Module, layers: nn.ModuleList, encode: Encode, texts: Sequence[str],
                which: list[int], position: str = "last") -> dict[int, torch.Tensor]:
    """Residual vectors [n_texts, d_model] per layer, one forward per text (no padding effects)."""
    if position not in ("last", "mean"):
        raise invalid("position", f"{position!r} not allowed; use last or mean")
    if not texts:
        raise invalid("texts", "is empty; give at least one text")
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in which}
    device = next(model.parameters()).device
    with torch.inference_mode(), recording(layers, which) as store:
        for text in texts:
            ids = torch.tensor([encode(text)], device=device)
            model(input_ids=ids, use_cache=False)
            for layer in which:
                h = store[layer][0]
                out[layer].append(h[-1] if position == "last" else h[1:].mean(0) if h.shape[0] > 1 else h[0])
    return {layer: torch.stack(v).cpu() for layer, v in out.items()}


def mean_difference(model: nn.Module, layers: nn.ModuleList, encode: Encode, positive: Sequence[str],
                    negative: Sequence[str], which: list[int], *, position: str = "last",
                    model_name: str = "", source: str = "") -> SteeringVector:
    """A per-layer CAA vector: mean(positive) - mean(negative)."""
    pos = activations(model, layers, encode, positive, which, position)
    neg = activations(model, layers, encode, negative, which, position)
    per_layer = {layer: pos[layer].mean(0) - neg[layer].mean(0) for layer in which}
    return make_vector(per_layer, model=model_name, method="caa", source=source)
