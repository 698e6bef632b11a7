"""VectorService end to end: upload, CreateVectorFromPairs (parity with steering.extract.mean_difference
run in-process), get/list/delete, replace, and every validation error."""

from __future__ import annotations

import math
import time

import grpc
import pytest
import torch

from service.models import encode_prompt
from service.protos import vector_pb2
from steering.extract import mean_difference
from steering.vectors import vector_from_bytes
from tests.service.grpc_harness import (
    D_MODEL,
    MODEL_NAME,
    N_LAYERS,
    STORES,
    Client,
    add_entry,
    engine_idle,
    random_vector,
    rig,
    rpc_error,
    run,
    tiny_lm,
)

PAIRS = [("I love this, it is wonderful", "I hate this, it is awful"),
         ("What a great day", "What a terrible day"),
         ("Yes, gladly!", "No, never.")]
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


def _pairs_request(vector_id: str, layers: list[int], position: str = "", replace: bool = False,
                   pairs: list[tuple[str, str]] = PAIRS) -> vector_pb2.CreateVectorFromPairsRequest:
    return vector_pb2.CreateVectorFromPairsRequest(
        vector_id=vector_id, layers=layers, position=position, replace=replace,
        pairs=[vector_pb2.TextPair(positive=p, negative=n) for p, n in pairs])


async def _from_pairs(c: Client, request: vector_pb2.CreateVectorFromPairsRequest) -> vector_pb2.VectorInfo:
    return await c.vectors.CreateVectorFromPairs(request, metadata=c.md())


