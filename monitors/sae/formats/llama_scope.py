"""Llama Scope SAEs (OpenMOSS lm_saes): ``hyperparams.json`` + ``checkpoints/final.safetensors``
(or ``sae_weights.safetensors`` / ``checkpoints/pruned.safetensors``, lm_saes' own search order),
converted to a SAELens standard, TopK or JumpReLU SAE.

The conversion folds lm_saes' dataset-wise input/output norms and decoder-norm sparsity into the
weights, so that the SAELens forward pass reproduces lm_saes' reconstructions (details in
:func:`convert_llama_scope`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from monitors.sae.formats.common import (
    LLAMA_SCOPE,
    Converted,
    dtype_name,
    flag,
    number,
    pos_int,
    read_json,
    read_safetensors,
    saelens_cfg,
    take,
)
from steering.errors import invalid

LLAMA_SCOPE_CFG = "hyperparams.json"
#: lm_saes ``SparseAutoEncoder.from_config`` search order (the .pt variants are not read here)
LLAMA_SCOPE_WEIGHTS = ("sae_weights.safetensors", "checkpoints/pruned.safetensors", "checkpoints/final.safetensors")

_LLAMA_SCOPE_DIR = re.compile(r"^Llama3_1-8B-Base-L\d+(?:R|A|M|TC)-\d+x$")


def convert_llama_scope(root: Path) -> Converted:
    """Llama Scope / OpenMOSS lm_saes ``SparseAutoEncoder.from_config`` (the release's inference path):

    1. ``dataset-wise`` norm: ``s_in = sqrt(d_model) / norm["in"]``, ``s_out = sqrt(d_model) / norm["out"]``;
       encoder.bias /= s_in, decoder.bias /= s_out, decoder.weight *= s_in / s_out (input now raw);
    2. ``sparsity_include_decoder_norm``: n_i = norm of column i of that decoder.weight; decoder
       columns /= n, encoder rows and encoder.bias *= n;
    3. act_fn ``topk`` with ``jump_relu_threshold > 0`` becomes JumpReLU ``h.where(h > theta, 0)``.

    Served with ``expected_average_only_in`` (factor ``s_in``: the input is scaled to average norm
    sqrt(d_model), reconstructions divided back), so W_enc = (n * encoder.weight).T,
    b_enc = n * encoder.bias, threshold = s_in * theta, W_dec = (decoder.weight * (s_in/s_out) / n).T,
    b_dec = decoder.bias * s_in/s_out. Reconstructions equal lm_saes'; feature activations are lm_saes'
    times s_in (the training-space scale, as SAELens serves Llama Scope). Missing keys take lm_saes'
    SAEConfig defaults, except d_model, which is required.
    """
    where = repr(str(root))
    f = LLAMA_SCOPE_CFG
    raw = read_json(root / f, where, LLAMA_SCOPE)
    d_model = pos_int(raw, "d_model", f, where)
    if raw.get("d_sae") is not None:
        d_sae = pos_int(raw, "d_sae", f, where)
    else:
        d_sae = d_model * pos_int(raw, "expansion_factor", f, where, default=128)
    hook_in = raw.get("hook_point_in", "blocks.0.hook_resid_pre")
    hook_out = raw.get("hook_point_out") or hook_in
    if hook_out != hook_in:
        raise invalid(f"{f}:hook_point_out", f"{hook_out!r} differs from hook_point_in {hook_in!r}: a transcoder, "
                                             f"not an autoencoder; only autoencoders are supported; in {where}")
    if raw.get("use_glu_encoder"):
        raise invalid(f"{f}:use_glu_encoder", f"is true: GLU encoders are not supported; in {where}")
    s_in, s_out = _llama_scope_norm(raw, d_model, hook_in, f, where)
    theta = number(raw, "jump_relu_threshold", 0.0, f, where)
    architecture, k = _llama_scope_activation(raw, theta, d_sae, f, where)
    use_b_dec = flag(raw, "use_decoder_bias", True, f, where)
    apply_b_dec = flag(raw, "apply_decoder_bias_to_pre_encoder", True, f, where) and use_b_dec
    include_norm = flag(raw, "sparsity_include_decoder_norm", True, f, where)

    weights_rel = next((rel for rel in LLAMA_SCOPE_WEIGHTS if (root / rel).is_file()), LLAMA_SCOPE_WEIGHTS[-1])
    tensors = read_safetensors(root / weights_rel, where)
    dims = f"{f} d_model={d_model}, d_sae={d_sae}"
    specs = {"encoder.weight": (d_sae, d_model), "encoder.bias": (d_sae,), "decoder.weight": (d_model, d_sae)}
    if use_b_dec:
        specs["decoder.bias"] = (d_model,)
    got = take(tensors, specs, weights_rel, where, dims, LLAMA_SCOPE)

    ratio = s_in / s_out
    w_dec = got["decoder.weight"] * ratio if ratio != 1.0 else got["decoder.weight"]
    n = w_dec.norm(dim=0) if include_norm else None
    if n is not None:
        zero = (n == 0).nonzero()
        if zero.numel():
            raise invalid(f"{weights_rel}:decoder.weight", f"column {int(zero[0])} has zero norm; with "
                                                          f"sparsity_include_decoder_norm every column must be nonzero; in {where}")
    b_dec = got["decoder.bias"] * ratio if use_b_dec else torch.zeros(d_model)
    out = {
        "W_enc": (got["encoder.weight"] * n[:, None] if n is not None else got["encoder.weight"]).t(),
        "b_enc": got["encoder.bias"] * n if n is not None else got["encoder.bias"],
        "W_dec": (w_dec / n if n is not None else w_dec).t().contiguous(),
        "b_dec": b_dec,
    }
    if architecture == "jumprelu":
        out["threshold"] = torch.full((d_sae,), s_in * theta)
    meta: dict[str, Any] = {"hook_name": hook_in, "source_format": LLAMA_SCOPE}
    model = raw.get("model_name")
    if isinstance(model, str) and model:
        meta["model_name"] = model
    elif _LLAMA_SCOPE_DIR.match(root.resolve().name):
        meta["model_name"] = "meta-llama/Llama-3.1-8B"  # the release is for this model only (SAELens does the same)
    extra: dict[str, Any] = {"k": k} if k is not None else {}
    if s_in != 1.0:
        extra.update(normalize_activations="expected_average_only_in", norm_scaling_factor=s_in)
    cfg = saelens_cfg(architecture, d_model, d_sae, dtype_name(tensors), apply_b_dec=apply_b_dec, meta=meta, **extra)
    return Converted(cfg, out, where, root)


def _llama_scope_norm(raw: Mapping[str, Any], d_model: int, hook: str, f: str, where: str) -> tuple[float, float]:
    """(s_in, s_out). The norms are keyed ``in``/``out`` (the release) or by hook name (later lm_saes)."""
    mode = raw.get("norm_activation", "token-wise")
    if mode in ("inference", "none"):
        return 1.0, 1.0
    if mode != "dataset-wise":
        raise invalid(f"{f}:norm_activation", f"{mode!r} is not supported; allowed: dataset-wise, inference, none; in {where}")
    norms = raw.get("dataset_average_activation_norm")
    if not isinstance(norms, dict):
        raise invalid(f"{f}:dataset_average_activation_norm",
                      f"must be an object with 'in' and 'out' average norms when norm_activation is 'dataset-wise'; in {where}")
    factors = []
    for key in ("in", "out"):
        value = norms.get(key, norms.get(hook))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise invalid(f"{f}:dataset_average_activation_norm.{key}", f"must be a finite number > 0, got {value!r}; in {where}")
        factors.append(math.sqrt(d_model) / float(value))
    return factors[0], factors[1]


def _llama_scope_activation(raw: Mapping[str, Any], theta: float, d_sae: int, f: str, where: str) -> tuple[str, int | None]:
    act = raw.get("act_fn", "relu")
    if not isinstance(act, str) or act.lower() not in ("relu", "jumprelu", "topk"):
        raise invalid(f"{f}:act_fn", f"{act!r} is not supported; allowed: jumprelu, topk, relu; in {where}")
    act = act.lower()
    if act == "jumprelu" or (act == "topk" and theta > 0):
        if theta < 0:
            raise invalid(f"{f}:jump_relu_threshold", f"must be >= 0, got {theta}; in {where}")
        return "jumprelu", None
    if act == "topk":
        k = pos_int(raw, "top_k", f, where, default=50)
        if k > d_sae:
            raise invalid(f"{f}:top_k", f"top_k={k} is out of range; allowed 1..d_sae={d_sae}; in {where}")
        return "topk", k
    return "standard", None
