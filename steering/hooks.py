"""Forward hooks that run the batched core inside a transformers model's decoder layers.

The engine owns the step: before each forward it sets the batch plan and the per-token rows; the
hooks apply each layer's table and collect the readings; after the forward the engine takes them.
Layers the plan does not touch return immediately, so idle hooks cost one dict lookup per layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from steering.batch import BatchPlan, apply_layer


class LayerHooks:
    """Hooks on every decoder layer; inert until ``plan`` and ``rows`` are set."""

    def __init__(self, layers: nn.ModuleList) -> None:
        self.layers = layers
        self.plan: BatchPlan | None = None
        self.rows: torch.Tensor | None = None  # [T] long, flattened in the layer output's token order
        self.gates: Any = None  # the plan's GateStep for this forward, when it has gates
        self.reads: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self._handles: list[Any] = []

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def install(self) -> None:
        if self._handles:
            return
        for idx, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._make_hook(idx)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def set_step(self, plan: BatchPlan | None, rows: torch.Tensor | None, grid: tuple[int, int] | None = None,
                 prompt_ends: bool = False) -> None:
        """Arm the hooks for the next forward pass (None disarms them). ``grid`` = (slots, tokens per
        slot) says how the T tokens are laid out, slot-major; gates need it (default: one per slot).
        ``prompt_ends``: the last column is each prompted slot's final prompt token."""
        self.plan, self.rows = plan, rows
        self.gates = None
        if plan is not None and rows is not None:
            grid = grid or (len(plan.requests), rows.numel() // max(len(plan.requests), 1))
            self.gates = plan.step(grid, prompt_ends)
        self.reads = {}

    def _make_hook(self, idx: int):  # noqa: ANN202 - torch hook signature
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            plan = self.plan
            if plan is None or idx not in plan.tables or self.rows is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            flat = hidden.reshape(-1, hidden.shape[-1])
            edited, pre, post = apply_layer(plan.tables[idx], flat, self.rows, self.gates)
            if pre is not None or post is not None:
                self.reads[idx] = (pre, post)
            if edited is None:
                return None
            edited = edited.view_as(hidden)
            return (edited, *output[1:]) if isinstance(output, tuple) else edited

        return hook


@contextmanager
def hooked(layers: nn.ModuleList) -> Iterator[LayerHooks]:
    """Install hooks for the duration of a block; always removed, even on error."""
    hooks = LayerHooks(layers)
    hooks.install()
    try:
        yield hooks
    finally:
        hooks.remove()
