"""Gated SAE (SAELens GatedSAE). With h = x~ @ W_enc (no b_enc in this architecture):

``f = 1[h + b_gate > 0] * ReLU(h * exp(r_mag) + b_mag)``, which equals SAELens'
``ReLU(x~ @ (W_enc * exp(r_mag)) + b_mag)`` for the magnitude path since exp(r_mag) scales columns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

from monitors.sae.base import SAE
from monitors.sae.config import SAEConfigBase
from monitors.sae.registry import Architecture, register_architecture
from monitors.sae.weights import WEIGHTS_FILE, common_specs, take
from steering.errors import invalid


class GatedConfig(SAEConfigBase):
    """cfg.json of a gated SAE."""

    architecture: Literal["gated"] = "gated"


class GatedSAE(SAE):
    """Gated SAE; tensors W_enc, b_gate, b_mag, r_mag, W_dec, b_dec."""

    feature_params = ("b_gate", "b_mag", "r_mag")

    def __init__(self, cfg: SAEConfigBase, weights: Mapping[str, torch.Tensor]) -> None:
        super().__init__(cfg, weights)
        self._mag_scale = self._params["r_mag"].exp()  # [d_sae]

    def _activate(self, h: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        gate = (h + self._param("b_gate", idx)) > 0
        mag_scale = self._mag_scale if idx is None else self._mag_scale.index_select(0, idx)
        return torch.relu(h * mag_scale + self._param("b_mag", idx)) * gate


def build_gated(cfg: SAEConfigBase, tensors: Mapping[str, torch.Tensor], source: str) -> SAE:
    """Check the tensors of a gated SAE and build it."""
    per_feature = {name: (cfg.d_sae,) for name in GatedSAE.feature_params}
    weights = take(tensors, {**common_specs(cfg), **per_feature}, cfg, source)
    if not bool(torch.isfinite(weights["r_mag"].exp()).all()):
        raise invalid(f"{WEIGHTS_FILE}:r_mag", f"exp(r_mag) overflows float32; values must be below 88.7; in {source}")
    return GatedSAE(cfg, weights)


register_architecture(Architecture("gated", GatedConfig, build_gated))
