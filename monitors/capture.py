"""Record the residual stream after chosen decoder layers during a plain forward pass.

Used by offline tools (vector extraction, inspect, logit lens), not by the serving path, which reads
through the batched core instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


@contextmanager
def recording(layers: nn.ModuleList, which: list[int] | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, ``store[L]`` holds layer L's output [batch, seq, d_model] (float32, detached)
    of the latest forward. Hooks are removed on exit, even on error."""
    store: dict[int, torch.Tensor] = {}
    handles = []
    for idx in which if which is not None else range(len(layers)):
        handles.append(layers[idx].register_forward_hook(_recorder(store, idx)))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _recorder(store: dict[int, torch.Tensor], idx: int):  # noqa: ANN202 - torch hook signature
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        store[idx] = hidden.detach().float()

    return hook
