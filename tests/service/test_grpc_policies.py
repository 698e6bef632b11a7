"""PolicyService end to end: versions, get by version, list, delete, the default policy, and validation
errors (status code and a message naming the offending field)."""

from __future__ import annotations

import json

import grpc
import pytest

from service.protos import chat_pb2
from tests.service.grpc_harness import (
    N_LAYERS,
    STORES,
    add_steering,
    direction_monitor,
    policy_doc,
    random_vector,
    rig,
    rpc_error,
    run,
)


@pytest.mark.parametrize("store_kind", STORES)
def test_policy_versions_get_list_delete_and_default(store_kind: str) -> None:
    async def body() -> None:
        async with rig(store_kind) as r:
            c = r.client
            await c.upload_vector("v", {1: random_vector(1)})
            doc1 = policy_doc([direction_monitor("m", "v", 0.5)], description="first")
            doc2 = policy_doc([direction_monitor("m", "v", 0.7, action="annotate")], [add_steering("v", 1.5, [1])],
                              max_tokens=64, default_max_tokens=4)
            assert await c.list_policies() == []

            v1 = await c.put_policy("alpha", doc1)
            v2 = await c.put_policy("alpha", doc2, make_default=True)
            assert (v1.name, v1.version, v1.is_default, v1.tenant) == ("alpha", 1, False, "acme")
            assert (v2.version, v2.is_default) == (2, True)
            assert v2.updated_at_ms >= v1.updated_at_ms > 0

            # stored as the validated, normalized document
            stored1 = json.loads(v1.policy_json)
            assert stored1["description"] == "first" and stored1["monitors"][0]["threshold"] == 0.5
            assert stored1["monitors"][0]["aggregation"] == "max"  # defaults filled in
            stored2 = json.loads(v2.policy_json)
            assert stored2["steering"][0]["coef"] == 1.5 and stored2["limits"]["max_tokens"] == 64

            latest = await c.get_policy("alpha")
            assert (latest.version, latest.policy_json, latest.is_default) == (2, v2.policy_json, True)
            old = await c.get_policy("alpha", version=1)
            assert (old.version, old.policy_json, old.updated_at_ms) == (1, v1.policy_json, v1.updated_at_ms)
            assert old.is_default  # is_default is a property of the name, not of the version
            code, details = await rpc_error(c.get_policy("alpha", version=3))
            assert code == grpc.StatusCode.NOT_FOUND and details.startswith("name:"), details
            code, details = await rpc_error(c.get_policy("alpha", version=-1))
            assert code == INVALID and details.startswith("version:"), details

            beta = await c.put_policy("beta", policy_doc())
            assert beta.version == 1 and not beta.is_default
            listed = await c.list_policies()
            assert [(p.name, p.version, p.is_default) for p in listed] == [("alpha", 2, True), ("beta", 1, False)]

            # the default applies to requests naming no policy, with its limits
            res = await c.generate("Tell me a story", max_tokens=0)
            assert (res.final.policy, res.final.policy_version) == ("alpha", 2)
            assert res.final.usage.completion_tokens == 4  # limits.default_max_tokens of version 2
            assert [s.origin for s in res.final.steering] == ["policy"]
            code, details = await rpc_error(c.generate_call(max_tokens=65))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("sampling.max_tokens:")

            # moving the default
            await c.put_policy("beta", policy_doc(), make_default=True)
            assert [(p.name, p.is_default) for p in await c.list_policies()] == [("alpha", False), ("beta", True)]
            res = await c.generate("Tell me a story", max_tokens=2)
            assert (res.final.policy, res.final.policy_version, list(res.final.steering)) == ("beta", 2, [])

            # delete: every version goes, the default pointer with it
            assert (await c.delete_policy("beta")).deleted
            for call in (c.get_policy("beta"), c.get_policy("beta", version=1), c.delete_policy("beta")):
                code, details = await rpc_error(call)
                assert code == grpc.StatusCode.NOT_FOUND and "beta" in details
            assert [p.name for p in await c.list_policies()] == ["alpha"]
            res = await c.generate("Tell me a story", max_tokens=2)
            assert (res.final.policy, res.final.policy_version) == ("", 0)
            code, details = await rpc_error(c.generate_call(policy="beta"))
            assert code == grpc.StatusCode.NOT_FOUND and details.startswith("policy:")
            assert (await c.put_policy("beta", policy_doc())).version == 1  # history restarts after a delete

            # a named policy is used as stored now (the replica's cache follows puts)
            await c.put_policy("alpha", doc1)
            res = await c.generate("Tell me a story", max_tokens=2, policy="alpha")
            assert (res.final.policy_version, list(res.final.steering)) == (3, [])
    run(body())


