"""Standard (ReLU) SAE: ``f = ReLU(x~ @ W_enc + b_enc)``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

from monitors.sae.base import SAE
from monitors.sae.config import SAEConfigBase
from monitors.sae.registry import Architecture, register_architecture
from monitors.sae.weights import common_specs, take


class StandardConfig(SAEConfigBase):
    """cfg.json of a standard SAE."""

    architecture: Literal["standard"] = "standard"


class StandardSAE(SAE):
    """ReLU SAE; tensors W_enc, b_enc, W_dec, b_dec."""

    feature_params = ("b_enc",)

    def _activate(self, h: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        return torch.relu(h + self._param("b_enc", idx))


def build_standard(cfg: SAEConfigBase, tensors: Mapping[str, torch.Tensor], source: str) -> SAE:
    """Check the tensors of a standard SAE and build it."""
    specs = {**common_specs(cfg), "b_enc": (cfg.d_sae,)}
    return StandardSAE(cfg, take(tensors, specs, cfg, source))


register_architecture(Architecture("standard", StandardConfig, build_standard))
