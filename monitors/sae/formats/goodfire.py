"""Goodfire SAEs: one ``*.pt`` / ``*.pth`` torch state dict (given as the file or its directory),
converted to a SAELens standard (ReLU) SAE. A file named like the release gives model and layer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from monitors.sae.formats.common import GOODFIRE, Converted, dtype_name, saelens_cfg, sizes_from, take
from steering.errors import invalid

TORCH_SUFFIXES = (".pt", ".pth")

_GOODFIRE_NAME = re.compile(r"^(?P<model>.+)-SAE-l(?P<layer>\d+)$")


def convert_goodfire(file: Path) -> Converted:
    """Goodfire: a torch state dict with encoder_linear.{weight [d_sae, d_in], bias} and
    decoder_linear.{weight [d_in, d_sae], bias}; ``f = ReLU(x @ W_e.T + b_e)``, ``x^ = f @ W_d.T + b_d``;
    no b_dec subtraction. Read with ``torch.load(weights_only=True)``. A file named like the release
    (``Llama-3.1-8B-Instruct-SAE-l19.pth``) gives the model and the layer (residual stream after it).
    """
    where = repr(str(file))
    name = file.name
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights_only refusals all raise their own types
        raise invalid(name, f"is not a readable torch state dict ({type(exc).__name__}: {exc}); in {where}") from None
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise invalid(name, f"must hold a dict of name -> tensor (a state dict), got {type(state).__name__}; in {where}")
    tensors = dict(state)
    needed = ("encoder_linear.weight", "encoder_linear.bias", "decoder_linear.weight", "decoder_linear.bias")
    d_sae, d_in = sizes_from(tensors, "encoder_linear.weight", "[d_sae, d_in]", name, where, GOODFIRE, needed)
    dims = f"from {name}:encoder_linear.weight, d_sae={d_sae}, d_in={d_in}"
    specs = {"encoder_linear.weight": (d_sae, d_in), "encoder_linear.bias": (d_sae,),
             "decoder_linear.weight": (d_in, d_sae), "decoder_linear.bias": (d_in,)}
    got = take(tensors, specs, name, where, dims, GOODFIRE)

    meta: dict[str, Any] = {"source_format": GOODFIRE}
    match = _GOODFIRE_NAME.match(file.stem)
    if match:
        model = match.group("model")
        meta["model_name"] = f"meta-llama/{model}" if model.startswith("Llama-") else model
        meta["hook_name"] = f"blocks.{int(match.group('layer'))}.hook_resid_post"
    cfg = saelens_cfg("standard", d_in, d_sae, dtype_name(tensors), apply_b_dec=False, meta=meta)
    out = {"W_enc": got["encoder_linear.weight"].t(), "b_enc": got["encoder_linear.bias"],
           "W_dec": got["decoder_linear.weight"].t().contiguous(), "b_dec": got["decoder_linear.bias"]}
    return Converted(cfg, out, where, file.parent)
