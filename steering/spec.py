"""What one request asks the core to read and edit, as validated pydantic models.

Sources (vectors, probes, SAEs) are referenced by registry id, never inlined: requests stay small and
the tensors are validated once, at registration.

Edits at one layer compose in a fixed order: ablations, then SAE clamps, then additions. Ablation
first removes a direction from the model's own stream; clamps then set features on what is left; an
addition comes last so a vector the user asked for is never ablated away at its own layer.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from monitors.rules import RuleSpec


def printable(v: str) -> str:
    """A name that goes into logs, alerts and dashboards: printable text only."""
    if not v.isprintable():
        raise ValueError("must be printable text")
    return v

Phase = Literal["prompt", "generation", "both"]
PHASES = ("prompt", "generation", "both")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class AddEdit(_Strict):
    """Contrastive activation addition: x <- x + coef * v[layer]."""

    kind: Literal["add"] = "add"
    vector: str = Field(description="registry id of a steering vector")
    coef: float = Field(description="multiplier of the vector; |coef| is capped by Limits.max_abs_coef")
    layers: list[int] | None = Field(None, description="layers to edit; default: the vector's own layers")
    phase: Phase = Field("both", description="prompt tokens, generated tokens, or both")
    when: str | None = Field(None, description="gate name: off until that gate's rule fires, then on for the "
                             "rest of the generation (generated tokens only)")


class AblateEdit(_Strict):
    """Directional ablation: x <- x - (x·r̂) r̂."""

    kind: Literal["ablate"] = "ablate"
    vector: str = Field(description="registry id of the direction to remove")
    layers: list[int] | Literal["all"] = Field("all", description="layers to edit, or 'all'")
    phase: Phase = "both"
    when: str | None = Field(None, description="gate name: off until that gate's rule fires, then on for the "
                             "rest of the generation (generated tokens only)")


class ClampEdit(_Strict):
    """SAE feature clamp keeping the error term: x <- x + (c - f_i(x)) W_dec[i]."""

    kind: Literal["clamp"] = "clamp"
    sae: str = Field(description="registry id of an SAE")
    feature: int = Field(ge=0, description="feature index, 0..d_sae-1")
    value: float = Field(description="target activation c (absolute) or multiple of the feature's max")
    mode: Literal["absolute", "max_multiple"] = "absolute"
    layer: int | None = Field(None, description="layer; default: the SAE's hook layer")
    phase: Phase = "both"
    when: str | None = Field(None, description="gate name: off until that gate's rule fires, then on for the "
                             "rest of the generation (generated tokens only)")


Edit = Annotated[AddEdit | AblateEdit | ClampEdit, Field(discriminator="kind")]


class ReadSpec(_Strict):
    """One monitor reading per token: a probe, a direction projection, or an SAE feature."""

    name: str = Field(min_length=1, max_length=64, description="label of the reading in outputs")
    kind: Literal["probe", "direction", "sae_feature"]
    source: str = Field(description="registry id of the probe, direction vector or SAE")
    layer: int | None = Field(None, description="layer; default: the source's own layer")
    feature: int | None = Field(None, ge=0, description="SAE feature index (sae_feature only)")
    metric: Literal["dot", "cosine"] = Field("dot", description="direction readings only")
    after_edits: bool = Field(False, description="read after this layer's edits instead of before")

    @field_validator("name")
    @classmethod
    def _printable(cls, v: str) -> str:
        return printable(v)


class GateSpec(RuleSpec):
    """A rule evaluated on the device: when ``reading`` fires it, edits with ``when=name`` switch on."""

    name: str = Field(min_length=1, max_length=64, description="referenced by edits' `when`")
    reading: str = Field(description="name of one of the spec's reads")


MAX_GATES = 4


class InterventionSpec(_Strict):
    """Everything one request reads and edits."""

    edits: list[Edit] = Field(default_factory=list, max_length=64)
    reads: list[ReadSpec] = Field(default_factory=list, max_length=64)
    gates: list[GateSpec] = Field(default_factory=list, max_length=MAX_GATES)

    @model_validator(mode="after")
    def _gates_resolve(self) -> InterventionSpec:
        reads = {r.name for r in self.reads}
        gates = [g.name for g in self.gates]
        if len(set(gates)) != len(gates):
            raise ValueError(f"gate names must be unique; got {gates}")
        for i, g in enumerate(self.gates):
            if g.reading not in reads:
                raise ValueError(f"gates[{i}].reading: {g.reading!r} is not one of the reads {sorted(reads)}")
        for i, e in enumerate(self.edits):
            if e.when is not None and e.when not in gates:
                raise ValueError(f"edits[{i}].when: {e.when!r} is not a gate; gates: {gates}")
        return self

    @field_validator("reads")
    @classmethod
    def _unique_names(cls, v: list[ReadSpec]) -> list[ReadSpec]:
        names = [r.name for r in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"reading names must be unique; repeated: {sorted(dup)}")
        return v

    @property
    def empty(self) -> bool:
        return not self.edits and not self.reads


class Limits(BaseModel):
    """Bounds every request is checked against."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_abs_coef: float = Field(16.0, gt=0, description="largest |coef| of an addition")
    max_clamp_value: float = Field(1000.0, gt=0, description="largest |c| of a clamp, after max_multiple")
