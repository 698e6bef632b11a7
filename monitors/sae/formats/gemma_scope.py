"""Gemma Scope 2 SAEs (Gemma 3): ``params.safetensors`` (+ ``config.json``, optional), converted to a
SAELens JumpReLU SAE. The hook comes from ``config.json`` or, failing that, from the
``resid_post*/layer_N_*`` directory names of the release.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from monitors.sae.formats.common import (
    GEMMA_SCOPE_2,
    Converted,
    dtype_name,
    read_json,
    read_safetensors,
    saelens_cfg,
    sizes_from,
    take,
)
from steering.errors import invalid

GEMMA_CFG = "config.json"
GEMMA_WEIGHTS = "params.safetensors"

_HF_RESID = re.compile(r"^model\.layers\.(\d+)\.output$")


def convert_gemma_scope_2(root: Path) -> Converted:
    """Gemma Scope 2 (Gemma 3): JumpReLU ``pre = x @ w_enc + b_enc``, ``f = ReLU(pre) * 1[pre > threshold]``,
    ``x^ = f @ w_dec + b_dec``; no b_dec subtraction, no input normalisation (as SAELens' gemma_3 loader).

    ``config.json`` (optional) may carry ``model_name``, ``hf_hook_point_in`` (``model.layers.N.output``
    is the residual stream after layer N), ``width``, ``architecture`` (``jump_relu``); a different
    ``hf_hook_point_out`` (transcoder, CLT) or ``affine_connection`` is refused. Sizes come from w_enc.
    """
    where = repr(str(root))
    raw: dict[str, Any] = {}
    if (root / GEMMA_CFG).is_file():
        raw = read_json(root / GEMMA_CFG, where, GEMMA_SCOPE_2)
    f = GEMMA_CFG
    arch = raw.get("architecture", "jump_relu")
    if arch not in ("jump_relu", "jumprelu"):
        raise invalid(f"{f}:architecture", f"{arch!r} is not supported; allowed: jump_relu; in {where}")
    hook_in = raw.get("hf_hook_point_in")
    hook_out = raw.get("hf_hook_point_out")
    if hook_out is not None and hook_out != hook_in:
        raise invalid(f"{f}:hf_hook_point_out", f"{hook_out!r} differs from hf_hook_point_in {hook_in!r}: a transcoder, "
                                                f"not an autoencoder; only autoencoders are supported; in {where}")
    if raw.get("affine_connection"):
        raise invalid(f"{f}:affine_connection", f"is true: affine skip connections are not supported; in {where}")

    file = GEMMA_WEIGHTS
    tensors = read_safetensors(root / file, where)
    needed = ("w_enc", "b_enc", "threshold", "w_dec", "b_dec")
    d_in, d_sae = sizes_from(tensors, "w_enc", "[d_in, d_sae]", file, where, GEMMA_SCOPE_2, needed)
    width = raw.get("width")
    if width is not None and width != d_sae:
        raise invalid(f"{f}:width", f"is {width!r} but {file}:w_enc has shape {[d_in, d_sae]} (d_sae={d_sae}); in {where}")
    dims = f"from {file}:w_enc, d_in={d_in}, d_sae={d_sae}"
    specs = {"w_enc": (d_in, d_sae), "b_enc": (d_sae,), "threshold": (d_sae,), "w_dec": (d_sae, d_in), "b_dec": (d_in,)}
    got = take(tensors, specs, file, where, dims, GEMMA_SCOPE_2)

    meta: dict[str, Any] = {"source_format": GEMMA_SCOPE_2}
    if isinstance(hook_in, str) and hook_in:
        match = _HF_RESID.match(hook_in)
        meta["hook_name"] = f"blocks.{int(match.group(1))}.hook_resid_post" if match else hook_in
        meta["hf_hook_name"] = hook_in
    else:
        layer = re.search(r"(?:^|_)layer_(\d+)(?:_|$)", root.resolve().name)
        if layer and root.resolve().parent.name.startswith("resid_post"):
            meta["hook_name"] = f"blocks.{int(layer.group(1))}.hook_resid_post"
    model = raw.get("model_name")
    if isinstance(model, str) and model:
        meta["model_name"] = model
    cfg = saelens_cfg("jumprelu", d_in, d_sae, dtype_name(tensors), apply_b_dec=False, meta=meta)
    out = {"W_enc": got["w_enc"], "b_enc": got["b_enc"], "threshold": got["threshold"],
           "W_dec": got["w_dec"], "b_dec": got["b_dec"]}
    return Converted(cfg, out, where, root)
