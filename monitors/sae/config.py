"""Parsed SAELens ``cfg.json``: pydantic models plus the legacy-format translation.

The parsed part is strict (``extra="forbid"``); every key the parser does not understand is kept
verbatim in ``extras`` (top level) or ``metadata.extras`` so a load/save round trip loses nothing.
Older SAELens files (before 6.0) keep ``hook_name``/``hook_layer`` at the top level, call it
``hook_point``, and encode TopK as ``activation_fn_str: "topk"`` with ``activation_fn_kwargs.k``;
:func:`canonical_cfg` turns them into the current layout, as SAELens' ``handle_pre_6_0_config`` does.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from steering.errors import InvalidArgument, invalid

CFG_FILE = "cfg.json"

NormalizeMode = Literal["none", "expected_average_only_in", "constant_norm_rescale", "layer_norm"]
DtypeName = Literal[
    "float32", "float64", "float16", "bfloat16",
    "torch.float32", "torch.float64", "torch.float16", "torch.bfloat16",
]

_LAYER_RE = re.compile(r"(?:^|\.)(?:blocks|layers)\.(\d+)(?:\.|$)")
_RENAMES = {
    "hook_point": "hook_name",
    "hook_point_layer": "hook_layer",
    "hook_point_head_index": "hook_head_index",
}
_ACTIVATION_KEYS = ("activation_fn_str", "activation_fn")
_ALLOWED_ACTIVATION_FNS = ("relu", "topk")


class SAEMetadata(BaseModel):
    """Where the SAE reads the model; ``hook_layer`` is resolved from ``hook_name`` when absent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str | None = None
    hook_name: str | None = None
    hook_layer: int | None = Field(default=None, ge=0)
    hook_head_index: int | None = None
    extras: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _resolve_layer(self) -> SAEMetadata:
        parsed = layer_from_hook_name(self.hook_name)
        if self.hook_layer is not None and parsed is not None and parsed != self.hook_layer:
            raise ValueError(
                f"hook_layer {self.hook_layer} contradicts hook_name {self.hook_name!r} (layer {parsed}); "
                "they must agree"
            )
        if self.hook_layer is None and parsed is not None:
            object.__setattr__(self, "hook_layer", parsed)
        return self


