"""JumpReLU SAE: ``h = x~ @ W_enc + b_enc; f = ReLU(h) * 1[h > threshold]`` (SAELens JumpReLUSAE)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

from monitors.sae.base import SAE
from monitors.sae.config import SAEConfigBase
from monitors.sae.registry import Architecture, register_architecture
from monitors.sae.weights import common_specs, take


class JumpReLUConfig(SAEConfigBase):
    """cfg.json of a JumpReLU SAE."""

    architecture: Literal["jumprelu"] = "jumprelu"


class JumpReLUSAE(SAE):
    """JumpReLU SAE; tensors W_enc, b_enc, threshold, W_dec, b_dec."""

    feature_params = ("b_enc", "threshold")

    def _activate(self, h: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        h = h + self._param("b_enc", idx)
        return torch.relu(h) * (h > self._param("threshold", idx))


def jumprelu_specs(cfg: SAEConfigBase) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a JumpReLU SAE."""
    return {**common_specs(cfg), "b_enc": (cfg.d_sae,), "threshold": (cfg.d_sae,)}


def build_jumprelu(cfg: SAEConfigBase, tensors: Mapping[str, torch.Tensor], source: str) -> SAE:
    """Check the tensors of a JumpReLU SAE and build it."""
    return JumpReLUSAE(cfg, take(tensors, jumprelu_specs(cfg), cfg, source))


register_architecture(Architecture("jumprelu", JumpReLUConfig, build_jumprelu))
