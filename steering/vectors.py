"""Steering vectors and their file format.

A vector file is a safetensors file with one float tensor per layer, named ``layer.<L>`` ([d_model]),
and string metadata: ``steerwatch.kind=vector``, ``model``, ``layers`` (comma list), ``method``
(caa, refusal-direction, manual, ...), ``source`` (free text: dataset, command), ``norm`` (L2 norm of
the first layer's vector, for humans) and ``d_model``. One file may hold a different vector per layer
(a layer sweep) or the same direction for many layers (an ablation direction).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, load_file, save, save_file

from steering.errors import invalid
from steering.tensors import checked

KIND = "vector"


@dataclass(frozen=True)
class SteeringVector:
    """Per-layer directions in the residual stream, float32 on CPU.

    ``per_layer`` maps a layer index to a [d_model] tensor. ``meta`` keeps the file's descriptive fields.
    """

    per_layer: dict[int, torch.Tensor]
    d_model: int
    model: str = ""
    method: str = "manual"
    source: str = ""
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.per_layer)

    def at(self, layer: int, field_name: str = "vector") -> torch.Tensor:
        """The vector for ``layer``; a single-layer vector serves every layer (a direction)."""
        if layer in self.per_layer:
            return self.per_layer[layer]
        if len(self.per_layer) == 1:
            return next(iter(self.per_layer.values()))
        raise invalid(f"{field_name}.layer", f"layer {layer} not in this vector's layers {self.layers}")

    def norm(self) -> float:
        return float(self.per_layer[self.layers[0]].norm())


def make_vector(per_layer: dict[int, torch.Tensor], *, model: str = "", method: str = "manual",
                source: str = "", meta: dict[str, str] | None = None, field_name: str = "vector") -> SteeringVector:
    """Validate tensors (float, finite, same [d_model] shape) and build a SteeringVector."""
    if not per_layer:
        raise invalid(field_name, "no layers given; at least one layer.<L> tensor is required")
    first = next(iter(per_layer.values()))
    if first.dim() != 1 or first.numel() == 0:
        raise invalid(field_name, f"shape {list(first.shape)} is not a 1-D [d_model] vector")
    d_model = first.numel()
    clean = {}
    for layer, t in per_layer.items():
        if layer < 0:
            raise invalid(f"{field_name}.layer", f"{layer} is negative; layers are 0-based")
        clean[int(layer)] = checked(t, (d_model,), f"{field_name}.layer.{layer}")
    return SteeringVector(clean, d_model, model=model, method=method, source=source, meta=dict(meta or {}))


def vector_metadata(vec: SteeringVector) -> dict[str, str]:
    """The string metadata a vector file carries (written by save_vector and vector_to_bytes)."""
    meta = dict(vec.meta)
    meta.update({
        "steerwatch.kind": KIND, "model": vec.model, "method": vec.method, "source": vec.source,
        "layers": ",".join(str(layer) for layer in vec.layers), "norm": f"{vec.norm():.6g}",
        "d_model": str(vec.d_model),
    })
    return meta


def save_vector(vec: SteeringVector, path: str | Path) -> None:
    """Write ``vec`` as a steerwatch vector file."""
    save_file({f"layer.{layer}": t.contiguous() for layer, t in vec.per_layer.items()}, str(path),
              metadata=vector_metadata(vec))


def load_vector(path: str | Path, field_name: str = "vector") -> SteeringVector:
    """Read and validate a vector file; errors name the file and the offending tensor."""
    tensors, meta = read_tensor_file(Path(path), field_name)
    return _vector_from(tensors, meta, repr(str(path)), field_name)


def _vector_from(tensors: dict[str, torch.Tensor], meta: dict[str, str], where: str, field_name: str) -> SteeringVector:
    per_layer = {}
    for name, t in tensors.items():
        if not name.startswith("layer.") or not name[6:].isdigit():
            raise invalid(field_name, f"{where} has tensor {name!r}; vector files hold only layer.<L> tensors")
        per_layer[int(name[6:])] = t
    return make_vector(per_layer, model=meta.get("model", ""), method=meta.get("method", "manual"),
                       source=meta.get("source", ""), meta=meta, field_name=field_name)


def read_tensor_file(path: Path, field_name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors file; a missing or corrupt file is InvalidArgument."""
    if not path.is_file():
        raise invalid(field_name, f"file {str(path)!r} does not exist")
    try:
        return load_file(str(path)), read_metadata(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise invalid(field_name, f"{str(path)!r} is not a readable safetensors file ({exc})") from exc


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (empty when it has none)."""
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def vector_to_bytes(vec: SteeringVector) -> bytes:
    """The vector file's bytes (same format as save_vector), for stores that keep blobs."""
    return save({f"layer.{layer}": t.contiguous() for layer, t in vec.per_layer.items()}, metadata=vector_metadata(vec))


def vector_from_bytes(blob: bytes, field_name: str = "vector") -> SteeringVector:
    """Parse and validate vector file bytes (no temporary file)."""
    try:
        tensors = load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        meta = json.loads(blob[8:8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError) as exc:
        raise invalid(field_name, f"is not a readable safetensors blob ({exc})") from exc
    return _vector_from(tensors, meta, "the blob", field_name)
