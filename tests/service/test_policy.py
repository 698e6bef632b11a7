"""Policy documents: validation with field paths, limits on request additions, tenant scoping."""

from __future__ import annotations

import json

import pytest

from service.policy import MonitorRule, parse_policy, resolve
from steering.errors import InvalidArgument, LimitExceeded
from steering.spec import AblateEdit, AddEdit

GOOD = {
    "monitors": [{"name": "deception", "kind": "probe", "source": "deception-probe", "threshold": 0.8, "action": "stop"},
                 {"name": "weddings", "kind": "direction", "source": "w", "layer": 6, "threshold": 500}],
    "steering": [{"kind": "add", "vector": "polite", "coef": 1.5, "layers": [6]},
                 {"kind": "ablate", "vector": "refusal"}],
    "limits": {"max_abs_coef": 2.0, "max_tokens": 64, "default_max_tokens": 32, "allowed_vectors": ["polite", "w"]},
}


def test_valid_policy_round_trips():
    p = parse_policy(json.dumps(GOOD))
    assert parse_policy(p.model_dump_json()) == p
    assert p.monitors[0].action == "stop" and p.limits.max_tokens == 64


@pytest.mark.parametrize("doc, field", [
    ("{not json", "policy_json"),
    ("[1, 2]", "policy_json"),
    (json.dumps({"monitors": [{"name": "x", "kind": "probe", "source": "p"}]}), "policy_json.monitors[0].threshold"),
    (json.dumps({"steering": [{"kind": "add", "vector": "v", "coef": 9}]}), "policy_json"),
    (json.dumps({"steering": [{"kind": "teleport"}]}), "policy_json.steering[0]"),
    (json.dumps({"limits": {"max_tokens": 0}}), "policy_json.limits.max_tokens"),
    (json.dumps({"surprise": 1}), "policy_json.surprise"),
    (json.dumps({"monitors": [{"name": "x", "kind": "probe", "source": "p", "threshold": 1, "action": "steer"}]}),
     "policy_json.monitors[0].action"),
    (json.dumps({"steering": [{"kind": "add", "vector": "v", "coef": 1, "when": "x"}]}), "policy_json.steering[0].when"),
    (json.dumps({"monitors": [{"name": "x", "kind": "probe", "source": "p", "threshold": 1, "aggregation": "count",
                               "window": 2, "count": 3}]}), "policy_json.monitors[0]"),
    (json.dumps({"monitors": [{"name": "x", "kind": "probe", "source": "p", "threshold": 1, "aggregation": "ema",
                               "alpha": 0}]}), "policy_json.monitors[0].alpha"),
    ('{"monitors": [{"name": "x", "kind": "probe", "source": "p", "threshold": NaN}]}', "policy_json.monitors[0].threshold"),
])
def test_malformed_policies_name_the_field(doc, field):
    with pytest.raises(InvalidArgument) as info:
        parse_policy(doc)
    assert str(info.value).startswith(field), str(info.value)


def test_resolve_scopes_vectors_to_the_tenant_and_orders_origins():
    p = parse_policy(json.dumps(GOOD))
    extra = [AddEdit(vector="w", coef=-1.0, layers=[3])]
    spec, rules, origins = resolve(p, "acme", extra, [])
    assert [getattr(e, "vector", None) for e in spec.edits] == ["acme/polite", "acme/refusal", "acme/w"]
    assert origins == ["policy", "policy", "request"]
    assert [r.source for r in spec.reads] == ["deception-probe", "acme/w"]  # probes are global, directions scoped
    assert [r.name for r in rules] == ["deception", "weddings"]


def test_request_additions_obey_the_policy_limits():
    p = parse_policy(json.dumps(GOOD))
    with pytest.raises(LimitExceeded, match=r"^steering\[0\]\.coef"):
        resolve(p, "t", [AddEdit(vector="polite", coef=3.0)], [])
    with pytest.raises(InvalidArgument, match=r"^steering\[0\]\.vector_id.*not allowed"):
        resolve(p, "t", [AblateEdit(vector="other")], [])
    dup = MonitorRule(name="deception", kind="probe", source="p", threshold=0.1)
    with pytest.raises(InvalidArgument, match="unique"):
        resolve(p, "t", [], [dup])
    locked = parse_policy(json.dumps({"limits": {"allow_request_steering": False, "allow_request_monitors": False}}))
    with pytest.raises(InvalidArgument, match="^steering"):
        resolve(locked, "t", [AddEdit(vector="v", coef=1.0)], [])
    with pytest.raises(InvalidArgument, match="^monitors"):
        resolve(locked, "t", [], [dup])


def test_gate_errors_name_the_clients_own_entry():
    steer = {"name": "g", "kind": "probe", "source": "p", "threshold": 0.5, "action": "steer"}
    p = parse_policy(json.dumps({"monitors": [steer],
                                 "steering": [{"kind": "add", "vector": "v", "coef": 1, "when": "g"}]}))
    with pytest.raises(InvalidArgument) as info:
        resolve(p, "acme", [AddEdit(vector="w", coef=1.0, when="nope")], [])
    assert info.value.field == "steering[0].when"  # the request's first entry, not the merged list's second
    extra = MonitorRule(name="h", kind="probe", source="p", threshold=0.5, action="steer")
    with pytest.raises(InvalidArgument) as info:
        resolve(p, "acme", [], [extra])
    assert info.value.field == "monitors[0].action"
    spec, _, _ = resolve(p, "acme", [AddEdit(vector="w", coef=1.0, when="g")], [])
    assert [g.name for g in spec.gates] == ["g"] and spec.edits[1].when == "g"
