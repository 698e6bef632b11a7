"""Steering vectors and their file format.

A vector file is a safetensors file with one float tensor per layer, named ``layer.<L>`` ([d_model]),
and string metadata: ``steerwatch.kind=vector``, ``model``, ``layers`` (comma list), ``method``
(caa, refusal-direction, manual, ...), ``source`` (free text: dataset, command), ``norm`` (L2 norm of
the first layer's vector, for humans) and ``d_model``. One file may hold a different vector per layer
(a layer sweep) or the same direction for many layers (an ablation direction).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

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
                source: str = "", field_name: str = "vector") -> SteeringVector:
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
    return SteeringVector(clean, d_model, model=model, method=method, source=source)


def _metadata(vec: SteeringVector) -> dict[str, str]:
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
              metadata=_metadata(vec))


def load_vector(path: str | Path, field_name: str = "vector") -> SteeringVector:
    """Read and validate a vector file; errors name the file and the offending tensor."""
    p = Path(path)
    tensors, meta = read_tensor_file(p, field_name)
    per_layer = {}
    for name, t in tensors.items():
        if not name.startswith("layer.") or not name[6:].isdigit():
            raise invalid(field_name, f"{str(p)!r} has tensor {name!r}; vector files hold only layer.<L> tensors")
        per_layer[int(name[6:])] = t
    vec = make_vector(per_layer, model=meta.get("model", ""), method=meta.get("method", "manual"),
                      source=meta.get("source", ""), field_name=field_name)
    return SteeringVector(vec.per_layer, vec.d_model, vec.model, vec.method, vec.source, meta)


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
    from safetensors.torch import save

    meta = _metadata(vec)
    return save({f"layer.{layer}": t.contiguous() for layer, t in vec.per_layer.items()}, metadata=meta)


def vector_from_bytes(blob: bytes, field_name: str = "vector") -> SteeringVector:
    """Parse and validate vector file bytes."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".safetensors") as fh:
        fh.write(blob)
        fh.flush()
        return load_vector(fh.name, field_name)
