"""TopK SAE (SAELens TopKSAE): keep the k largest pre-activations per token, ReLU them, zero the rest.

``h = x~ @ W_enc + b_enc``; SAELens takes ``topk(h, k)`` first and applies ReLU to the kept values,
so a row has at most k nonzeros (fewer when some of the top k are <= 0). A feature depends on every
other feature's pre-activation, so ``subset_exact`` is False: encode_features does the full encode.

``rescale_acts_by_decoder_norm`` (SAELens >= 6): pre-activations are multiplied by ||W_dec[i]|| and
decode divides by it again. It is folded into the weights at load time (W_enc[:, i], b_enc[i] times
the norm, W_dec[i] divided by it: SAELens' ``_fold_norm_topk``) and the parsed cfg then says False.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from pydantic import PositiveInt, model_validator

from monitors.sae.base import SAE
from monitors.sae.config import SAEConfigBase
from monitors.sae.registry import Architecture, register_architecture
from monitors.sae.weights import common_specs, fold_decoder_norm, take


class TopKConfig(SAEConfigBase):
    """cfg.json of a TopK SAE; 1 <= k <= d_sae."""

    architecture: Literal["topk"] = "topk"
    k: PositiveInt
    rescale_acts_by_decoder_norm: bool = False

    @model_validator(mode="after")
    def _check_k(self) -> TopKConfig:
        if self.k > self.d_sae:
            raise ValueError(f"k={self.k} is out of range; allowed 1..d_sae={self.d_sae}")
        return self


class TopKSAE(SAE):
    """TopK SAE; tensors W_enc, b_enc, W_dec, b_dec."""

    subset_exact = False
    feature_params = ("b_enc",)

    def __init__(self, cfg: SAEConfigBase, weights: Mapping[str, torch.Tensor], k: int) -> None:
        super().__init__(cfg, weights)
        self.k = k

    def _activate(self, h: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        h = h + self._param("b_enc", idx)
        values, indices = torch.topk(h, k=self.k, dim=-1, sorted=False)
        return torch.zeros_like(h).scatter_(-1, indices, torch.relu(values))


def topk_weights(cfg: SAEConfigBase, tensors: Mapping[str, torch.Tensor], source: str, rescale: bool) -> dict[str, torch.Tensor]:
    """Checked W_enc, b_enc, W_dec, b_dec, with the decoder norm folded in when ``rescale``."""
    weights = take(tensors, {**common_specs(cfg), "b_enc": (cfg.d_sae,)}, cfg, source)
    return fold_decoder_norm(weights, source) if rescale else weights


def build_topk(cfg: SAEConfigBase, tensors: Mapping[str, torch.Tensor], source: str) -> SAE:
    """Check the tensors of a TopK SAE and build it."""
    assert isinstance(cfg, TopKConfig)
    weights = topk_weights(cfg, tensors, source, cfg.rescale_acts_by_decoder_norm)
    return TopKSAE(cfg.model_copy(update={"rescale_acts_by_decoder_norm": False}), weights, cfg.k)


register_architecture(Architecture("topk", TopKConfig, build_topk))
