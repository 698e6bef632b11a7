"""Resolve a request's InterventionSpec against the registry and the model into per-layer tensors.

All validation that needs the model or the registry happens here, before a request joins a batch, so
a bad request is refused alone and never disturbs the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from monitors.probes import LinearReader, make_direction
from monitors.sae.formats import check_sae_fits
from steering.errors import LimitExceeded, invalid
from steering.registry import Registry
from steering.spec import AblateEdit, AddEdit, ClampEdit, Edit, GateSpec, InterventionSpec, Limits, ReadSpec
from steering.tensors import require_index, unit_direction

PHASE_ROWS = ("prompt", "generation")


@dataclass(frozen=True)
class ModelShape:
    """What the core needs to know of a model."""

    n_layers: int
    d_model: int
    name: str = ""  # model name, to refuse SAEs recorded as trained on another model


@dataclass
class LayerEdits:
    """One request's edits at one layer and phase."""

    add: torch.Tensor | None = None  # sum of coef * v, [d_model]
    ablate: list[torch.Tensor] = field(default_factory=list)  # unit directions
    clamps: dict[str, dict[int, float]] = field(default_factory=dict)  # sae id -> feature -> target
    # orthonormal basis of ``ablate``'s span: computed once by the first batch plan, reused by the next
    # (plans are rebuilt whenever the batch changes; Gram-Schmidt per row per layer added up)
    basis: torch.Tensor | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class ResolvedRead:
    """A reading bound to its layer and source. ``key`` identifies the column shared across requests."""

    name: str
    layer: int
    after_edits: bool
    key: tuple[str, ...]
    reader: LinearReader | None = None
    sae: Any = None
    feature: int | None = None


@dataclass(frozen=True)
class CompiledGate:
    """A gate bound to the read that feeds it (index into ``CompiledRequest.reads``)."""

    spec: GateSpec
    read: int


@dataclass
class CompiledRequest:
    """Per-layer edits by phase, gated edits per gate (generated tokens only), the reads, and a
    readable record of what was applied."""

    edits: dict[str, dict[int, LayerEdits]]
    reads: list[ResolvedRead]
    applied: list[dict[str, Any]]
    saes: dict[str, Any] = field(default_factory=dict)  # id -> SAE used by clamps
    gates: list[CompiledGate] = field(default_factory=list)
    gated: list[dict[int, LayerEdits]] = field(default_factory=list)  # per gate: layer -> edits
    gate_state: list[Any] = field(default_factory=list)  # per gate: monitors.gate.GateSeries, set by the plan

    def edit_layers(self) -> set[int]:
        gated = {layer for per_layer in self.gated for layer in per_layer}
        return {layer for per_layer in self.edits.values() for layer in per_layer} | gated

    @property
    def empty(self) -> bool:
        return not self.reads and not self.edit_layers()


def compile_spec(spec: InterventionSpec, registry: Registry, shape: ModelShape,
                 limits: Limits | None = None) -> CompiledRequest:
    """Validate ``spec`` and turn it into tensors; raises InvalidArgument/NotFound/LimitExceeded."""
    limits = limits or Limits()
    out = CompiledRequest({p: {} for p in PHASE_ROWS}, [], [])
    names = [r.name for r in spec.reads]
    out.gates = [CompiledGate(g, names.index(g.reading)) for g in spec.gates]
    out.gated = [{} for _ in spec.gates]
    for i, edit in enumerate(spec.edits):
        where = f"edits[{i}]"
        if isinstance(edit, AddEdit):
            _compile_add(edit, where, registry, shape, limits, out)
        elif isinstance(edit, AblateEdit):
            _compile_ablate(edit, where, registry, shape, out)
        elif isinstance(edit, ClampEdit):
            _compile_clamp(edit, where, registry, shape, limits, out)
        if edit.when is not None:
            if edit.phase == "prompt":
                raise invalid(f"{where}.phase", "a gated edit (when) acts on generated tokens; allowed: generation, both")
            out.applied[-1]["when"] = edit.when
    out.reads = [_resolve_read(r, f"reads[{i}]", registry, shape) for i, r in enumerate(spec.reads)]
    return out


def _phases(phase: str) -> tuple[str, ...]:
    return PHASE_ROWS if phase == "both" else (phase,)


def _layers(layers: list[int], shape: ModelShape, where: str) -> list[int]:
    if not layers:
        raise invalid(f"{where}.layers", "is empty; name at least one layer")
    for layer in layers:
        require_index(layer, shape.n_layers, f"{where}.layers")
    return sorted(set(layers))


def _targets(out: CompiledRequest, e: Edit, layer: int) -> list[LayerEdits]:
    """Where an edit lands at ``layer``: its phases' tables, or its gate's table (generated tokens)."""
    if e.when is not None:
        j = [g.spec.name for g in out.gates].index(e.when)
        return [out.gated[j].setdefault(layer, LayerEdits())]
    return [out.edits[phase].setdefault(layer, LayerEdits()) for phase in _phases(e.phase)]


