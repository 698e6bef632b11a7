"""SAE layouts other than SAELens, converted into SAELens tensors and a SAELens cfg dict.

:func:`monitors.sae.loader.load_sae` calls :func:`detect_layout` and, for a non-SAELens layout, the
converter here; the result goes through the same ``parse_config``/``build_sae`` as a SAELens
directory, so everything downstream sees one SAE type. Each converter reproduces the releasing
library's own inference computation (sources named per converter); all errors name the file and key.

Layouts (first match wins):

* **SAELens**: ``cfg.json`` + ``sae_weights.safetensors`` (read by the loader itself).
* **EleutherAI sparsify**: ``cfg.json`` + ``sae.safetensors`` (one hookpoint directory such as
  ``layers.6/``; a parent holding several is refused with the list of its hookpoints).
* **Llama Scope** (OpenMOSS lm_saes): ``hyperparams.json`` + ``checkpoints/final.safetensors``
  (or ``sae_weights.safetensors`` / ``checkpoints/pruned.safetensors``, lm_saes' own search order).
* **Gemma Scope 2**: ``params.safetensors`` (+ ``config.json``, optional).
* **Goodfire**: one ``*.pt`` / ``*.pth`` torch state dict, given as the file or its directory.

Also :func:`check_sae_fits`: refuse an SAE made for another width, layer or model.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from monitors.sae.base import SAE
from steering.errors import InvalidArgument, invalid
from steering.tensors import checked

SAELENS = "saelens"
SPARSIFY = "sparsify"
LLAMA_SCOPE = "llama_scope"
GEMMA_SCOPE_2 = "gemma_scope_2"
GOODFIRE = "goodfire"

#: what each layout is recognised by, for error messages
LAYOUTS: dict[str, str] = {
    SAELENS: "SAELens (cfg.json + sae_weights.safetensors)",
    SPARSIFY: "EleutherAI sparsify (cfg.json + sae.safetensors)",
    LLAMA_SCOPE: "Llama Scope (hyperparams.json + checkpoints/final.safetensors)",
    GEMMA_SCOPE_2: "Gemma Scope 2 (params.safetensors + config.json)",
    GOODFIRE: "Goodfire (one *.pt or *.pth torch state dict)",
}
LOOKED_FOR = "; ".join(LAYOUTS.values())

SPARSIFY_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
LLAMA_SCOPE_CFG = "hyperparams.json"
#: lm_saes ``SparseAutoEncoder.from_config`` search order (the .pt variants are not read here)
LLAMA_SCOPE_WEIGHTS = ("sae_weights.safetensors", "checkpoints/pruned.safetensors", "checkpoints/final.safetensors")
GEMMA_CFG = "config.json"
GEMMA_WEIGHTS = "params.safetensors"
TORCH_SUFFIXES = (".pt", ".pth")

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}


@dataclass(frozen=True)
class Converted:
    """A non-SAELens SAE as a current-layout SAELens cfg dict plus float32 SAELens tensors.

    ``root`` is the directory that holds the weights (where a feature_stats sidecar would sit)."""

    cfg: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    source: str
    root: Path


# ---- detection ---------------------------------------------------------------------------------

def detect_layout(path: Path) -> tuple[str, Path]:
    """(layout name, directory or file to read). Raises InvalidArgument naming what was looked for."""
    if path.is_file():
        if path.suffix in TORCH_SUFFIXES:
            return GOODFIRE, path
        if path.name in ("sae_weights.safetensors", SPARSIFY_WEIGHTS, GEMMA_WEIGHTS, "cfg.json", LLAMA_SCOPE_CFG, GEMMA_CFG):
            return detect_layout(path.parent)
        if path.name == "final.safetensors" and path.parent.name == "checkpoints":
            return detect_layout(path.parent.parent)
        raise invalid("path", f"{str(path)!r} is a file but not a known SAE weights file; looked for: {LOOKED_FOR}")
    if not path.is_dir():
        raise invalid("path", f"{str(path)!r} is not a directory (nor a file); expected an SAE in one of: {LOOKED_FOR}")
    has = {name: (path / name).is_file() for name in ("cfg.json", "sae_weights.safetensors", SPARSIFY_WEIGHTS,
                                                       LLAMA_SCOPE_CFG, GEMMA_WEIGHTS)}
    if has["cfg.json"] and has["sae_weights.safetensors"]:
        return SAELENS, path
    if has["cfg.json"] and has[SPARSIFY_WEIGHTS]:
        return SPARSIFY, path
    if has[LLAMA_SCOPE_CFG] and not has["cfg.json"]:
        return LLAMA_SCOPE, path
    if has[GEMMA_WEIGHTS]:
        return GEMMA_SCOPE_2, path
    pickles = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix in TORCH_SUFFIXES)
    if len(pickles) == 1 and not has["cfg.json"]:
        return GOODFIRE, path / pickles[0]
    if len(pickles) > 1 and not has["cfg.json"]:
        raise invalid("path", f"{str(path)!r} holds {len(pickles)} torch files ({', '.join(pickles)}); "
                              "a Goodfire SAE directory must hold exactly one; give the file itself")
    hookpoints = sorted(p.name for p in path.iterdir()
                        if p.is_dir() and (p / SPARSIFY_CFG).is_file() and (p / SPARSIFY_WEIGHTS).is_file())
    if hookpoints and not has["cfg.json"]:
        shown = ", ".join(hookpoints[:12]) + (", ..." if len(hookpoints) > 12 else "")
        raise invalid("path", f"{str(path)!r} holds one sparsify SAE per hookpoint ({len(hookpoints)}); "
                              f"give one of its subdirectories: {shown}")
    # Fall through to SAELens: its loader names the missing cfg.json / sae_weights.safetensors.
    return SAELENS, path


def convert(layout: str, where: Path) -> Converted:
    """Run the converter of a non-SAELens ``layout`` on ``where`` (from :func:`detect_layout`)."""
    return _CONVERTERS[layout](where)


# ---- EleutherAI sparsify -----------------------------------------------------------------------

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
    raw = _read_json(root / SPARSIFY_CFG, where, SPARSIFY)
    cfg_field = SPARSIFY_CFG
    d_in = _pos_int(raw, "d_in", cfg_field, where)
    activation = raw.get("activation", "topk")
    if activation != "topk":
        raise invalid(f"{cfg_field}:activation", f"{activation!r} is not supported; allowed: topk; in {where}")
    for key, why in _SPARSIFY_REFUSED_FLAGS.items():
        if raw.get(key):
            raise invalid(f"{cfg_field}:{key}", f"is true: {why}; in {where}")
    if raw.get("num_latents"):  # 0 (the default) means d_in * expansion_factor
        d_sae = _pos_int(raw, "num_latents", cfg_field, where)
    else:
        d_sae = d_in * _pos_int(raw, "expansion_factor", cfg_field, where, default=32)
    k = _pos_int(raw, "k", cfg_field, where, default=32)
    if k > d_sae:
        raise invalid(f"{cfg_field}:k", f"k={k} is out of range; allowed 1..d_sae={d_sae}; in {where}")

    file = SPARSIFY_WEIGHTS
    tensors = _read_safetensors(root / file, where)
    dims = f"{cfg_field} d_in={d_in}, d_sae={d_sae}"
    specs = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    got = _take(tensors, specs, file, where, dims, SPARSIFY)

    hook_name, hook_dir = _sparsify_hook(root)
    meta: dict[str, Any] = {"hook_name": hook_name, "source_format": SPARSIFY}
    model = _sparsify_model(hook_dir)
    if model:
        meta["model_name"] = model
    cfg = _cfg("topk", d_in, d_sae, _dtype_name(tensors), apply_b_dec=True, meta=meta, k=k)
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


# ---- Llama Scope ---------------------------------------------------------------------------------

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
    raw = _read_json(root / f, where, LLAMA_SCOPE)
    d_model = _pos_int(raw, "d_model", f, where)
    if raw.get("d_sae") is not None:
        d_sae = _pos_int(raw, "d_sae", f, where)
    else:
        d_sae = d_model * _pos_int(raw, "expansion_factor", f, where, default=128)
    hook_in = raw.get("hook_point_in", "blocks.0.hook_resid_pre")
    hook_out = raw.get("hook_point_out") or hook_in
    if hook_out != hook_in:
        raise invalid(f"{f}:hook_point_out", f"{hook_out!r} differs from hook_point_in {hook_in!r}: a transcoder, "
                                             f"not an autoencoder; only autoencoders are supported; in {where}")
    if raw.get("use_glu_encoder"):
        raise invalid(f"{f}:use_glu_encoder", f"is true: GLU encoders are not supported; in {where}")
    s_in, s_out = _llama_scope_norm(raw, d_model, hook_in, f, where)
    theta = _number(raw, "jump_relu_threshold", 0.0, f, where)
    architecture, k = _llama_scope_activation(raw, theta, d_sae, f, where)
    use_b_dec = _flag(raw, "use_decoder_bias", True, f, where)
    apply_b_dec = _flag(raw, "apply_decoder_bias_to_pre_encoder", True, f, where) and use_b_dec
    include_norm = _flag(raw, "sparsity_include_decoder_norm", True, f, where)

    weights_rel = next((rel for rel in LLAMA_SCOPE_WEIGHTS if (root / rel).is_file()), LLAMA_SCOPE_WEIGHTS[-1])
    tensors = _read_safetensors(root / weights_rel, where)
    dims = f"{f} d_model={d_model}, d_sae={d_sae}"
    specs = {"encoder.weight": (d_sae, d_model), "encoder.bias": (d_sae,), "decoder.weight": (d_model, d_sae)}
    if use_b_dec:
        specs["decoder.bias"] = (d_model,)
    got = _take(tensors, specs, weights_rel, where, dims, LLAMA_SCOPE)

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
    cfg = _cfg(architecture, d_model, d_sae, _dtype_name(tensors), apply_b_dec=apply_b_dec, meta=meta, **extra)
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
        k = _pos_int(raw, "top_k", f, where, default=50)
        if k > d_sae:
            raise invalid(f"{f}:top_k", f"top_k={k} is out of range; allowed 1..d_sae={d_sae}; in {where}")
        return "topk", k
    return "standard", None


# ---- Gemma Scope 2 -------------------------------------------------------------------------------

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
        raw = _read_json(root / GEMMA_CFG, where, GEMMA_SCOPE_2)
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
    tensors = _read_safetensors(root / file, where)
    needed = ("w_enc", "b_enc", "threshold", "w_dec", "b_dec")
    d_in, d_sae = _sizes_from(tensors, "w_enc", "[d_in, d_sae]", file, where, GEMMA_SCOPE_2, needed)
    width = raw.get("width")
    if width is not None and width != d_sae:
        raise invalid(f"{f}:width", f"is {width!r} but {file}:w_enc has shape {[d_in, d_sae]} (d_sae={d_sae}); in {where}")
    dims = f"from {file}:w_enc, d_in={d_in}, d_sae={d_sae}"
    specs = {"w_enc": (d_in, d_sae), "b_enc": (d_sae,), "threshold": (d_sae,), "w_dec": (d_sae, d_in), "b_dec": (d_in,)}
    got = _take(tensors, specs, file, where, dims, GEMMA_SCOPE_2)

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
    cfg = _cfg("jumprelu", d_in, d_sae, _dtype_name(tensors), apply_b_dec=False, meta=meta)
    out = {"W_enc": got["w_enc"], "b_enc": got["b_enc"], "threshold": got["threshold"],
           "W_dec": got["w_dec"], "b_dec": got["b_dec"]}
    return Converted(cfg, out, where, root)


# ---- Goodfire ------------------------------------------------------------------------------------

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
    d_sae, d_in = _sizes_from(tensors, "encoder_linear.weight", "[d_sae, d_in]", name, where, GOODFIRE, needed)
    dims = f"from {name}:encoder_linear.weight, d_sae={d_sae}, d_in={d_in}"
    specs = {"encoder_linear.weight": (d_sae, d_in), "encoder_linear.bias": (d_sae,),
             "decoder_linear.weight": (d_in, d_sae), "decoder_linear.bias": (d_in,)}
    got = _take(tensors, specs, name, where, dims, GOODFIRE)

    meta: dict[str, Any] = {"source_format": GOODFIRE}
    match = _GOODFIRE_NAME.match(file.stem)
    if match:
        model = match.group("model")
        meta["model_name"] = f"meta-llama/{model}" if model.startswith("Llama-") else model
        meta["hook_name"] = f"blocks.{int(match.group('layer'))}.hook_resid_post"
    cfg = _cfg("standard", d_in, d_sae, _dtype_name(tensors), apply_b_dec=False, meta=meta)
    out = {"W_enc": got["encoder_linear.weight"].t(), "b_enc": got["encoder_linear.bias"],
           "W_dec": got["decoder_linear.weight"].t().contiguous(), "b_dec": got["decoder_linear.bias"]}
    return Converted(cfg, out, where, file.parent)


_CONVERTERS: dict[str, Callable[[Path], Converted]] = {
    SPARSIFY: convert_sparsify,
    LLAMA_SCOPE: convert_llama_scope,
    GEMMA_SCOPE_2: convert_gemma_scope_2,
    GOODFIRE: convert_goodfire,
}


# ---- fit check -----------------------------------------------------------------------------------

_VARIANT_SUFFIXES = ("-instruct", "-it", "-pt", "-base", "-hf", "-chat")


def comparable_model_name(name: str) -> str:
    """``"meta-llama/Llama-3.1-8B-Instruct"`` -> ``"llama-3.1-8b"``: the last path part, lower case,
    ``_`` as ``-``, one trailing variant suffix (-instruct, -it, -pt, -base, -hf, -chat) dropped, since
    SAEs trained on a base model are routinely used on its instruction-tuned sibling."""
    last = name.strip().rstrip("/").rsplit("/", 1)[-1].lower().replace("_", "-")
    for suffix in _VARIANT_SUFFIXES:
        if last.endswith(suffix) and len(last) > len(suffix):
            return last[: -len(suffix)]
    return last


def check_sae_fits(sae: SAE, *, d_model: int, layer: int | None, model_name: str | None, field: str) -> None:
    """Refuse an SAE that cannot read this model at ``layer``: InvalidArgument naming ``field`` when
    its d_in differs from ``d_model``; when its recorded hook layer differs from ``layer`` (both
    known); when both model names are known and differ after :func:`comparable_model_name`."""
    if sae.d_in != d_model:
        raise invalid(field, f"SAE has d_in {sae.d_in} but the model's d_model is {d_model}; it was made for another model")
    meta = sae.cfg.metadata
    trained = sae.hook_layer  # the decoder layer whose output it reads (resid_pre L -> L-1)
    if layer is not None and trained is not None and trained != layer:
        raise invalid(field, f"SAE was trained on the output of layer {trained} (hook {meta.hook_name!r}) but is "
                             f"used at layer {layer}; use it at layer {trained} or pick the SAE for layer {layer}")
    sae_model = meta.model_name
    if model_name and sae_model and comparable_model_name(model_name) != comparable_model_name(sae_model):
        raise invalid(field, f"SAE was trained on model {sae_model!r} but the model is {model_name!r}")


# ---- helpers -------------------------------------------------------------------------------------

def _cfg(architecture: str, d_in: int, d_sae: int, dtype: str, *, apply_b_dec: bool, meta: dict[str, Any],
         **extra: Any) -> dict[str, Any]:
    """A current-layout SAELens cfg dict; ``None`` metadata values are dropped."""
    return {
        "architecture": architecture, "d_in": d_in, "d_sae": d_sae, "dtype": dtype,
        "apply_b_dec_to_input": apply_b_dec, "normalize_activations": "none",
        **extra, "metadata": {k: v for k, v in meta.items() if v is not None},
    }


def _dtype_name(tensors: Mapping[str, torch.Tensor]) -> str:
    first = next(iter(tensors.values()), None)
    return _DTYPE_NAMES.get(first.dtype, "float32") if first is not None else "float32"


def _take(tensors: Mapping[str, torch.Tensor], specs: Mapping[str, tuple[int, ...]], file: str, where: str,
          dims: str, layout: str) -> dict[str, torch.Tensor]:
    """The ``specs`` tensors as contiguous float32 after presence, shape, dtype and finiteness checks;
    tensors not in ``specs`` are refused (the releasing libraries load strictly too)."""
    out: dict[str, torch.Tensor] = {}
    for key, shape in specs.items():
        field = f"{file}:{key}"
        if key not in tensors:
            raise invalid(field, f"missing in {where}; a {_short(layout)} SAE needs {', '.join(specs)}")
        t = tensors[key]
        if tuple(t.shape) != tuple(shape):
            raise invalid(field, f"expected shape {list(shape)} ({dims}) but got {list(t.shape)}; in {where}")
        try:
            out[key] = checked(t, shape, field)
        except InvalidArgument as exc:
            raise invalid(field, f"{str(exc).removeprefix(field + ': ')}; in {where}") from None
    unexpected = sorted(set(tensors) - set(specs))
    if unexpected:
        raise invalid(f"{file}:{unexpected[0]}", f"unexpected tensor(s) {unexpected}; this layout holds exactly "
                                                 f"{', '.join(specs)}; in {where}")
    return out


def _sizes_from(tensors: Mapping[str, torch.Tensor], key: str, layout_shape: str, file: str, where: str,
                layout: str, needed: tuple[str, ...]) -> tuple[int, int]:
    """The two sizes of the 2-D tensor ``key`` that defines a layout's dimensions."""
    if key not in tensors:
        raise invalid(f"{file}:{key}", f"missing in {where}; a {_short(layout)} SAE needs {', '.join(needed)}")
    t = tensors[key]
    if t.ndim != 2:
        raise invalid(f"{file}:{key}", f"must be 2-D {layout_shape}, got shape {list(t.shape)}; in {where}")
    return int(t.shape[0]), int(t.shape[1])