class SAEConfigBase(BaseModel):
    """Fields shared by every architecture. ``norm_scaling_factor`` is a steerwatch extension:
    the dataset-derived factor for ``expected_average_only_in`` when it was not folded into the weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: str
    d_in: PositiveInt
    d_sae: PositiveInt
    dtype: DtypeName = "float32"
    apply_b_dec_to_input: bool = True
    normalize_activations: NormalizeMode = "none"
    reshape_activations: Literal["none", "hook_z"] = "none"
    finetuning_scaling_factor: bool = False
    norm_scaling_factor: float | None = Field(default=None, gt=0)
    metadata: SAEMetadata = Field(default_factory=SAEMetadata)
    extras: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_base(self) -> SAEConfigBase:
        if self.norm_scaling_factor is not None and not math.isfinite(self.norm_scaling_factor):
            raise ValueError("norm_scaling_factor must be a finite number > 0")
        if self.normalize_activations == "layer_norm" and self.d_in < 2:
            raise ValueError("normalize_activations 'layer_norm' needs d_in >= 2")
        return self

    @property
    def hook_layer(self) -> int | None:
        """The decoder layer whose output this SAE reads (steerwatch's hook index), or None when the
        file does not say. ``blocks.L.hook_resid_pre`` is the input of block L, i.e. the output of
        block L-1 (block 0's input, the embeddings, has no hook here: None)."""
        layer = self.metadata.hook_layer
        if layer is not None and (self.metadata.hook_name or "").endswith("hook_resid_pre"):
            return layer - 1 if layer > 0 else None
        return layer

    def to_cfg_dict(self) -> dict[str, Any]:
        """The SAELens-format dict (current layout) with every kept unknown key restored."""
        fields = self.model_dump(mode="json", exclude={"extras", "metadata"}, exclude_none=True)
        meta = self.metadata.model_dump(mode="json", exclude={"extras"}, exclude_none=True)
        return {**self.extras, **fields, "metadata": {**self.metadata.extras, **meta}}


def layer_from_hook_name(hook_name: str | None) -> int | None:
    """``"blocks.12.hook_resid_post"`` -> 12; ``None`` when no ``blocks.N``/``layers.N`` part."""
    if not hook_name:
        return None
    match = _LAYER_RE.search(hook_name)
    return int(match.group(1)) if match else None


def canonical_cfg(raw: dict[str, Any]) -> dict[str, Any]:
    """Translate a raw cfg dict (any SAELens version) into the current layout; ``metadata`` is a dict."""
    data = {_RENAMES.get(key, key): value for key, value in raw.items()}
    meta = _pop_metadata(data)
    for key in list(data):
        if key in SAEMetadata.model_fields and key != "extras":
            meta.setdefault(key, data.pop(key))
    data["architecture"] = _resolve_architecture(data)
    norm = data.get("normalize_activations", "none")
    if isinstance(norm, bool):
        data["normalize_activations"] = "expected_average_only_in" if norm else "none"
    elif norm is None:
        data["normalize_activations"] = "none"
    data["metadata"] = meta
    return data


def _pop_metadata(data: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key in ("metadata", "meta"):
        value = data.pop(key, None)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise invalid(f"{CFG_FILE}:{key}", f"must be a JSON object, got {type(value).__name__}")
        meta = {**value, **meta}
    return {_RENAMES.get(key, key): value for key, value in meta.items()}


def _resolve_architecture(data: dict[str, Any]) -> Any:
    """Apply the pre-6.0 ``activation_fn_str: "topk"`` convention; refuse unknown activation fns."""
    arch = data.get("architecture", "standard")
    for key in _ACTIVATION_KEYS:
        fn = data.get(key)
        if fn is None:
            continue
        if fn not in _ALLOWED_ACTIVATION_FNS:
            allowed = ", ".join(_ALLOWED_ACTIVATION_FNS)
            raise invalid(f"{CFG_FILE}:{key}", f"{fn!r} is not supported; allowed: {allowed}")
        if fn == "topk" and arch == "standard":
            kwargs = data.get("activation_fn_kwargs") or {}
            if not isinstance(kwargs, dict) or "k" not in kwargs:
                raise invalid(f"{CFG_FILE}:activation_fn_kwargs.k", "required when activation_fn is 'topk'")
            arch = "topk"
            data.setdefault("k", kwargs["k"])
    return arch


def build_config(cls: type[SAEConfigBase], data: dict[str, Any], source: str) -> SAEConfigBase:
    """Validate a canonical cfg dict against ``cls``; unknown keys go to ``extras``."""
    meta = dict(data.get("metadata", {}))
    meta_known = {k: meta.pop(k) for k in list(meta) if k in SAEMetadata.model_fields and k != "extras"}
    fields = set(cls.model_fields) - {"extras", "metadata"}
    known = {k: v for k, v in data.items() if k in fields}
    extras = {k: v for k, v in data.items() if k not in fields and k != "metadata"}
    payload = {**known, "metadata": {**meta_known, "extras": meta}, "extras": extras}
    try:
        return cls.model_validate(payload)
    except ValidationError as exc:
        raise config_error(exc, source) from None


def config_error(exc: ValidationError, source: str) -> InvalidArgument:
    """Turn the first pydantic error into an InvalidArgument naming ``cfg.json:<key>``."""
    first = exc.errors()[0]
    loc = ".".join(str(part) for part in first["loc"])
    field = f"{CFG_FILE}:{loc}" if loc else CFG_FILE
    message = str(first["msg"]).removeprefix("Value error, ")
    got = f" (got {first['input']!r})" if loc else ""
    return invalid(field, f"{message}{got}; in {source}")
