"""Linear readers of the residual stream: logistic probes and direction projections.

Both reduce to one row ``w`` and bias ``b`` applied to a token's residual vector ``x``; what differs is
the output transform: a probe reports ``sigmoid(w·x + b)``, a direction reports ``x·r̂`` (dot) or
``x·r̂ / |x|`` (cosine). Keeping them in one shape lets the core stack every reader at a layer into a
single matmul.

Probe file: safetensors with ``weight`` [d_model], ``bias`` [] or [1], optional ``mean`` and ``std``
[d_model] (the standardisation the probe was trained with, as in the Apollo deception probes; folded
into ``w`` and ``b`` at load), and metadata ``steerwatch.kind=probe``, ``layer``, ``model``, ``name``,
``threshold`` (optional, a calibrated decision threshold).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from steering.errors import invalid
from steering.tensors import checked, unit_direction
from steering.vectors import read_tensor_file

Transform = Literal["sigmoid", "dot", "cosine"]
TRANSFORMS: tuple[str, ...] = ("sigmoid", "dot", "cosine")


@dataclass(frozen=True)
class LinearReader:
    """score = transform(w·x + b). ``w`` is float32 [d_model]."""

    weight: torch.Tensor
    bias: float
    transform: Transform
    layer: int | None = None
    name: str = ""
    threshold: float | None = None

    @property
    def d_model(self) -> int:
        return self.weight.numel()

    def read(self, x: torch.Tensor) -> torch.Tensor:
        """Reference (unbatched) computation: x [T, d_model] -> scores [T]."""
        return apply_transform(x.float() @ self.weight + self.bias, x.float(), self.transform)


def apply_transform(z: torch.Tensor, x: torch.Tensor, transform: str) -> torch.Tensor:
    """Turn raw linear scores z [T, n] (or [T]) into reported scores."""
    if transform == "sigmoid":
        return torch.sigmoid(z)
    if transform == "cosine":
        norm = x.norm(dim=-1).clamp_min(1e-12)
        return z / (norm if z.dim() == 1 else norm[:, None])
    return z


def make_probe(weight: torch.Tensor, bias: float = 0.0, *, mean: torch.Tensor | None = None,
               std: torch.Tensor | None = None, layer: int | None = None, name: str = "",
               threshold: float | None = None, field_name: str = "probe") -> LinearReader:
    """A logistic probe; standardisation ``(x - mean) / std`` is folded into the weights."""
    if weight.dim() != 1:
        raise invalid(f"{field_name}.weight", f"shape {list(weight.shape)} is not 1-D [d_model]")
    d = weight.numel()
    w = checked(weight, (d,), f"{field_name}.weight")
    b = float(bias)
    if not torch.isfinite(torch.tensor(b)):
        raise invalid(f"{field_name}.bias", "must be finite")
    if std is not None:
        s = checked(std, (d,), f"{field_name}.std")
        if bool((s <= 0).any()):
            raise invalid(f"{field_name}.std", "every entry must be > 0")
        w = w / s
    if mean is not None:
        b = b - float(checked(mean, (d,), f"{field_name}.mean") @ w)
    return LinearReader(w, b, "sigmoid", layer, name, threshold)


def make_direction(direction: torch.Tensor, *, metric: str = "dot", layer: int | None = None,
                   name: str = "", field_name: str = "direction") -> LinearReader:
    """A projection reader on the unit vector along ``direction``."""
    if metric not in ("dot", "cosine"):
        raise invalid(f"{field_name}.metric", f"{metric!r} not allowed; use dot or cosine")
    d = direction.numel()
    r = checked(direction.reshape(-1), (d,), field_name)
    return LinearReader(unit_direction(r, field_name), 0.0, metric, layer, name)  # type: ignore[arg-type]


def save_probe(probe: LinearReader, path: str | Path, *, model: str = "") -> None:
    """Write a probe file (weights already standardisation-folded)."""
    meta = {"steerwatch.kind": "probe", "model": model, "name": probe.name,
            "layer": "" if probe.layer is None else str(probe.layer),
            "threshold": "" if probe.threshold is None else repr(probe.threshold)}
    save_file({"weight": probe.weight.contiguous(), "bias": torch.tensor([probe.bias])}, str(path), metadata=meta)


def load_probe(path: str | Path, field_name: str = "probe") -> LinearReader:
    """Read and validate a probe file."""
    p = Path(path)
    t, meta = read_tensor_file(p, field_name)
    if "weight" not in t:
        raise invalid(field_name, f"{str(p)!r} has no 'weight' tensor (found {sorted(t)})")
    bias = t.get("bias", torch.zeros(1)).reshape(-1)
    if bias.numel() != 1:
        raise invalid(f"{field_name}.bias", f"has {bias.numel()} values; a probe bias is one number")
    layer = _int_or_none(meta.get("layer", ""), f"{field_name}.layer")
    thr = meta.get("threshold", "")
    return make_probe(t["weight"], float(bias[0]), mean=t.get("mean"), std=t.get("std"), layer=layer,
                      name=meta.get("name", p.stem), threshold=float(thr) if thr else None,
                      field_name=field_name)


def _int_or_none(text: str, field_name: str) -> int | None:
    if text == "":
        return None
    if not text.lstrip("-").isdigit():
        raise invalid(field_name, f"{text!r} is not an integer")
    return int(text)
