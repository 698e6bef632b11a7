"""Math of the batched core on random tensors: additions, ablations, reads, phases, batch isolation."""

from __future__ import annotations

import pytest
import torch

from monitors.probes import make_probe
from steering.batch import BatchPlan, apply_layer, orthonormal, row_of
from steering.compile import ModelShape, compile_spec
from steering.registry import Registry
from steering.spec import AblateEdit, AddEdit, InterventionSpec, ReadSpec
from steering.vectors import make_vector

D, L = 16, 4
SHAPE = ModelShape(L, D)


@pytest.fixture()
def reg() -> Registry:
    g = torch.Generator().manual_seed(0)
    r = Registry(D)
    r.add_vector("v", make_vector({layer: torch.randn(D, generator=g) for layer in range(L)}))
    r.add_vector("dir", make_vector({0: torch.randn(D, generator=g)}))
    r.add_vector("dir2", make_vector({0: torch.randn(D, generator=g)}))
    r.add_probe("p", make_probe(torch.randn(D, generator=g), 0.3, layer=1, name="p"))
    return r


def spec(*edits, reads=()) -> InterventionSpec:
    return InterventionSpec(edits=list(edits), reads=list(reads))


def run(plan: BatchPlan, layer: int, x: torch.Tensor, rows: list[int]):
    return apply_layer(plan.tables[layer], x, torch.tensor(rows))


def test_add_changes_only_its_rows_and_keeps_others_bit_identical(reg):
    req = compile_spec(spec(AddEdit(vector="v", coef=2.5, layers=[1])), reg, SHAPE)
    plan = BatchPlan([None, req], D)
    x = torch.randn(5, D)
    rows = [0, row_of(0, "prompt"), row_of(1, "prompt"), row_of(1, "generation"), 0]
    out, _, _ = run(plan, 1, x, rows)
    v = reg.vector("v").at(1)
    assert torch.equal(out[[0, 1, 4]], x[[0, 1, 4]])
    torch.testing.assert_close(out[2], x[2] + 2.5 * v)
    torch.testing.assert_close(out[3], x[3] + 2.5 * v)


def test_phase_selects_prompt_or_generated_tokens(reg):
    req = compile_spec(spec(AddEdit(vector="v", coef=1.0, layers=[0], phase="generation")), reg, SHAPE)
    plan = BatchPlan([req], D)
    x = torch.randn(2, D)
    out, _, _ = run(plan, 0, x, [row_of(0, "prompt"), row_of(0, "generation")])
    assert torch.equal(out[0], x[0])
    assert not torch.equal(out[1], x[1])


def test_ablation_leaves_zero_projection_on_every_direction(reg):
    req = compile_spec(spec(AblateEdit(vector="dir", layers="all"), AblateEdit(vector="dir2", layers=[2])), reg, SHAPE)
    plan = BatchPlan([req], D)
    x = torch.randn(7, D) * 10
    rows = [row_of(0, "prompt")] * 4 + [row_of(0, "generation")] * 3
    for layer in range(L):
        out, _, _ = run(plan, layer, x, rows)
        for name in (["dir", "dir2"] if layer == 2 else ["dir"]):
            r = reg.vector(name).at(0)
            r = r / r.norm()
            assert (out @ r).abs().max() < 1e-4, (layer, name)
    out, _, _ = run(plan, 1, x, rows)
    r2 = reg.vector("dir2").at(0)
    assert (out @ (r2 / r2.norm())).abs().max() > 1e-2  # dir2 only at layer 2


def test_edit_order_ablation_then_addition(reg):
    """An addition survives an ablation of the same direction at its layer (documented order)."""
    reg.add_vector("same", make_vector({0: reg.vector("dir").at(0)}))
    req = compile_spec(spec(AddEdit(vector="same", coef=1.0, layers=[0]), AblateEdit(vector="dir", layers=[0])), reg, SHAPE)
    plan = BatchPlan([req], D)
    x = torch.randn(3, D)
    out, _, _ = run(plan, 0, x, [row_of(0, "prompt")] * 3)
    r = reg.vector("dir").at(0)
    torch.testing.assert_close(out @ (r / r.norm()), torch.full((3,), float(r.norm())), atol=1e-4, rtol=1e-4)


