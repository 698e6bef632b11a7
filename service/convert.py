"""Proto messages <-> domain objects, at the edge of the service (proto types stop here).

Every conversion names the proto field path in its errors (``steering[1].coef``), since that is
what the client sent.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from service.engines.types import Message, Sampling
from service.policy import MonitorRule, PolicyLimits, unscoped
from service.protos import chat_pb2, common_pb2
from steering.errors import invalid
from steering.spec import AblateEdit, AddEdit, ClampEdit, Edit

PHASES = {common_pb2.PHASE_UNSPECIFIED: "both", common_pb2.PHASE_PROMPT: "prompt",
          common_pb2.PHASE_GENERATION: "generation", common_pb2.PHASE_BOTH: "both"}
ROLES = {chat_pb2.ROLE_SYSTEM: "system", chat_pb2.ROLE_USER: "user", chat_pb2.ROLE_ASSISTANT: "assistant"}
FINISH = {"stop": chat_pb2.FINISH_REASON_STOP, "length": chat_pb2.FINISH_REASON_LENGTH,
          "stop_string": chat_pb2.FINISH_REASON_STOP_STRING, "policy": chat_pb2.FINISH_REASON_POLICY,
          "cancelled": chat_pb2.FINISH_REASON_CANCELLED, "error": chat_pb2.FINISH_REASON_ERROR}


def build(model: type[BaseModel], where: str, **fields: Any) -> Any:
    """Construct a pydantic model; the first validation error becomes InvalidArgument on ``where.field``."""
    try:
        return model(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise invalid(f"{where}.{loc}" if loc else where, err["msg"].removeprefix("Value error, ")) from exc


def _phase(value: int, where: str) -> str:
    """A Phase enum value; proto3 enums are open, so a client may send any int32."""
    if value not in PHASES:
        names = ", ".join(common_pb2.Phase.Name(v) for v in sorted(PHASES))
        raise invalid(f"{where}.phase", f"{value} is not a Phase; allowed {names}")
    return PHASES[value]


def edits_from_proto(entries: Any) -> list[Edit]:
    """Request steering entries (tenant vector ids, not yet scoped)."""
    return [_edit(e, f"steering[{i}]") for i, e in enumerate(entries)]


def _edit(e: Any, where: str) -> Edit:
    kind = e.WhichOneof("edit")
    when = e.when or None
    if kind == "add":
        a = e.add
        return build(AddEdit, where, vector=a.vector_id, coef=a.coef, layers=list(a.layers) or None,
                     phase=_phase(a.phase, where), when=when)
    if kind == "ablate":
        b = e.ablate
        layers: Any = "all" if b.all_layers else list(b.layers)
        return build(AblateEdit, where, vector=b.vector_id, layers=layers, phase=_phase(b.phase, where), when=when)
    if kind == "clamp":
        c = e.clamp
        return build(ClampEdit, where, sae=c.sae_id, feature=c.feature, value=c.value,
                     mode="max_multiple" if c.max_multiple else "absolute",
                     layer=c.layer if c.has_layer else None, phase=_phase(c.phase, where), when=when)
    raise invalid(where, "names no edit; set one of add, ablate, clamp")


def monitors_from_proto(items: Any) -> list[MonitorRule]:
    """Request monitors; zero values mean the rule's defaults (proto3 has no presence for scalars)."""
    return [build(MonitorRule, f"monitors[{i}]", name=m.name, kind=m.kind, source=m.source,
                  layer=m.layer if m.has_layer else None, feature=m.feature if m.kind == "sae_feature" else None,
                  threshold=m.threshold, action=m.action or "annotate", aggregation=m.aggregation or "max",
                  window=m.window or 1, alpha=m.alpha or 0.5, count=m.count or 1, hysteresis=m.hysteresis,
                  scope=m.scope or "generation", metric=m.metric or "dot", explain=m.explain)
            for i, m in enumerate(items)]


def sampling_from_proto(sp: Any, limits: PolicyLimits) -> Sampling:
    """Sampling with the policy's token cap applied (over the cap is an error, not a silent clip)."""
    max_tokens = sp.max_tokens or limits.default_max_tokens
    if max_tokens > limits.max_tokens:
        raise invalid("sampling.max_tokens", f"{max_tokens} is beyond the policy's limit; allowed 1..{limits.max_tokens}")
    return build(Sampling, "sampling", temperature=sp.temperature, top_p=sp.top_p or 1.0, top_k=sp.top_k,
                 max_tokens=max_tokens, stop=list(sp.stop), seed=sp.seed if sp.has_seed else None)


def prompt_from_proto(req: Any) -> str | list[Message]:
    if req.messages:
        out = []
        for i, m in enumerate(req.messages):
            if m.role not in ROLES:
                raise invalid(f"messages[{i}].role", "must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT")
            if not m.content:
                raise invalid(f"messages[{i}].content", "must not be empty")
            out.append(Message(role=ROLES[m.role], content=m.content))
        return out
    if not req.prompt:
        raise invalid("prompt", "is empty; send messages or a prompt")
    return str(req.prompt)


def applied_to_proto(applied: list[dict[str, Any]], origins: list[str]) -> list[Any]:
    out = []
    for entry, origin in zip(applied, origins, strict=False):
        source = entry.get("vector") or entry.get("sae", "")
        out.append(common_pb2.AppliedSteering(
            kind=entry["kind"], source=unscoped(source), value=float(entry.get("coef", entry.get("target", 0.0))),
            layers=entry.get("layers", []), phase=entry.get("phase", "both"), feature=int(entry.get("feature", 0)),
            origin=origin, when=entry.get("when", "")))
    return out
