"""Batch surgery on a transformers DynamicCache: merge left-padded batches, drop rows, trim padding.

The HF engine keeps every running sequence left-padded to one common length, exactly as if the batch
had been padded together from the start. That invariant lets requests that were prefilled at different
times share one decode forward: merging pads the shorter cache on the left (masked out by the
attention mask), and sliding-window layers keep at most ``window - 1`` positions with a shared
``cumulative_length``, which is what their mask computation reads.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache


def _is_sliding(layer: object) -> bool:
    return bool(getattr(layer, "is_sliding", False))


def _pad_front(t: torch.Tensor, n: int) -> torch.Tensor:
    return F.pad(t, (0, 0, n, 0)) if n > 0 else t


def _stored(layer: object, length: int) -> int:
    window = getattr(layer, "sliding_window", None)
    return min(length, window - 1) if _is_sliding(layer) and window else length


def merge(a: DynamicCache, mask_a: torch.Tensor, b: DynamicCache, mask_b: torch.Tensor
          ) -> tuple[DynamicCache, torch.Tensor]:
    """Concatenate two left-padded caches along the batch; returns (cache, attention mask [B, L])."""
    la, lb = mask_a.shape[1], mask_b.shape[1]
    length = max(la, lb)
    layers_a: list[Any] = list(a.layers)  # DynamicLayer / DynamicSlidingWindowLayer
    layers_b: list[Any] = list(b.layers)
    for layer_a, layer_b in zip(layers_a, layers_b, strict=True):
        want = _stored(layer_a, length)
        ka = _pad_front(layer_a.keys, want - layer_a.keys.shape[-2])
        va = _pad_front(layer_a.values, want - layer_a.values.shape[-2])
        kb = _pad_front(layer_b.keys, want - layer_b.keys.shape[-2])
        vb = _pad_front(layer_b.values, want - layer_b.values.shape[-2])
        layer_a.keys, layer_a.values = torch.cat([ka, kb]), torch.cat([va, vb])
        if _is_sliding(layer_a):
            layer_a.cumulative_length = length
    mask = torch.cat([_pad_front_mask(mask_a, length - la), _pad_front_mask(mask_b, length - lb)])
    return a, mask


def _pad_front_mask(mask: torch.Tensor, n: int) -> torch.Tensor:
    return F.pad(mask, (n, 0)) if n > 0 else mask


def select(cache: DynamicCache, mask: torch.Tensor, keep: list[int]) -> tuple[DynamicCache, torch.Tensor]:
    """Keep only batch rows ``keep``, then drop leading columns that are padding in every kept row."""
    idx = torch.tensor(keep, dtype=torch.long, device=mask.device)
    layers: list[Any] = list(cache.layers)
    for layer in layers:
        layer.keys = layer.keys.index_select(0, idx.to(layer.keys.device))
        layer.values = layer.values.index_select(0, idx.to(layer.values.device))
    mask = mask.index_select(0, idx)
    return trim(cache, mask)


def trim(cache: DynamicCache, mask: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """Remove leading columns that no row attends to; keeps caches from growing after long rows leave."""
    real = mask.any(dim=0)
    n = int(real.float().argmax()) if bool(real.any()) else 0
    if n == 0:
        return cache, mask
    length = mask.shape[1]
    new_length = length - n
    layers: list[Any] = list(cache.layers)
    for layer in layers:
        drop = layer.keys.shape[-2] - _stored(layer, new_length)
        if drop > 0:
            layer.keys, layer.values = layer.keys[:, :, drop:], layer.values[:, :, drop:]
        if _is_sliding(layer):
            layer.cumulative_length = new_length
    return cache, mask[:, n:]