def test_mixed_batch_equals_each_request_alone(reg):
    specs = [
        spec(AddEdit(vector="v", coef=-1.5, layers=[2])),
        spec(),
        spec(AblateEdit(vector="dir", layers=[2]), AddEdit(vector="v", coef=0.5, layers=[2], phase="prompt")),
        spec(reads=[ReadSpec(name="p", kind="probe", source="p", layer=2)]),
    ]
    compiled = [compile_spec(s, reg, SHAPE) for s in specs]
    batch = BatchPlan([None if c.empty else c for c in compiled], D)
    x = torch.randn(12, D)
    slot_of = [0, 1, 2, 3] * 3
    phase_of = ["prompt"] * 8 + ["generation"] * 4
    rows = [row_of(s, p) for s, p in zip(slot_of, phase_of, strict=True)]
    out, pre, _ = run(batch, 2, x, rows)
    for s, c in enumerate(compiled):
        idx = [t for t in range(12) if slot_of[t] == s]
        alone = BatchPlan([None if c.empty else c], D)
        if 2 not in alone.tables:
            assert torch.equal(out[idx], x[idx])
            continue
        o, p, _ = run(alone, 2, x[idx], [row_of(0, phase_of[t]) for t in idx])
        assert torch.equal(out[idx], o if o is not None else x[idx])
        if p is not None:
            col = alone.read_slots[0][0].column
            # matmul blocking may differ with the batch size, so readings agree to rounding, not bits
            torch.testing.assert_close(pre[idx, batch.read_slots[s][0].column], p[:, col], rtol=1e-6, atol=1e-6)


def test_probe_and_direction_reads_match_reference(reg):
    reads = [ReadSpec(name="probe", kind="probe", source="p"),
             ReadSpec(name="dot", kind="direction", source="dir", layer=1),
             ReadSpec(name="cos", kind="direction", source="dir", layer=1, metric="cosine")]
    req = compile_spec(spec(reads=reads), reg, SHAPE)
    plan = BatchPlan([req], D)
    x = torch.randn(6, D)
    _, pre, _ = run(plan, 1, x, [row_of(0, "prompt")] * 6)
    cols = {s.name: s.column for s in plan.read_slots[0]}
    probe = reg.probe("p")
    torch.testing.assert_close(pre[:, cols["probe"]], torch.sigmoid(x @ probe.weight + probe.bias))
    r = reg.vector("dir").at(0)
    r = r / r.norm()
    torch.testing.assert_close(pre[:, cols["dot"]], x @ r)
    torch.testing.assert_close(pre[:, cols["cos"]], (x @ r) / x.norm(dim=-1))


def test_reads_before_and_after_edits(reg):
    reads = [ReadSpec(name="before", kind="direction", source="dir", layer=1),
             ReadSpec(name="after", kind="direction", source="dir", layer=1, after_edits=True)]
    req = compile_spec(spec(AblateEdit(vector="dir", layers=[1]), reads=reads), reg, SHAPE)
    plan = BatchPlan([req], D)
    x = torch.randn(4, D)
    _, pre, post = run(plan, 1, x, [row_of(0, "prompt")] * 4)
    assert pre.abs().max() > 1e-2 and post.abs().max() < 1e-4


def test_shared_readers_share_a_column(reg):
    r = [ReadSpec(name="a", kind="probe", source="p")]
    c1 = compile_spec(spec(reads=r), reg, SHAPE)
    c2 = compile_spec(spec(reads=[ReadSpec(name="b", kind="probe", source="p")]), reg, SHAPE)
    plan = BatchPlan([c1, c2], D)
    assert plan.tables[1].reads_pre.n_columns == 1


def test_zero_coefficient_is_identity(reg):
    req = compile_spec(spec(AddEdit(vector="v", coef=0.0, layers=[0])), reg, SHAPE)
    x = torch.randn(3, D)
    out, _, _ = run(BatchPlan([req], D), 0, x, [row_of(0, "prompt")] * 3)
    assert torch.equal(out, x)


def test_orthonormal_drops_dependent_directions():
    a = torch.randn(8)
    basis = orthonormal(torch.stack([a, 2 * a, torch.randn(8)]))
    assert basis.shape == (2, 8)
    torch.testing.assert_close(basis @ basis.T, torch.eye(2), atol=1e-5, rtol=0)


def test_bf16_stream_is_edited_in_float32_and_keeps_dtype(reg):
    req = compile_spec(spec(AddEdit(vector="v", coef=1.0, layers=[0])), reg, SHAPE)
    x = torch.randn(3, D).bfloat16()
    out, _, _ = run(BatchPlan([None, req], D), 0, x, [row_of(0, "prompt"), row_of(1, "prompt"), 0])
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[[0, 2]], x[[0, 2]])
