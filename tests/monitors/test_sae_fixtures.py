"""Builders and an independent reference implementation for the SAE tests (no tests here).

The reference is written from the formulas (SAELens semantics), not from monitors.sae, so the
tests compare two implementations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

D_IN = 16
D_SAE = 48
K = 5
LN_EPS = 1e-5

# Variants: (cfg architecture, extra cfg keys, tensor flavour)
VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "standard": ("standard", {}, "plain"),
    "jumprelu": ("jumprelu", {}, "threshold"),
    "gated": ("gated", {}, "gated"),
    "topk": ("topk", {"k": K}, "plain"),
    "topk_rescale": ("topk", {"k": K, "rescale_acts_by_decoder_norm": True}, "plain"),
    "batchtopk_threshold": ("batchtopk", {"k": K}, "threshold"),
    "batchtopk_scalar": ("batchtopk", {"k": K, "rescale_acts_by_decoder_norm": True}, "scalar"),
    "batchtopk_plain": ("batchtopk", {"k": float(K)}, "plain"),
}
MODES = ["none", "expected_average_only_in", "constant_norm_rescale", "layer_norm"]
SCALE_FACTOR = 0.37


def make_tensors(flavour: str, seed: int = 0, d_in: int = D_IN, d_sae: int = D_SAE) -> dict[str, torch.Tensor]:
    """Random SAELens tensors; decoder rows deliberately not unit norm."""
    g = torch.Generator().manual_seed(seed)
    t = {
        "W_enc": torch.randn(d_in, d_sae, generator=g) / math.sqrt(d_in),
        "W_dec": torch.randn(d_sae, d_in, generator=g) * torch.rand(d_sae, 1, generator=g).add(0.5),
        "b_dec": torch.randn(d_in, generator=g) * 0.3,
    }
    if flavour == "gated":
        t["b_gate"] = torch.randn(d_sae, generator=g) * 0.2
        t["b_mag"] = torch.randn(d_sae, generator=g) * 0.2
        t["r_mag"] = torch.randn(d_sae, generator=g) * 0.3
        return t
    t["b_enc"] = torch.randn(d_sae, generator=g) * 0.2
    if flavour == "threshold":
        t["threshold"] = torch.rand(d_sae, generator=g) * 0.5
    if flavour == "scalar":
        t["topk_threshold"] = torch.tensor(0.2, dtype=torch.float64)
    return t


def make_cfg(architecture: str, mode: str = "none", apply_b_dec: bool = True, **extra: Any) -> dict[str, Any]:
    """A current-layout SAELens cfg dict."""
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "apply_b_dec_to_input": apply_b_dec,
        "normalize_activations": mode,
        "metadata": {"model_name": "toy", "hook_name": "blocks.3.hook_resid_post"},
        **extra,
    }
    if mode == "expected_average_only_in":
        cfg["norm_scaling_factor"] = SCALE_FACTOR
    return cfg


def make_x(seed: int = 1, tokens: int = 7, d_in: int = D_IN) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, d_in, generator=g) * 2.0 + 0.5


# ---- reference --------------------------------------------------------------------------------

def ref_normalize(x: torch.Tensor, mode: str) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """(normalised x, function undoing it on a reconstruction), per SAELens."""
    if mode == "expected_average_only_in":
        return x * SCALE_FACTOR, lambda y: y / SCALE_FACTOR
    if mode == "constant_norm_rescale":
        coeff = math.sqrt(x.shape[-1]) / x.norm(dim=-1, keepdim=True)
        return x * coeff, lambda y: y / coeff
    if mode == "layer_norm":
        mu = x.mean(dim=-1, keepdim=True)
        std = (x - mu).std(dim=-1, keepdim=True)
        return (x - mu) / (std + LN_EPS), lambda y: y * std + mu
    return x, lambda y: y


def _topk_relu(h: torch.Tensor, k: int) -> torch.Tensor:
    values, indices = h.topk(k, dim=-1)
    return torch.zeros_like(h).scatter(-1, indices, values.relu())


def ref_encode(variant: str, t: dict[str, torch.Tensor], cfg: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    """Feature activations [T, d_sae] straight from the formulas."""
    xn, _ = ref_normalize(x, cfg["normalize_activations"])
    xt = xn - t["b_dec"] if cfg["apply_b_dec_to_input"] else xn
    rescale = cfg.get("rescale_acts_by_decoder_norm", False)
    dec_norm = t["W_dec"].norm(dim=-1)
    if variant == "gated":
        gate = (xt @ t["W_enc"] + t["b_gate"]) > 0
        return gate * torch.relu(xt @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"])
    h = xt @ t["W_enc"] + t["b_enc"]
    if rescale:
        h = h * dec_norm
    if variant == "standard":
        return torch.relu(h)
    if variant in ("jumprelu", "batchtopk_threshold"):
        return torch.relu(h) * (h > t["threshold"])
    if variant == "batchtopk_scalar":
        return torch.relu(h) * (h > float(t["topk_threshold"]))
    return _topk_relu(h, K)


def ref_decode(variant: str, t: dict[str, torch.Tensor], cfg: dict[str, Any], x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Reconstruction in input space of activations f computed for tokens x."""
    _, undo = ref_normalize(x, cfg["normalize_activations"])
    if cfg.get("rescale_acts_by_decoder_norm", False):
        f = f / t["W_dec"].norm(dim=-1)
    return undo(f @ t["W_dec"] + t["b_dec"])
