"""Read SAEs (SAELens and the other layouts of :mod:`monitors.sae.formats`); write SAELens directories.

A SAELens directory holds ``cfg.json`` and ``sae_weights.safetensors`` and optionally
``feature_stats.safetensors`` (tensor ``max_activation`` [d_sae], steerwatch's sidecar) and
``activation_scaler.json`` (``{"scaling_factor": s}``, written by SAELens' trainer in checkpoints
whose ``expected_average_only_in`` factor is not folded yet). :func:`load_sae` also reads EleutherAI
sparsify, Llama Scope, Gemma Scope 2 and Goodfire files, converted to the same SAE classes (the
sidecar is read beside those too). Every error names the file and key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

# Importing the architecture modules registers them.
from monitors.sae import batchtopk, gated, jumprelu, standard, topk  # noqa: F401
from monitors.sae.base import SAE
from monitors.sae.config import CFG_FILE, SAEConfigBase, build_config, canonical_cfg
from monitors.sae.formats import LOOKED_FOR, SAELENS, convert, detect_layout
from monitors.sae.registry import get_architecture
from monitors.sae.weights import WEIGHTS_FILE, fold_finetuning_scale
from steering.errors import invalid
from steering.tensors import checked

STATS_FILE = "feature_stats.safetensors"
SCALER_FILE = "activation_scaler.json"


def load_sae(path: str | Path, *, device: str | torch.device = "cpu") -> SAE:
    """Load the SAE at ``path`` onto ``device`` (weights float32 whatever the file dtype).

    The layout is detected (:func:`monitors.sae.formats.detect_layout`): a SAELens directory, or an
    EleutherAI sparsify, Llama Scope, Gemma Scope 2 or Goodfire SAE, converted to SAELens tensors."""
    layout, where = detect_layout(Path(path))
    if layout != SAELENS:
        converted = convert(layout, where)
        cfg = parse_config(converted.cfg, converted.source)
        sae = build_sae(cfg, converted.tensors, converted.source)
        sae.feature_max = _read_feature_max(converted.root, cfg.d_sae)
        return sae.to(device)
    root = where
    raw = _read_json(root / CFG_FILE, required=True)
    if not (root / WEIGHTS_FILE).is_file():
        raise invalid(WEIGHTS_FILE, f"missing in {str(root)!r}; a SAELens directory needs {CFG_FILE} and {WEIGHTS_FILE} "
                                    "(an EleutherAI sparsify directory has cfg.json and sae.safetensors)")
    cfg = _with_scaler_sidecar(parse_config(raw, str(root)), root)
    tensors = _read_safetensors(root / WEIGHTS_FILE)
    sae = build_sae(cfg, tensors, str(root))
    sae.feature_max = _read_feature_max(root, cfg.d_sae)
    return sae.to(device)


def parse_config(raw: Any, source: str) -> SAEConfigBase:
    """Parse a cfg.json dict of any SAELens version into its architecture's config model."""
    if not isinstance(raw, dict):
        raise invalid(CFG_FILE, f"must be a JSON object, got {type(raw).__name__}; in {source}")
    data = canonical_cfg(raw)
    arch = get_architecture(data["architecture"], f"{CFG_FILE}:architecture")
    return build_config(arch.config_cls, data, source)


def build_sae(cfg: SAEConfigBase, tensors: Mapping[str, torch.Tensor], source: str) -> SAE:
    """Check ``tensors`` (SAELens names, any float dtype) against ``cfg`` and build the SAE."""
    cfg, tensors = fold_finetuning_scale(cfg, tensors, source)
    return get_architecture(cfg.architecture).build(cfg, tensors, source)


def save_sae(
    sae_or_tensors: SAE | Mapping[str, torch.Tensor],
    cfg: Mapping[str, Any] | None,
    path: str | Path,
    *,
    feature_max: torch.Tensor | None = None,
) -> None:
    """Write a SAELens directory. Given an SAE, ``cfg`` defaults to its own and ``feature_max`` to
    its sidecar. Tensors are written in the dtype given (bf16 allowed) after the same checks
    :func:`load_sae` does, so a directory this writes always loads."""
    root = Path(path)
    if isinstance(sae_or_tensors, SAE):
        tensors = sae_or_tensors.state_tensors()
        cfg = dict(cfg) if cfg is not None else sae_or_tensors.to_cfg_dict()
        feature_max = sae_or_tensors.feature_max if feature_max is None else feature_max
    else:
        tensors = dict(sae_or_tensors)
        if cfg is None:
            raise invalid("cfg", "required when saving raw tensors")
    parsed = parse_config(dict(cfg), str(root))
    build_sae(parsed, tensors, str(root))
    if feature_max is not None:
        checked(feature_max, (parsed.d_sae,), f"{STATS_FILE}:max_activation")
    root.mkdir(parents=True, exist_ok=True)
    _write_atomic(root / CFG_FILE, lambda p: p.write_text(json.dumps(dict(cfg), indent=2)))
    _write_atomic(root / WEIGHTS_FILE, lambda p: save_file(_cpu(tensors), str(p)))
    if feature_max is not None:
        _write_atomic(root / STATS_FILE, lambda p: save_file(_cpu({"max_activation": feature_max}), str(p)))


def _cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}


def _write_atomic(target: Path, write: Any) -> None:
    """Write via a temporary sibling and rename, so a reader never sees half a file."""
    tmp = target.with_name(f".{target.name}.tmp")
    write(tmp)
    os.replace(tmp, target)


def _read_json(file: Path, *, required: bool) -> Any:
    if not file.is_file():
        if required:
            raise invalid(file.name, f"missing in {str(file.parent)!r}; a SAELens directory needs {CFG_FILE} and {WEIGHTS_FILE}, "
                                     f"and no other SAE layout was found there either (looked for: {LOOKED_FOR})")
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise invalid(file.name, f"is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); in {str(file.parent)!r}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise invalid(file.name, f"cannot be read ({exc}); in {str(file.parent)!r}") from None


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise invalid(file.name, f"missing in {str(file.parent)!r}; a SAELens directory needs {CFG_FILE} and {WEIGHTS_FILE}")
    try:
        return load_file(str(file), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise invalid(file.name, f"is not a readable safetensors file ({exc}); in {str(file.parent)!r}") from None


def _read_feature_max(root: Path, d_sae: int) -> torch.Tensor | None:
    if not (root / STATS_FILE).exists():
        return None
    stats = _read_safetensors(root / STATS_FILE)
    field = f"{STATS_FILE}:max_activation"
    if "max_activation" not in stats:
        raise invalid(field, f"missing in {str(root)!r}; the sidecar must hold max_activation [d_sae={d_sae}]")
    return checked(stats["max_activation"], (d_sae,), field)


def _with_scaler_sidecar(cfg: SAEConfigBase, root: Path) -> SAEConfigBase:
    """Take the expected_average_only_in factor from activation_scaler.json unless cfg.json has one."""
    if cfg.normalize_activations != "expected_average_only_in" or cfg.norm_scaling_factor is not None:
        return cfg
    data = _read_json(root / SCALER_FILE, required=False)
    if data is None:
        return cfg
    factor = data.get("scaling_factor") if isinstance(data, dict) else None
    if factor is None:
        return cfg
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < float("inf"):
        raise invalid(f"{SCALER_FILE}:scaling_factor", f"must be a finite number > 0, got {factor!r}; in {str(root)!r}")
    return cfg.model_copy(update={"norm_scaling_factor": float(factor)})
