"""Tenant policies: the JSON document admins store, validated, and how a request is resolved against it.

A policy lists monitors (which reader, threshold, how per-token scores are aggregated, what to do when
it fires), steering entries, and limits on what requests may add. Vector ids in a policy are the
tenant's own; the resolver scopes them (``<tenant>/<id>``) before they reach the shared registry, so a
tenant can never name another tenant's vector.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from monitors.rules import RuleSpec
from service.pack import is_pack_id
from steering.errors import InvalidArgument, LimitExceeded, SteerwatchError, invalid
from steering.registry import ID_PATTERN
from steering.spec import (
    MAX_GATES,
    AblateEdit,
    AddEdit,
    ClampEdit,
    Edit,
    GateSpec,
    InterventionSpec,
    ReadSpec,
    printable,
)

Action = Literal["annotate", "alert", "stop", "steer"]
ACTIONS = ("annotate", "alert", "stop", "steer")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class MonitorRule(RuleSpec):
    """A reading plus the rule that turns its per-token scores into alerts (see monitors.rules)."""

    name: str = Field(min_length=1, max_length=64, description="label in readings, alerts and metrics")
    kind: Literal["probe", "direction", "sae_feature"]
    source: str = Field(description="probe id, the tenant's vector id (direction) or SAE id")
    layer: int | None = Field(None, description="layer; default: the source's own layer")
    feature: int | None = Field(None, ge=0, description="SAE feature (sae_feature only)")
    metric: Literal["dot", "cosine"] = "dot"
    action: Action = Field("alert", description="annotate (in-band), alert (+ alert stream), stop (+ end the "
                           "stream), steer (+ switch on the steering entries whose `when` names this monitor)")
    explain: bool = Field(False, description="attribute the score to prompt tokens when this monitor fires "
                          "(one extra forward and backward pass; reported in the final record)")

    @field_validator("name")
    @classmethod
    def _printable(cls, v: str) -> str:
        return printable(v)

    @property
    def spec(self) -> RuleSpec:
        """The rule's parameters (a MonitorRule is a RuleSpec: itself, read per token without a copy)."""
        return self


MAX_ENTRIES = 32  # monitors, and steering entries, per policy


class PolicyLimits(_Strict):
    """What requests under this policy may do."""

    max_abs_coef: float = Field(4.0, gt=0, le=1000, description="largest |coef| of an addition")
    max_tokens: int = Field(256, ge=1, le=32768, description="cap on a request's max_tokens")
    default_max_tokens: int = Field(128, ge=1, le=32768, description="max_tokens when the request gives none")
    allow_request_steering: bool = Field(True, description="requests may add steering entries")
    allow_request_monitors: bool = Field(True, description="requests may add monitors")
    allowed_vectors: list[Annotated[str, Field(pattern=ID_PATTERN.pattern)]] | None = Field(
        None, max_length=256, description="vector ids requests may use (at most 256); null = any of the tenant's")


class Policy(_Strict):
    """A tenant policy document."""

    description: str = Field("", max_length=1000)
    monitors: list[MonitorRule] = Field(default_factory=list, max_length=MAX_ENTRIES)
    steering: list[Annotated[AddEdit | AblateEdit | ClampEdit, Field(discriminator="kind")]] = Field(
        default_factory=list, max_length=MAX_ENTRIES)
    limits: PolicyLimits = Field(default_factory=PolicyLimits)

    @model_validator(mode="after")
    def _consistent(self) -> Policy:
        names = [m.name for m in self.monitors]
        if len(set(names)) != len(names):
            raise ValueError(f"monitor names must be unique; got {names}")
        check_gates(self.monitors, self.steering)
        if self.limits.default_max_tokens > self.limits.max_tokens:
            raise ValueError("limits.default_max_tokens must not exceed limits.max_tokens")
        for i, e in enumerate(self.steering):
            if isinstance(e, AddEdit) and abs(e.coef) > self.limits.max_abs_coef:
                raise ValueError(f"steering[{i}].coef {e.coef} is beyond limits.max_abs_coef {self.limits.max_abs_coef}")
        return self


