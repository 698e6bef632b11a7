"""BatchTopK SAE files, served the way SAELens serves them after training.

SAELens trains BatchTopK with a batch-wide top-k and learns a scalar ``topk_threshold``; for
inference it saves a JumpReLU SAE whose ``threshold`` is that scalar for every feature, after
folding the decoder norm when ``rescale_acts_by_decoder_norm`` (``BatchTopKTrainingSAE.
process_state_dict_for_saving_inference``). A file that still says ``batchtopk`` is handled as:

* has ``threshold`` [d_sae]: JumpReLU with that threshold;
* has ``topk_threshold`` (0-dim or [1], a training checkpoint): JumpReLU with it broadcast;
* neither: per-token TopK with k = round(k) (the batch constraint cannot be reproduced per token).

The returned SAE keeps ``architecture == "batchtopk"`` in its cfg; ``state_tensors`` then holds a
``threshold`` (JumpReLU) or none (TopK), so saving and reloading gives the same SAE.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from pydantic import PositiveFloat

from monitors.sae.base import SAE
from monitors.sae.config import SAEConfigBase
from monitors.sae.jumprelu import JumpReLUSAE
from monitors.sae.registry import Architecture, register_architecture
from monitors.sae.topk import TopKSAE, topk_weights
from monitors.sae.weights import WEIGHTS_FILE, checked_weight
from steering.errors import invalid


class BatchTopKConfig(SAEConfigBase):
    """cfg.json of a BatchTopK SAE; k is the average number of active features (may be fractional)."""

    architecture: Literal["batchtopk"] = "batchtopk"
    k: PositiveFloat
    rescale_acts_by_decoder_norm: bool = False


def _threshold(cfg: SAEConfigBase, tensors: Mapping[str, torch.Tensor], source: str) -> torch.Tensor | None:
    """The per-feature threshold [d_sae], or None when the file has neither form."""
    if "threshold" in tensors:
        return checked_weight(tensors["threshold"], (cfg.d_sae,), f"{WEIGHTS_FILE}:threshold", cfg, source)
    if "topk_threshold" not in tensors:
        return None
    scalar = tensors["topk_threshold"].reshape(-1)
    field = f"{WEIGHTS_FILE}:topk_threshold"
    if scalar.numel() != 1:
        raise invalid(field, f"must hold one value, got shape {list(tensors['topk_threshold'].shape)}; in {source}")
    return checked_weight(scalar, (1,), field, cfg, source).expand(cfg.d_sae).contiguous()


def build_batchtopk(cfg: SAEConfigBase, tensors: Mapping[str, torch.Tensor], source: str) -> SAE:
    """Serve a BatchTopK file as JumpReLU (threshold present) or per-token TopK."""
    assert isinstance(cfg, BatchTopKConfig)
    weights = topk_weights(cfg, tensors, source, cfg.rescale_acts_by_decoder_norm)
    threshold = _threshold(cfg, tensors, source)
    served = cfg.model_copy(update={"rescale_acts_by_decoder_norm": False})
    if threshold is not None:
        return JumpReLUSAE(served, {**weights, "threshold": threshold})
    k = max(1, round(cfg.k))
    if k > cfg.d_sae:
        raise invalid("cfg.json:k", f"k={cfg.k} is out of range; allowed up to d_sae={cfg.d_sae}; in {source}")
    return TopKSAE(served, weights, k)


register_architecture(Architecture("batchtopk", BatchTopKConfig, build_batchtopk))
