"""What the SAE layout converters share: the layout names, :class:`Converted`, and the checked
readers of cfg files and weight tensors.

The layout names and :class:`Converted` live here rather than in the package ``__init__`` because
every converter module needs them and the ``__init__`` imports the converters (no import cycle).
All errors name the file and key (``hyperparams.json:d_model``) and the SAE (``in '<path>'``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

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

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}


@dataclass(frozen=True)
class Converted:
    """A non-SAELens SAE as a current-layout SAELens cfg dict plus float32 SAELens tensors.

    ``root`` is the directory that holds the weights (where a feature_stats sidecar would sit)."""

    cfg: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    source: str
    root: Path


def saelens_cfg(architecture: str, d_in: int, d_sae: int, dtype: str, *, apply_b_dec: bool, meta: dict[str, Any],
                **extra: Any) -> dict[str, Any]:
    """A current-layout SAELens cfg dict; ``None`` metadata values are dropped."""
    return {
        "architecture": architecture, "d_in": d_in, "d_sae": d_sae, "dtype": dtype,
        "apply_b_dec_to_input": apply_b_dec, "normalize_activations": "none",
        **extra, "metadata": {k: v for k, v in meta.items() if v is not None},
    }


def dtype_name(tensors: Mapping[str, torch.Tensor]) -> str:
    first = next(iter(tensors.values()), None)
    return _DTYPE_NAMES.get(first.dtype, "float32") if first is not None else "float32"


def take(tensors: Mapping[str, torch.Tensor], specs: Mapping[str, tuple[int, ...]], file: str, where: str,
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


def sizes_from(tensors: Mapping[str, torch.Tensor], key: str, layout_shape: str, file: str, where: str,
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


def read_json(file: Path, where: str, layout: str) -> dict[str, Any]:
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


def read_safetensors(file: Path, where: str) -> dict[str, torch.Tensor]:
    rel = file.name if file.parent.name != "checkpoints" else f"checkpoints/{file.name}"
    if not file.is_file():
        raise invalid(rel, f"missing in {where}")
    try:
        return load_file(str(file), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise invalid(rel, f"is not a readable safetensors file ({exc}); in {where}") from None


def pos_int(raw: Mapping[str, Any], key: str, file: str, where: str, default: int | None = None) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(f"{file}:{key}", f"must be an integer >= 1, got {value!r}; in {where}")
    return value


def number(raw: Mapping[str, Any], key: str, default: float, file: str, where: str) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(f"{file}:{key}", f"must be a finite number, got {value!r}; in {where}")
    return float(value)


def flag(raw: Mapping[str, Any], key: str, default: bool, file: str, where: str) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise invalid(f"{file}:{key}", f"must be true or false, got {value!r}; in {where}")
    return value
