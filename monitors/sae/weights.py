"""Checked extraction of SAELens tensors (``sae_weights.safetensors``) and weight folds.

Every error names ``sae_weights.safetensors:<tensor>``, the expected shape and what was found.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from monitors.sae.config import SAEConfigBase
from steering.errors import InvalidArgument, invalid
from steering.tensors import checked

WEIGHTS_FILE = "sae_weights.safetensors"

Shape = tuple[int, ...]


def common_specs(cfg: SAEConfigBase) -> dict[str, Shape]:
    """Tensors every architecture has: W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_dec [d_in]."""
    return {"W_enc": (cfg.d_in, cfg.d_sae), "W_dec": (cfg.d_sae, cfg.d_in), "b_dec": (cfg.d_in,)}


def take(
    tensors: Mapping[str, torch.Tensor], specs: Mapping[str, Shape], cfg: SAEConfigBase, source: str
) -> dict[str, torch.Tensor]:
    """Return ``specs``' tensors as float32 after checking presence, shape, dtype and finiteness."""
    out: dict[str, torch.Tensor] = {}
    for name, shape in specs.items():
        field = f"{WEIGHTS_FILE}:{name}"
        if name not in tensors:
            needed = ", ".join(specs)
            raise invalid(field, f"missing in {source}; the {cfg.architecture!r} architecture needs {needed}")
        out[name] = checked_weight(tensors[name], shape, field, cfg, source)
    return out


def checked_weight(
    t: torch.Tensor, shape: Shape, field: str, cfg: SAEConfigBase, source: str
) -> torch.Tensor:
    """One tensor as contiguous float32; shape errors quote cfg.json's d_in/d_sae."""
    if tuple(t.shape) != tuple(shape):
        raise invalid(
            field,
            f"expected shape {list(shape)} (cfg.json d_in={cfg.d_in}, d_sae={cfg.d_sae}) "
            f"but got {list(t.shape)}; in {source}",
        )
    try:
        return checked(t, shape, field)
    except InvalidArgument as exc:
        raise invalid(field, f"{str(exc).removeprefix(field + ': ')}; in {source}") from None


def fold_finetuning_scale(
    cfg: SAEConfigBase, tensors: Mapping[str, torch.Tensor], source: str
) -> tuple[SAEConfigBase, dict[str, torch.Tensor]]:
    """Fold a pre-6.0 ``scaling_factor`` [d_sae] (features scaled before decode) into W_dec rows.

    All-ones factors are dropped, as SAELens does; other factors need ``finetuning_scaling_factor``.
    """
    out = dict(tensors)
    factor = out.pop("scaling_factor", None)
    if factor is None:
        return cfg, out
    factor = checked_weight(factor, (cfg.d_sae,), f"{WEIGHTS_FILE}:scaling_factor", cfg, source)
    if bool(torch.allclose(factor, torch.ones_like(factor))):
        return cfg.model_copy(update={"finetuning_scaling_factor": False}), out
    if not cfg.finetuning_scaling_factor:
        raise invalid(
            f"{WEIGHTS_FILE}:scaling_factor",
            f"is not all ones but cfg.json finetuning_scaling_factor is false; set it true or drop the tensor; in {source}",
        )
    w_dec = checked_weight(out["W_dec"], (cfg.d_sae, cfg.d_in), f"{WEIGHTS_FILE}:W_dec", cfg, source) if "W_dec" in out else None
    if w_dec is not None:
        out["W_dec"] = w_dec * factor[:, None]
    return cfg.model_copy(update={"finetuning_scaling_factor": False}), out


def fold_decoder_norm(weights: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """SAELens ``rescale_acts_by_decoder_norm``: pre-activations times ||W_dec[i]||, decode divides it
    back. Equivalent weights: W_enc[:, i] and b_enc[i] times the norm, W_dec[i] divided by it."""
    norms = weights["W_dec"].norm(dim=-1)
    zero = (norms == 0).nonzero()
    if zero.numel():
        raise invalid(
            f"{WEIGHTS_FILE}:W_dec",
            f"row {int(zero[0])} has zero norm; rescale_acts_by_decoder_norm needs every row nonzero; in {source}",
        )
    out = dict(weights)
    out["W_enc"] = weights["W_enc"] * norms[None, :]
    out["b_enc"] = weights["b_enc"] * norms
    out["W_dec"] = weights["W_dec"] / norms[:, None]
    return out