def _short(layout: str) -> str:
    return LAYOUTS[layout].split(" (")[0]


def _read_json(file: Path, where: str, layout: str) -> dict[str, Any]:
    if not file.is_file():
        raise invalid(file.name, f"missing in {where}; the layout {LAYOUTS[layout]} needs it")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise invalid(file.name, f"is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); in {where}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise invalid(file.name, f"cannot be read ({exc}); in {where}") from None
    if not isinstance(data, dict):
        raise invalid(file.name, f"must be a JSON object, got {type(data).__name__}; in {where}")
    return data


def _read_safetensors(file: Path, where: str) -> dict[str, torch.Tensor]:
    rel = file.name if file.parent.name != "checkpoints" else f"checkpoints/{file.name}"
    if not file.is_file():
        raise invalid(rel, f"missing in {where}")
    try:
        return load_file(str(file), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise invalid(rel, f"is not a readable safetensors file ({exc}); in {where}") from None


def _pos_int(raw: Mapping[str, Any], key: str, file: str, where: str, default: int | None = None) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(f"{file}:{key}", f"must be an integer >= 1, got {value!r}; in {where}")
    return value


def _number(raw: Mapping[str, Any], key: str, default: float, file: str, where: str) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(f"{file}:{key}", f"must be a finite number, got {value!r}; in {where}")
    return float(value)


def _flag(raw: Mapping[str, Any], key: str, default: bool, file: str, where: str) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise invalid(f"{file}:{key}", f"must be true or false, got {value!r}; in {where}")
    return value