def _compile_add(e: AddEdit, where: str, reg: Registry, shape: ModelShape, limits: Limits,
                 out: CompiledRequest) -> None:
    if abs(e.coef) > limits.max_abs_coef:
        raise LimitExceeded(f"{where}.coef: {e.coef} is beyond the limit; allowed -{limits.max_abs_coef}..{limits.max_abs_coef}",
                            field=f"{where}.coef")
    vec = reg.vector(e.vector, f"{where}.vector")
    _same_width(vec.d_model, shape, f"{where}.vector")
    layers = _layers(e.layers if e.layers is not None else vec.layers, shape, where)
    for layer in layers:
        v = vec.at(layer, f"{where}.vector") * e.coef
        for slot in _targets(out, e, layer):
            slot.add = v.clone() if slot.add is None else slot.add + v
    out.applied.append({"kind": "add", "vector": e.vector, "coef": e.coef, "layers": layers, "phase": e.phase})


def _compile_ablate(e: AblateEdit, where: str, reg: Registry, shape: ModelShape, out: CompiledRequest) -> None:
    vec = reg.vector(e.vector, f"{where}.vector")
    _same_width(vec.d_model, shape, f"{where}.vector")
    layers = list(range(shape.n_layers)) if e.layers == "all" else _layers(e.layers, shape, where)
    for layer in layers:
        r = unit_direction(vec.at(layer, f"{where}.vector"), f"{where}.vector",
                           f"direction at layer {layer} has zero norm; cannot ablate it")
        for slot in _targets(out, e, layer):
            slot.ablate.append(r)
    out.applied.append({"kind": "ablate", "vector": e.vector, "layers": layers, "phase": e.phase})


def _compile_clamp(e: ClampEdit, where: str, reg: Registry, shape: ModelShape, limits: Limits,
                   out: CompiledRequest) -> None:
    sae = reg.sae(e.sae, f"{where}.sae")
    _same_width(sae.d_in, shape, f"{where}.sae")
    out.saes[e.sae] = sae
    require_index(e.feature, sae.d_sae, f"{where}.feature")
    layer = _sae_layer(e.layer, sae, shape, where)
    check_sae_fits(sae, d_model=shape.d_model, layer=layer, model_name=shape.name or None, field=f"{where}.layer")
    target = e.value
    if e.mode == "max_multiple":
        if sae.feature_max is None:
            raise invalid(f"{where}.mode", "max_multiple needs the SAE's recorded max activations "
                          "(feature_stats.safetensors); none are loaded for this SAE, use mode=absolute")
        target = e.value * float(sae.feature_max[e.feature])
    if abs(target) > limits.max_clamp_value:
        raise LimitExceeded(f"{where}.value: clamp target {target:g} is beyond the limit; allowed "
                            f"-{limits.max_clamp_value:g}..{limits.max_clamp_value:g}", field=f"{where}.value")
    for slot in _targets(out, e, layer):
        slot.clamps.setdefault(e.sae, {})[e.feature] = target
    out.applied.append({"kind": "clamp", "sae": e.sae, "feature": e.feature, "target": target,
                        "layers": [layer], "phase": e.phase})


def _resolve_read(r: ReadSpec, where: str, reg: Registry, shape: ModelShape) -> ResolvedRead:
    if r.kind == "probe":
        probe = reg.probe(r.source, f"{where}.source")
        _same_width(probe.d_model, shape, f"{where}.source")
        layer = _read_layer(r.layer if r.layer is not None else probe.layer, shape, where)
        return ResolvedRead(r.name, layer, r.after_edits, ("linear", "probe", r.source), reader=probe)
    if r.kind == "direction":
        vec = reg.vector(r.source, f"{where}.source")
        _same_width(vec.d_model, shape, f"{where}.source")
        layer = _read_layer(r.layer if r.layer is not None else (vec.layers[0] if len(vec.layers) == 1 else None),
                            shape, where)
        reader = make_direction(vec.at(layer, f"{where}.source"), metric=r.metric, layer=layer, name=r.name,
                                field_name=f"{where}.source")
        return ResolvedRead(r.name, layer, r.after_edits, ("linear", "direction", r.source, r.metric, str(layer)),
                            reader=reader)
    sae = reg.sae(r.source, f"{where}.source")
    _same_width(sae.d_in, shape, f"{where}.source")
    if r.feature is None:
        raise invalid(f"{where}.feature", f"required for sae_feature readings; allowed 0..{sae.d_sae - 1}")
    require_index(r.feature, sae.d_sae, f"{where}.feature")
    layer = _sae_layer(r.layer, sae, shape, where)
    check_sae_fits(sae, d_model=shape.d_model, layer=layer, model_name=shape.name or None, field=f"{where}.layer")
    return ResolvedRead(r.name, layer, r.after_edits, ("sae", r.source, str(r.feature)), sae=sae, feature=r.feature)


def _read_layer(layer: int | None, shape: ModelShape, where: str) -> int:
    if layer is None:
        raise invalid(f"{where}.layer", f"the source records no layer; give one in 0..{shape.n_layers - 1}")
    return require_index(layer, shape.n_layers, f"{where}.layer")


def _sae_layer(layer: int | None, sae: Any, shape: ModelShape, where: str) -> int:
    chosen = layer if layer is not None else sae.hook_layer
    if chosen is None:
        raise invalid(f"{where}.layer", f"the SAE's config names no hook layer; give one in 0..{shape.n_layers - 1}")
    return require_index(chosen, shape.n_layers, f"{where}.layer")


def _same_width(width: int, shape: ModelShape, where: str) -> None:
    if width != shape.d_model:
        raise invalid(where, f"has width {width}; this model's residual stream has d_model={shape.d_model}")