def check_gates(monitors: list[MonitorRule], steering: list, *, n_policy_monitors: int = 0,
                n_policy_steering: int = 0) -> None:
    """Every `when` names a monitor whose action is steer, and every steer monitor switches something.

    When checking a policy merged with a request's additions, the ``n_policy_*`` first entries are the
    policy's: errors then name ``policy.steering[i]`` for those and ``steering[j]`` for the request's."""

    def name(kind: str, i: int, n_policy: int) -> str:
        return f"policy.{kind}[{i}]" if i < n_policy else f"{kind}[{i - n_policy}]"

    steer = [m.name for m in monitors if m.action == "steer"]
    if len(steer) > MAX_GATES:
        raise ValueError(f"monitors: at most {MAX_GATES} may have action 'steer'; got {len(steer)}")
    used = set()
    for i, e in enumerate(steering):
        if e.when is not None:
            if e.when not in steer:
                raise ValueError(f"{name('steering', i, n_policy_steering)}.when: {e.when!r} is not a monitor "
                                 f"with action 'steer'; allowed: {steer}")
            used.add(e.when)
    for i, m in enumerate(monitors):
        if m.action == "steer" and m.name not in used:
            raise ValueError(f"{name('monitors', i, n_policy_monitors)}.action: 'steer' but no steering entry "
                             f"names {m.name!r} in `when`")


EMPTY_POLICY = Policy()


