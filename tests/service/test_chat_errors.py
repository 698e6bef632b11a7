"""Errors from the merged spec are reported in the terms the client used (policy entry or request entry)."""

from __future__ import annotations

from service.engines.types import GenerationRequest
from service.policy import MonitorRule
from service.servicers.chat import Prepared, _in_request_terms
from steering.errors import InvalidArgument, LimitExceeded, NotFound


def prepared(n_policy_edits: int, n_request_edits: int, policy_monitors: int, request_monitors: int) -> Prepared:
    rules = [MonitorRule(name=f"p{i}", kind="probe", source="x", threshold=0) for i in range(policy_monitors)]
    rules += [MonitorRule(name=f"r{i}", kind="probe", source="x", threshold=0) for i in range(request_monitors)]
    return Prepared(GenerationRequest(prompt="x"), rules, ["policy"] * n_policy_edits + ["request"] * n_request_edits,
                    "pol", 1, {f"r{i}" for i in range(request_monitors)})


def test_edit_errors_name_the_policy_or_request_entry():
    p = prepared(2, 2, 0, 0)
    e = _in_request_terms(InvalidArgument("edits[1].layers: 9 is out of range; allowed 0..2", field="edits[1].layers"), p)
    assert isinstance(e, InvalidArgument) and e.field == "policy.steering[1].layers"
    assert str(e).startswith("policy.steering[1].layers: 9 is out of range")
    e = _in_request_terms(LimitExceeded("edits[3].coef: too big", field="edits[3].coef"), p)
    assert isinstance(e, LimitExceeded) and e.field == "steering[1].coef"


def test_read_errors_name_the_monitor_and_others_pass_through():
    p = prepared(0, 0, 1, 2)
    e = _in_request_terms(NotFound("reads[2].source: no probe", field="reads[2].source"), p)
    assert e.field == "monitors[1].source" and isinstance(e, NotFound)
    other = InvalidArgument("prompt: empty", field="prompt")
    assert _in_request_terms(other, p) is other
