"""llama.cpp control vectors (GGUF) to and from steerwatch steering vectors.

The file (as ``llama-cvector-generator`` writes it, tools/cvector-generator/cvector-generator.cpp
``export_gguf``; repeng's ``ControlVector.export_gguf`` writes the same keys):

* ``general.architecture`` = ``"controlvector"``;
* ``controlvector.model_hint``: the model's architecture name (cvector-generator copies the model's
  ``general.architecture``, e.g. ``llama``, ``gemma3``; repeng its HF ``model_type``);
* ``controlvector.layer_count``: the number of direction tensors (cvector-generator: int32
  ``n_layer - 1``, one per layer 1..n_layer-1; repeng: uint32 ``len(directions)``). llama.cpp's
  loader never reads it;
* one F32 1-D tensor ``direction.<N>`` of length n_embd per steered layer, N >= 1.

**Layer mapping: steerwatch layer L <-> ``direction.L``** (no offset). Checked in llama.cpp's source:
``common_control_vector_load_one`` (common/common.cpp) stores ``direction.N`` at offset
``n_embd * (N - 1)`` ("layer 1 at [0]") and refuses N = 0; ``llama_adapter_cvec::apply``
(src/llama-adapter.cpp) copies offset ``n_embd * (il - 1)`` into ``tensors[il]`` for
il = 1..n_layer-1 ("there's never a tensor for layer 0"); and every model graph calls
``build_cvec(cur, il)`` on the output of decoder layer ``il`` (0-based; the ``l_out`` tensor). So
``direction.N`` is added to the output of decoder layer N, which is where steerwatch adds layer N.
Layer 0's output has no slot in llama.cpp, so a vector with layer 0 cannot be exported.
(cvector-generator computes ``direction.N`` from the output of layer N-1 -- it names layer il's
difference ``direction.{il+1}`` -- but applies it at layer N; import follows where it is applied.)

Import refuses what llama.cpp refuses (another architecture, tensors not named ``direction.<N>``,
N = 0, not 1-D, widths that differ) plus non-finite values; it accepts F16/F64 besides F32 (llama.cpp
itself reads only F32), sums repeated directions for one layer as llama.cpp does, and skips all-zero
directions (they add nothing). Errors name ``<field>:<key or tensor>``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from steering.errors import invalid
from steering.tensors import require_finite
from steering.vectors import SteeringVector, make_vector

ARCH = "controlvector"
KEY_ARCH = "general.architecture"
KEY_HINT = f"{ARCH}.model_hint"
KEY_COUNT = f"{ARCH}.layer_count"
IMPORT_METHOD = "gguf-import"

_DIRECTION = re.compile(r"direction\.(\d+)")


def export_gguf(vec: SteeringVector, path: str | Path, *, model_hint: str, n_layers: int | None = None) -> None:
    """Write ``vec`` as a llama.cpp control vector: layer L becomes ``direction.L`` (F32).

    ``model_hint`` is written to ``controlvector.model_hint`` (use the model's llama.cpp architecture
    name). ``n_layers`` (the model's decoder layers; default: the vector's highest layer + 1) bounds
    the layers: llama.cpp applies directions 1..n_layers-1 only. Refuses layer 0 (no slot in llama.cpp).
    The file is written to a temporary sibling and renamed into place.
    """
    if not isinstance(model_hint, str) or not model_hint.strip():
        raise invalid("model_hint", "required: the model's architecture as llama.cpp names it (e.g. llama, gemma3)")
    layers = vec.layers
    if layers[0] == 0:
        raise invalid("vector.layer", "layer 0 cannot be exported: llama.cpp adds direction.N to the output of layer N "
                                      "for N >= 1 only (it refuses direction.0); drop layer 0 or move it to layer 1")
    top = layers[-1]
    if n_layers is None:
        n_layers = top + 1
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 2:
        raise invalid("n_layers", f"must be an integer >= 2 (the model's decoder layers), got {n_layers!r}")
    if top >= n_layers:
        raise invalid("n_layers", f"the vector has layer {top} but the model has {n_layers} layers (0..{n_layers - 1}); "
                                  "llama.cpp would never apply it")
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), ARCH)  # writes general.architecture
    try:
        writer.add_string(KEY_HINT, model_hint)
        writer.add_int32(KEY_COUNT, len(layers))  # as cvector-generator: the number of direction tensors
        for layer in layers:
            writer.add_tensor(f"direction.{layer}", vec.per_layer[layer].detach().to("cpu", torch.float32).numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, target)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def import_gguf(path: str | Path, *, field: str = "path") -> SteeringVector:
    """Read a llama.cpp control vector: ``direction.N`` becomes layer N; model = model_hint,
    method ``gguf-import``. All-zero directions are skipped (listed in meta ``gguf.skipped_zero_layers``)."""
    file = Path(path)
    if not file.is_file():
        raise invalid(field, f"file {str(file)!r} does not exist")
    try:
        reader = gguf.GGUFReader(str(file))
    except Exception as exc:  # the reader raises ValueError/struct errors on anything that is not GGUF
        raise invalid(field, f"{str(file)!r} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    arch = _string(reader, KEY_ARCH, field, required=True)
    if arch != ARCH:
        raise invalid(f"{field}:{KEY_ARCH}", f"is {arch!r} but a llama.cpp control vector has {ARCH!r} "
                                             f"(a model or another adapter file?); in {str(file)!r}")
    hint = _string(reader, KEY_HINT, field, required=False) or ""
    count = _integer(reader, KEY_COUNT, field)
    if not reader.tensors:
        raise invalid(field, f"{str(file)!r} has no direction.<N> tensors")

    per_layer: dict[int, torch.Tensor] = {}
    width: tuple[str, int] | None = None
    for t in reader.tensors:
        name = str(t.name)
        where = f"{field}:{name}"
        match = _DIRECTION.fullmatch(name)
        if not match:
            raise invalid(where, "unexpected tensor; a control vector holds only direction.<N> tensors (N >= 1)")
        layer = int(match.group(1))
        if layer == 0:
            raise invalid(where, "layer index 0 is not allowed: llama.cpp applies direction.N to the output of "
                                 "layer N for N >= 1 and refuses direction.0")
        values = _direction_values(t, where)
        if width is None:
            width = (name, values.numel())
        elif values.numel() != width[1]:
            raise invalid(where, f"has {values.numel()} values but {width[0]} has {width[1]}; all directions must have "
                                 "the same width (the model's n_embd)")
        per_layer[layer] = per_layer[layer] + values if layer in per_layer else values  # llama.cpp sums repeats
    nonzero = {layer: v for layer, v in per_layer.items() if bool(v.any())}
    skipped = sorted(set(per_layer) - set(nonzero))
    if not nonzero:
        raise invalid(field, f"every direction in {str(file)!r} is all zeros; there is nothing to steer with")
    meta = {"gguf.model_hint": hint, "gguf.file": file.name}
    if count is not None:
        meta["gguf.layer_count"] = str(count)
    if skipped:
        meta["gguf.skipped_zero_layers"] = ",".join(str(layer) for layer in skipped)
    return make_vector(nonzero, model=hint, method=IMPORT_METHOD, source=f"llama.cpp control vector {file.name}",
                       meta=meta, field_name=field)


def _direction_values(t: Any, where: str) -> torch.Tensor:
    """One direction tensor as float32 [n_embd]: F32/F16/F64, 1-D (ggml dims of size 1 ignored), finite."""
    allowed = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F64)
    kind = gguf.GGMLQuantizationType(int(t.tensor_type))
    if kind not in allowed:
        raise invalid(where, f"tensor type {kind.name} not allowed; use F32 (llama.cpp reads only F32; F16/F64 are converted)")
    dims = [int(d) for d in t.shape]
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    if len(dims) != 1:
        raise invalid(where, f"shape {dims} is not 1-D; a direction is one [n_embd] vector")
    values = torch.from_numpy(np.array(t.data, dtype=np.float32, copy=True).reshape(-1))
    require_finite(values, where)
    return values


def _string(reader: Any, key: str, field: str, *, required: bool) -> str | None:
    f = reader.get_field(key)
    if f is None:
        if required:
            raise invalid(f"{field}:{key}", f"missing; a llama.cpp control vector has {KEY_ARCH} = {ARCH!r}")
        return None
    if not f.types or f.types[0] != gguf.GGUFValueType.STRING:
        raise invalid(f"{field}:{key}", f"must be a string, got {[t.name for t in f.types]}")
    return str(f.contents())


def _integer(reader: Any, key: str, field: str) -> int | None:
    f = reader.get_field(key)
    if f is None:
        return None
    ints = {gguf.GGUFValueType.UINT8, gguf.GGUFValueType.INT8, gguf.GGUFValueType.UINT16, gguf.GGUFValueType.INT16,
            gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT32, gguf.GGUFValueType.UINT64, gguf.GGUFValueType.INT64}
    if len(f.types) != 1 or f.types[0] not in ints:
        raise invalid(f"{field}:{key}", f"must be an integer, got {[t.name for t in f.types]}")
    return int(f.contents())