def _float32(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


@pytest.mark.parametrize("store_kind", STORES)
def test_upload_get_list_replace_delete(store_kind: str) -> None:
    async def body() -> None:
        async with rig(store_kind) as r:
            c = r.client
            a0, a2 = random_vector(1, 2.0), random_vector(2)
            before_ms = int(time.time() * 1000)
            info = await c.upload_vector("alpha", {2: a2, 0: a0}, method="caa", source="hand made")
            assert (info.vector_id, list(info.layers), info.d_model) == ("alpha", [0, 2], D_MODEL)
            assert (info.method, info.source, info.model) == ("caa", "hand made", MODEL_NAME)
            assert info.norm == pytest.approx(float(_float32(a0).norm()), rel=1e-5)  # the first layer's norm
            assert before_ms - 1000 <= info.created_at_ms <= int(time.time() * 1000) + 1000

            # stored bit for bit (as float32)
            record = await r.store.get_vector("acme", "alpha")
            assert record is not None
            vec = vector_from_bytes(record.blob)
            assert vec.layers == [0, 2]
            assert torch.equal(vec.per_layer[0], _float32(a0)) and torch.equal(vec.per_layer[2], _float32(a2))

            beta = await c.upload_vector("beta", {1: random_vector(3)})
            assert beta.method == "manual"  # the default label
            assert await c.get_vector("alpha") == info
            assert [v.vector_id for v in await c.list_vectors()] == ["alpha", "beta"]
            assert (await c.list_vectors())[0] == info

            # duplicate id: refused unless replace; a replace takes effect on the next generation
            steered = await c.generate("Tell me a story", 8, steering=[add_entry("beta", 4.0)])
            code, details = await rpc_error(c.upload_vector("beta", {1: random_vector(4)}))
            assert code == grpc.StatusCode.ALREADY_EXISTS and "beta" in details
            assert (await c.get_vector("beta")).norm == beta.norm  # unchanged
            replaced = await c.upload_vector("beta", {1: random_vector(4, 3.0)}, replace=True)
            assert replaced.norm == pytest.approx(float(_float32(random_vector(4, 3.0)).norm()), rel=1e-5)
            assert (await c.get_vector("beta")).norm == replaced.norm
            again = await c.generate("Tell me a story", 8, steering=[add_entry("beta", 4.0)])
            assert again.token_ids != steered.token_ids

            # delete
            assert (await c.delete_vector("beta")).deleted
            assert [v.vector_id for v in await c.list_vectors()] == ["alpha"]
            for call in (c.get_vector("beta"), c.delete_vector("beta"), c.get_vector("never")):
                code, details = await rpc_error(call)
                assert code == NOT_FOUND and details.startswith("vector_id:"), details
            code, details = await rpc_error(c.generate_call(steering=[add_entry("beta", 1.0)]))
            assert code == NOT_FOUND and "'beta'" in details
    run(body())


def test_upload_validation_errors() -> None:
    good = random_vector(5)
    nan, inf = list(good), list(good)
    nan[3], inf[7] = math.nan, -math.inf
    cases = [  # (vector id, per-layer values, status, the message starts with, and contains)
        ("v", {1: good[:-1]}, INVALID, "layers[0].values:", f"d_model={D_MODEL}"),
        ("v", {1: good + [0.0]}, INVALID, "layers[0].values:", f"{D_MODEL + 1} values"),
        ("v", {1: good, 2: []}, INVALID, "layers[1].values:", "0 values"),
        ("v", {1: nan}, INVALID, "layers", "non-finite"),
        ("v", {0: good, 2: inf}, INVALID, "layers", "non-finite"),
        ("v", {N_LAYERS: good}, INVALID, "layers[0].layer:", f"0..{N_LAYERS - 1}"),
        ("v", {-1: good}, INVALID, "layers[0].layer:", "out of range"),
        ("v", {}, INVALID, "layers:", "empty"),
        ("bad id!", {1: good}, INVALID, "vector_id:", "not a valid id"),
        ("", {1: good}, INVALID, "vector_id:", ""),
        ("x" * 129, {1: good}, INVALID, "vector_id:", ""),
    ]

    async def body() -> None:
        async with rig("memory") as r:
            c = r.client
            for vid, values, code, prefix, fragment in cases:
                got, details = await rpc_error(c.upload_vector(vid, values))
                assert (got, details.startswith(prefix), fragment in details) == (code, True, True), (vid, details)
            assert await c.list_vectors() == []  # nothing half-stored
            assert (await c.upload_vector("v", {1: good})).layers == [1]
    run(body())


def test_upload_refuses_two_entries_for_one_layer() -> None:
    async def body() -> None:
        async with rig("memory") as r:
            c = r.client
            request = vector_pb2.UploadVectorRequest(vector_id="dup", layers=[
                vector_pb2.LayerValues(layer=1, values=random_vector(1)),
                vector_pb2.LayerValues(layer=1, values=random_vector(2))])
            code, details = await rpc_error(c.vectors.UploadVector(request, metadata=c.md()))
            assert code == INVALID and details.startswith("layers[1].layer:"), details
            assert await c.list_vectors() == []
    run(body())


@pytest.mark.parametrize("store_kind", STORES)
def test_create_vector_from_pairs_matches_in_process_extraction(store_kind: str) -> None:
    async def body() -> tuple[vector_pb2.VectorInfo, vector_pb2.VectorInfo, bytes, bytes]:
        async with rig(store_kind) as r:
            c = r.client
            last = await _from_pairs(c, _pairs_request("caa-last", [2, 0, 2]))
            mean = await _from_pairs(c, _pairs_request("caa-mean", [1], position="mean"))
            code, _ = await rpc_error(_from_pairs(c, _pairs_request("caa-mean", [1])))
            assert code == grpc.StatusCode.ALREADY_EXISTS
            replaced = await _from_pairs(c, _pairs_request("caa-mean", [1], position="mean", replace=True))
            assert replaced.norm == mean.norm
            blobs = [await r.store.get_vector("acme", vid) for vid in ("caa-last", "caa-mean")]
            assert all(b is not None for b in blobs)
            # a created vector steers like an uploaded one
            res = await c.generate("Tell me a story", 4, steering=[add_entry("caa-last", 2.0)])
            assert [s.layers for s in res.final.steering] == [[0, 2]]
            return last, mean, blobs[0].blob, blobs[1].blob  # type: ignore[union-attr]

    last, mean, last_blob, mean_blob = run(body())
    assert (last.vector_id, list(last.layers), last.d_model, last.method, last.model) == (
        "caa-last", [0, 2], D_MODEL, "caa", MODEL_NAME)
    assert "3 pairs" in last.source
    lm = tiny_lm(1)
    pos, neg = [p for p, _ in PAIRS], [n for _, n in PAIRS]
    for blob, info, layers, position in ((last_blob, last, [0, 2], "last"), (mean_blob, mean, [1], "mean")):
        served = vector_from_bytes(blob)
        local = mean_difference(lm.model, lm.layers, lambda t: encode_prompt(lm.tokenizer, t), pos, neg, layers,
                                position=position)
        assert served.layers == local.layers == layers
        for layer in layers:
            assert torch.allclose(served.per_layer[layer], local.per_layer[layer], atol=1e-5, rtol=0)
            assert float(served.per_layer[layer].norm()) > 1e-3  # a real difference, not zeros
        assert info.norm == pytest.approx(float(local.per_layer[layers[0]].norm()), rel=1e-4)
    assert not torch.allclose(vector_from_bytes(last_blob).per_layer[0], vector_from_bytes(mean_blob).per_layer[1])


def test_create_vector_from_pairs_validation_errors() -> None:
    cases = [
        (_pairs_request("v", [1], pairs=[]), "pairs:"),
        (_pairs_request("v", [1], pairs=[("yes", "")]), "pairs[0]:"),
        (_pairs_request("v", [1], pairs=[*PAIRS, ("", "no")]), "pairs[3]:"),
        (_pairs_request("v", []), "layers:"),
        (_pairs_request("v", [0, N_LAYERS]), "layers[1]:"),
        (_pairs_request("v", [-1]), "layers[0]:"),
        (_pairs_request("v", [1], position="first"), "position:"),
        (_pairs_request("no spaces allowed", [1]), "vector_id:"),
        (_pairs_request("v", [1], pairs=[("a", "b")] * 257), "pairs:"),
    ]

    async def body() -> None:
        async with rig("memory") as r:
            c = r.client
            for request, prefix in cases:
                code, details = await rpc_error(_from_pairs(c, request))
                assert code == INVALID and details.startswith(prefix), (prefix, details)
            assert await c.list_vectors() == []
            await engine_idle(r.app)
    run(body())
