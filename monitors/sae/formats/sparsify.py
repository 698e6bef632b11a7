"""EleutherAI sparsify SAEs: ``cfg.json`` + ``sae.safetensors`` in one hookpoint directory
(such as ``layers.6/``), converted to a SAELens TopK SAE.

The hookpoint directory name gives the hook (``layers.N`` is the residual stream after layer N) and
the run's ``config.json`` one level up may name the model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from monitors.sae.formats.common import (
    SPARSIFY,
    Converted,
    dtype_name,
    pos_int,
    read_json,
    read_safetensors,
    saelens_cfg,
    take,
)
from steering.errors import invalid

SPARSIFY_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"

_SPARSIFY_REFUSED_FLAGS = {
    "transcode": "a transcoder predicts another module's output; only autoencoders are supported",
    "skip_connection": "the W_skip linear skip connection is not supported",
    "embed_skip": "the embedding skip connection is not supported",
    "gram_lookup": "n-gram lookup tables are not supported",
    "signed": "signed TopK is not supported",
}


def convert_sparsify(root: Path) -> Converted:
    """EleutherAI sparsify ``SparseCoder`` (sparsify/sparse_coder.py, fused_encoder.py):
    ``pre = ReLU(encoder(x - b_dec))``, keep the top k, ``x^ = acts @ W_dec + b_dec``.

    TopK of ReLU'd pre-activations equals ReLU of the top-k pre-activations (SAELens TopK), and
    subtracting b_dec is ``apply_b_dec_to_input``. Missing cfg keys take SparseCoderConfig's defaults.
    """
    where = repr(str(root))
    raw = read_json(root / SPARSIFY_CFG, where, SPARSIFY)
    cfg_field = SPARSIFY_CFG
    d_in = pos_int(raw, "d_in", cfg_field, where)
    activation = raw.get("activation", "topk")
    if activation != "topk":
        raise invalid(f"{cfg_field}:activation", f"{activation!r} is not supported; allowed: topk; in {where}")
    for key, why in _SPARSIFY_REFUSED_FLAGS.items():
        if raw.get(key):
            raise invalid(f"{cfg_field}:{key}", f"is true: {why}; in {where}")
    if raw.get("num_latents"):  # 0 (the default) means d_in * expansion_factor
        d_sae = pos_int(raw, "num_latents", cfg_field, where)
    else:
        d_sae = d_in * pos_int(raw, "expansion_factor", cfg_field, where, default=32)
    k = pos_int(raw, "k", cfg_field, where, default=32)
    if k > d_sae:
        raise invalid(f"{cfg_field}:k", f"k={k} is out of range; allowed 1..d_sae={d_sae}; in {where}")

    file = SPARSIFY_WEIGHTS
    tensors = read_safetensors(root / file, where)
    dims = f"{cfg_field} d_in={d_in}, d_sae={d_sae}"
    specs = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    got = take(tensors, specs, file, where, dims, SPARSIFY)

    hook_name, hook_dir = _sparsify_hook(root)
    meta: dict[str, Any] = {"hook_name": hook_name, "source_format": SPARSIFY}
    model = _sparsify_model(hook_dir)
    if model:
        meta["model_name"] = model
    cfg = saelens_cfg("topk", d_in, d_sae, dtype_name(tensors), apply_b_dec=True, meta=meta, k=k)
    out = {"W_enc": got["encoder.weight"].t(), "b_enc": got["encoder.bias"], "W_dec": got["W_dec"], "b_dec": got["b_dec"]}
    return Converted(cfg, out, where, root)


_SPARSIFY_RESID = re.compile(r"^(?:[A-Za-z_]+\.)*(?:layers|h|blocks)[._](\d+)$")


def _sparsify_hook(root: Path) -> tuple[str | None, Path]:
    """Hook name from the hookpoint directory (``layers.6`` = output of decoder layer 6, i.e. the
    residual stream after it); a ``seedN`` directory (several seeds per hookpoint) uses its parent."""
    hook_dir = root.resolve()
    if re.fullmatch(r"seed\d+", hook_dir.name):
        hook_dir = hook_dir.parent
    name = hook_dir.name
    match = _SPARSIFY_RESID.match(name)
    if match:
        return f"blocks.{int(match.group(1))}.hook_resid_post", hook_dir
    if name == "embed_tokens":
        return "hook_embed", hook_dir
    return (name if re.search(r"(?:^|\.)(?:layers|h|blocks)[._]\d+", name) else None), hook_dir


def _sparsify_model(hook_dir: Path) -> str | None:
    """The run's ``config.json`` (one level up) names the model under ``model`` when present."""
    file = hook_dir.parent / "config.json"
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) and model else None
