"""Tenant isolation through the API: policies, vectors and alerts of one tenant are invisible and
unusable to another; naming another tenant needs an admin key."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from service.protos import alert_pb2, chat_pb2, model_pb2, policy_pb2, vector_pb2
from tests.service.grpc_harness import (
    STORES,
    Client,
    Watcher,
    add_entry,
    add_steering,
    direction_monitor,
    eventually,
    live_watch,
    monitor_spec,
    policy_doc,
    random_vector,
    rig,
    rpc_error,
    run,
)

NOT_FOUND, DENIED = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED
FIRES = -1e9  # every token exceeds it


def _tenant_scoped_rpcs() -> set[str]:
    """Every RPC of the API whose request message has a ``tenant`` field (from the proto descriptors)."""
    out = set()
    for module in (chat_pb2, policy_pb2, vector_pb2, alert_pb2, model_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            out |= {m.name for m in service.methods if "tenant" in m.input_type.fields_by_name}
    return out


TENANT_SCOPED_RPCS = _tenant_scoped_rpcs()


async def _acting_for(c: Client, tenant: str) -> list[tuple[str, grpc.StatusCode, str]]:
    """Every tenant-scoped RPC naming ``tenant``: (rpc, code, details) of each failure."""
    calls = {
        "PutPolicy": c.put_policy("x", policy_doc(), tenant=tenant),
        "GetPolicy": c.get_policy("a-policy", tenant=tenant),
        "ListPolicies": c.list_policies(tenant=tenant),
        "DeletePolicy": c.delete_policy("a-policy", tenant=tenant),
        "UploadVector": c.upload_vector("x", {1: random_vector(1)}, tenant=tenant),
        "GetVector": c.get_vector("va", tenant=tenant),
        "ListVectors": c.list_vectors(tenant=tenant),
        "DeleteVector": c.delete_vector("va", tenant=tenant),
        "WatchAlerts": c.watch(after_id="0", tenant=tenant),
        "CreateVectorFromPairs": c.vectors.CreateVectorFromPairs(vector_pb2.CreateVectorFromPairsRequest(
            vector_id="x", layers=[1], pairs=[vector_pb2.TextPair(positive="yes", negative="no")], tenant=tenant),
            metadata=c.md()),
    }
    assert set(calls) == TENANT_SCOPED_RPCS, "every RPC whose request names a tenant must be checked here"
    out = []
    for name, call in calls.items():
        code, details = await rpc_error(call)
        out.append((name, code, details))
    return out


@pytest.mark.parametrize("store_kind", STORES)
def test_tenants_are_isolated(store_kind: str) -> None:
    async def body() -> None:
        async with rig(store_kind) as r:
            a = r.client  # tenant "acme"
            b = await r.tenant_client("bravo")
            await a.upload_vector("va", {1: random_vector(1)})
            await a.put_policy("a-policy", policy_doc([direction_monitor("m", "va", FIRES, action="alert")],
                                                      [add_steering("va", 2.0, [1])]), make_default=True)
            b_watch = await live_watch(r.store, "bravo", b.watch())
            a_watch = await live_watch(r.store, "acme", a.watch())

            # B sees nothing of A's, and what B names of A's does not exist for B
            assert await b.list_policies() == [] and await b.list_vectors() == []
            for call in (b.get_policy("a-policy"), b.delete_policy("a-policy"), b.get_vector("va"),
                         b.delete_vector("va"), b.generate_call(policy="a-policy"),
                         b.generate_call(steering=[add_entry("va", 1.0)]),
                         b.generate_call(monitors=[monitor_spec("m", "va", 0.0)]),
                         b.put_policy("b-policy", policy_doc([], [add_steering("va", 1.0)]))):
                code, details = await rpc_error(call)
                assert code == NOT_FOUND, details
            res = await b.generate("abc", 4)  # A's default policy is not B's
            assert (res.final.policy, list(res.final.steering), res.alerts) == ("", [], [])

            # a tenant key naming another tenant (even a made-up one) is refused outright
            for other in ("acme", "nobody"):
                for name, code, details in await _acting_for(b, other):
                    assert (code, details.startswith("tenant:")) == (DENIED, True), (name, details)

            # A's generation raises alerts on A's stream only
            res = await a.generate("abc", 4)
            assert res.alerts and all(x.action == "alert" for x in res.alerts)
            await eventually(lambda: len(a_watch.got) == len(res.alerts), "A's watch")
            await asyncio.sleep(0.1)
            assert a_watch.got == list(res.alerts)
            assert b_watch.got == [] and b_watch.error is None
            assert {x.fields["monitor"] for x in await r.store.read_alerts("bravo")} == {"marker"}

            # A's things are all still there
            assert [p.name for p in await a.list_policies()] == ["a-policy"]
            assert [v.vector_id for v in await a.list_vectors()] == ["va"]
            await a_watch.close()
            await b_watch.close()
    run(body())


@pytest.mark.parametrize("store_kind", STORES)
def test_admin_key_acts_for_a_tenant(store_kind: str) -> None:
    async def body() -> None:
        async with rig(store_kind) as r:
            a = r.client
            admin = await r.tenant_client("ops", role="admin")
            info = await admin.upload_vector("va", {1: random_vector(1)}, tenant="acme")
            assert info.vector_id == "va"
            record = await admin.put_policy("by-admin", policy_doc([direction_monitor("m", "va", FIRES)],
                                                                   [add_steering("va", 1.0)]),
                                            make_default=True, tenant="acme")
            assert (record.tenant, record.version, record.is_default) == ("acme", 1, True)
            # the tenant sees and uses what the admin made for it
            assert (await a.get_policy("by-admin")).policy_json == record.policy_json
            assert [v.vector_id for v in await a.list_vectors()] == ["va"]
            watch = Watcher(admin.watch(after_id="0", tenant="acme"))
            res = await a.generate("abc", 3)
            assert res.final.policy == "by-admin" and [s.source for s in res.final.steering] == ["va"]
            assert res.alerts
            await eventually(lambda: len(watch.got) == len(res.alerts), "the admin's watch of acme")
            assert watch.got == list(res.alerts)
            await watch.close()
            # the admin's own tenant stays separate
            assert await admin.list_policies() == [] and await admin.list_vectors() == []
            assert [p.name for p in await admin.list_policies(tenant="acme")] == ["by-admin"]
            assert (await admin.get_vector("va", tenant="acme")).vector_id == "va"
            assert (await admin.delete_policy("by-admin", tenant="acme")).deleted
            assert (await admin.delete_vector("va", tenant="acme")).deleted
            assert await a.list_policies() == [] and await a.list_vectors() == []
            res = await a.generate("abc", 2)
            assert res.final.policy == "" and res.final.finish_reason == chat_pb2.FINISH_REASON_LENGTH
    run(body())


def test_batched_tenants_do_not_share_steering() -> None:
    """Generations of two tenants decoded in one batch: each gets exactly its own steering."""
    async def body() -> None:
        async with rig("memory") as r:
            a = r.client
            b = await r.tenant_client("bravo")
            await a.upload_vector("v", {1: random_vector(1, 3.0)})
            await a.put_policy("steer", policy_doc([], [add_steering("v", 4.0)]), make_default=True)
            solo_a = await a.generate("zzz", 30)
            solo_b = await b.generate("zzz", 30)
            assert solo_a.token_ids != solo_b.token_ids  # A's steering matters
            peak = 0

            async def sample() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, r.app.engine.running)
                    await asyncio.sleep(0.001)

            sampler = asyncio.ensure_future(sample())
            for _ in range(2):
                both = await asyncio.gather(a.generate("zzz", 30), b.generate("zzz", 30), a.generate("abc", 30))
                assert both[0].token_ids == solo_a.token_ids
                assert both[1].token_ids == solo_b.token_ids and list(both[1].final.steering) == []
                assert [s.source for s in both[2].final.steering] == ["v"]
            sampler.cancel()
            assert peak >= 2  # the premise: they really were decoded together
    run(body())