def parse_policy(document: str) -> Policy:
    """Validate a policy JSON document; errors name the JSON path and the rule."""
    try:
        raw = json.loads(document)
    except json.JSONDecodeError as exc:
        raise invalid("policy_json", f"is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from exc
    except RecursionError as exc:  # the decoder recurses per level: '[[[[...' thousands deep
        raise invalid("policy_json", "nests too deeply to parse; a policy is a few levels deep") from exc
    except ValueError as exc:  # an integer literal beyond Python's int conversion limit (4300 digits)
        raise invalid("policy_json", f"is not valid JSON ({str(exc).partition(':')[0]})") from exc
    if not isinstance(raw, dict):
        raise invalid("policy_json", "must be a JSON object")
    for key in ("monitors", "steering"):  # refused before validating a million entries one by one
        entries = raw.get(key)
        if isinstance(entries, list) and len(entries) > MAX_ENTRIES:
            raise invalid(f"policy_json.{key}", f"has {len(entries)} entries; allowed at most {MAX_ENTRIES}")
    bad = _lone_surrogate(raw)
    if bad is not None:  # JSON escapes can spell what UTF-8 cannot, and what could not be stored
        raise invalid(f"policy_json{bad}", "contains a lone surrogate (a \\ud800..\\udfff escape); text must be "
                      "valid Unicode")
    try:
        return Policy.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        path, msg = _path(first["loc"]), first["msg"].removeprefix("Value error, ")
        named = re.match(r"^(\w+(?:\[\d+\])?(?:\.\w+)*): (.*)$", msg, re.S)
        if not path and named:  # a whole-document check names the entry in its message
            path, msg = f".{named.group(1)}", named.group(2)
        raise invalid(f"policy_json{path}", msg) from exc


def _lone_surrogate(raw: object) -> str | None:
    """The JSON path of the first string (value or key) holding a lone UTF-16 surrogate, else None."""
    stack: list[tuple[object, str]] = [(raw, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return path
        elif isinstance(value, dict):
            if any(_SURROGATE.search(k) for k in value):
                return path
            stack.extend(reversed([(v, path + _path((k,))) for k, v in value.items()]))
        elif isinstance(value, list):
            stack.extend(reversed([(v, f"{path}[{i}]") for i, v in enumerate(value)]))
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")


def _path(loc: tuple[int | str, ...]) -> str:
    """('monitors', 0, 'action') -> '.monitors[0].action'; a steering entry's union tag is not a key of
    the document, so ('steering', 0, 'add', 'coef') -> '.steering[0].coef'; ('a b',) -> '["a b"]'."""
    if len(loc) > 2 and loc[0] == "steering" and loc[2] in ("add", "ablate", "clamp"):
        loc = loc[:2] + loc[3:]
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" if _KEY.fullmatch(p) else f"[{json.dumps(p)}]"
                   for p in loc)


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # other keys are quoted: policy_json["a b"], policy_json[""]


def rename_field(exc: SteerwatchError, rename: Callable[[str, int], str]) -> SteerwatchError:
    """Re-point an error that names ``edits[i]``/``reads[i]`` of a merged spec at the entry the client
    wrote: ``rename("edits", i)`` returns e.g. ``policy.steering[1]`` or ``steering[0]``."""
    match = re.match(r"^(edits|reads)\[(\d+)\](.*)$", exc.field or "")
    if match is None:
        return exc
    field = rename(match.group(1), int(match.group(2))) + match.group(3)
    return type(exc)(str(exc).replace(exc.field or "", field, 1), field=field)


def scoped(tenant: str, vector_id: str) -> str:
    """The registry key of a tenant's vector; the monitor pack's shared ids (``pack:``) stay as they are."""
    return vector_id if is_pack_id(vector_id) else f"{tenant}/{vector_id}"


def resolve(policy: Policy, tenant: str, extra_edits: list[Edit], extra_monitors: list[MonitorRule],
            ) -> tuple[InterventionSpec, list[MonitorRule], list[str]]:
    """Merge the policy with a request's additions, enforcing the policy's limits.

    Returns the spec for the engine (vector ids scoped to the tenant), every monitor rule in force, and
    the origin ("policy" or "request") of each edit in spec order.
    """
    lim = policy.limits
    if extra_edits and not lim.allow_request_steering:
        raise InvalidArgument("steering: this policy does not allow per-request steering", field="steering")
    if extra_monitors and not lim.allow_request_monitors:
        raise InvalidArgument("monitors: this policy does not allow per-request monitors", field="monitors")
    for i, e in enumerate(extra_edits):
        _check_request_edit(e, lim, f"steering[{i}]")
    monitors = list(policy.monitors) + list(extra_monitors)
    names = [m.name for m in monitors]
    if len(set(names)) != len(names):
        raise invalid("monitors", f"names must be unique across the policy and the request; got {names}")
    try:
        check_gates(monitors, [*policy.steering, *extra_edits], n_policy_monitors=len(policy.monitors),
                    n_policy_steering=len(policy.steering))
    except ValueError as exc:
        field, _, msg = str(exc).partition(": ")
        raise invalid(field, msg) from exc
    edits = [_scope_edit(e, tenant) for e in [*policy.steering, *extra_edits]]
    reads = [read_of(m, tenant) for m in monitors]
    gates = [GateSpec(name=m.name, reading=m.name, **m.model_dump(include=set(RuleSpec.model_fields)))
             for m in monitors if m.action == "steer"]
    origins = ["policy"] * len(policy.steering) + ["request"] * len(extra_edits)
    return InterventionSpec(edits=edits, reads=reads, gates=gates), monitors, origins


def _check_request_edit(e: Edit, lim: PolicyLimits, where: str) -> None:
    if isinstance(e, AddEdit) and abs(e.coef) > lim.max_abs_coef:
        raise LimitExceeded(f"{where}.coef: {e.coef} is beyond the policy's limit; allowed "
                            f"-{lim.max_abs_coef}..{lim.max_abs_coef}", field=f"{where}.coef")
    vector = getattr(e, "vector", None)
    if vector is not None and lim.allowed_vectors is not None and vector not in lim.allowed_vectors:
        raise invalid(f"{where}.vector_id", f"{vector!r} is not allowed by the policy; allowed: {lim.allowed_vectors}")


def _scope_edit(e: Edit, tenant: str) -> Edit:
    if isinstance(e, AddEdit | AblateEdit):
        return e.model_copy(update={"vector": scoped(tenant, e.vector)})
    return e


def read_of(m: MonitorRule, tenant: str) -> ReadSpec:
    source = scoped(tenant, m.source) if m.kind == "direction" else m.source
    return ReadSpec(name=m.name, kind=m.kind, source=source, layer=m.layer, feature=m.feature, metric=m.metric)


def unscoped(key: str) -> str:
    """The tenant-facing id of a scoped registry key (for audit records)."""
    return key.split("/", 1)[1] if "/" in key else key