INVALID = grpc.StatusCode.INVALID_ARGUMENT
CASES = [  # (policy_json, status, text the message must start with, text it must contain)
    ('{"monitors": [', INVALID, "policy_json:", "not valid JSON"),
    ("[1, 2]", INVALID, "policy_json:", "JSON object"),
    ('{"monitors": [], "color": "red"}', INVALID, "policy_json.color:", "Extra inputs"),
    (policy_doc([{**direction_monitor("m", "v", 0.1), "colour": 1}]), INVALID, "policy_json.monitors[0].colour:", ""),
    (policy_doc([direction_monitor("m", "v", 0.1, action="explode")]), INVALID, "policy_json.monitors[0].action:", ""),
    (policy_doc([direction_monitor("m", "v", 0.1, action="steer")]), INVALID, "policy_json.monitors[0].action:",
     "no steering entry names 'm'"),
    (policy_doc(max_tokens=0), INVALID, "policy_json.limits.max_tokens:", ""),
    (policy_doc([direction_monitor("m", "nope", 0.1)]), grpc.StatusCode.NOT_FOUND, "policy_json.monitors[0].source:",
     "'nope'"),
    (policy_doc([], [add_steering("v", 1.0), add_steering("nope", 1.0)]), grpc.StatusCode.NOT_FOUND,
     "policy_json.steering[1].vector:", "'nope'"),
    # over the policy's own coefficient limit: the document contradicts itself
    (policy_doc([], [add_steering("v", 5.0)]), INVALID, "policy_json", "steering[0].coef"),
    # within the policy's limit but over the server's (limits.max_abs_coef = 16)
    (policy_doc([], [add_steering("v", 20.0)], max_abs_coef=50), grpc.StatusCode.RESOURCE_EXHAUSTED,
     "policy_json.steering[0].coef:", "16"),
]


def test_put_policy_validation_errors() -> None:
    async def body() -> None:
        async with rig("memory") as r:
            c = r.client
            await c.upload_vector("v", {1: random_vector(1)})
            for doc, code, prefix, fragment in CASES:
                got, details = await rpc_error(c.put_policy("p", doc))
                assert (got, details.startswith(prefix), fragment in details) == (code, True, True), (doc, details)
            code, details = await rpc_error(c.put_policy("bad name!", policy_doc()))
            assert code == INVALID and details.startswith("name:"), details
            code, details = await rpc_error(c.put_policy("", policy_doc()))
            assert code == INVALID and details.startswith("name:"), details
            # nothing was stored by the refused puts; a good one after them gets version 1
            assert await c.list_policies() == []
            assert (await c.put_policy("p", policy_doc([direction_monitor("m", "v", 0.1)]))).version == 1
            res = await c.generate("Tell me a story", max_tokens=2, policy="p")
            assert res.final.finish_reason == chat_pb2.FINISH_REASON_LENGTH
    run(body())


def test_put_policy_layer_out_of_range_names_the_layer_field() -> None:
    async def body() -> None:
        async with rig("memory") as r:
            c = r.client
            await c.upload_vector("v", {1: random_vector(1)})
            code, details = await rpc_error(c.put_policy("p", policy_doc([], [add_steering("v", 1.0, [N_LAYERS])])))
            assert code == INVALID and "layers" in details and f"{N_LAYERS}" in details, details
            code, details = await rpc_error(c.put_policy("p", policy_doc([direction_monitor("m", "v", 0.1, layer=9)])))
            assert code == INVALID and "layer" in details and "9" in details, details
            code, details = await rpc_error(c.put_policy("p", policy_doc([direction_monitor("m", "v", 0.1, layer=-1)])))
            assert code == INVALID and "layer" in details, details
            assert await c.list_policies() == []
    run(body())


def test_put_policy_layer_errors_name_policy_fields() -> None:
    async def body() -> None:
        async with rig("memory") as r:
            c = r.client
            await c.upload_vector("v", {1: random_vector(1)})
            doc = policy_doc([direction_monitor("ok", "v", 0.1), direction_monitor("m", "v", 0.1, layer=9)],
                             [add_steering("v", 1.0), add_steering("v", 1.0, [N_LAYERS])])
            _, details = await rpc_error(c.put_policy("p", doc))
            assert details.startswith("policy_json.steering[1].layers:"), details  # the policy's field, not edits[1]
            _, details = await rpc_error(c.put_policy("p", policy_doc([direction_monitor("ok", "v", 0.1),
                                                                       direction_monitor("m", "v", 0.1, layer=9)])))
            assert details.startswith("policy_json.monitors[1].layer:"), details
    run(body())
