"""SAE clamps and SAE readings through the batched core, against formulas written in the tests."""

from __future__ import annotations

import pytest
import torch

from monitors.sae import build_sae, load_sae, parse_config, save_sae
from steering.batch import BatchPlan, apply_layer, row_of
from steering.compile import ModelShape, compile_spec
from steering.errors import InvalidArgument, LimitExceeded
from steering.registry import Registry
from steering.spec import ClampEdit, InterventionSpec, Limits, ReadSpec
from tests.monitors.test_sae_fixtures import (
    D_IN,
    D_SAE,
    MODES,
    VARIANTS,
    make_cfg,
    make_tensors,
    make_x,
    ref_encode,
)

SHAPE = ModelShape(6, D_IN)


def tied_sae(bias: float = 3.0, mode: str = "none"):
    """A ReLU SAE whose encoder column i is W_dec[i] / |W_dec[i]|^2, so W_dec[i]·W_enc[:, i] = 1 and a
    clamped, active feature must re-encode exactly to its target."""
    t = make_tensors("plain")
    t["W_enc"] = (t["W_dec"] / t["W_dec"].norm(dim=-1, keepdim=True) ** 2).T.contiguous()
    t["b_enc"] = torch.full((D_SAE,), bias)
    return build_sae(parse_config(make_cfg("standard", mode, apply_b_dec=True), "test"), t, "test")


def plan_for(reg: Registry, spec: InterventionSpec, limits: Limits | None = None) -> BatchPlan:
    return BatchPlan([None, compile_spec(spec, reg, SHAPE, limits)], D_IN)


@pytest.mark.parametrize("mode", ["none", "expected_average_only_in"])
def test_clamped_feature_reencodes_to_target_and_keeps_the_error_term(mode):
    sae = tied_sae(mode=mode)
    reg = Registry(D_IN)
    reg.add_sae("s", sae)
    plan = plan_for(reg, InterventionSpec(edits=[ClampEdit(sae="s", feature=5, value=7.5)]))
    x = make_x(tokens=6)
    rows = torch.tensor([0, 0, 0, row_of(1, "prompt"), row_of(1, "generation"), row_of(1, "prompt")])
    out, _, _ = apply_layer(plan.tables[3], x, rows)
    assert torch.equal(out[:3], x[:3])  # the other request's tokens are untouched
    f_before = sae.encode(x[3:])
    f_after = sae.encode(out[3:])
    torch.testing.assert_close(f_after[:, 5], torch.full((3,), 7.5), atol=1e-4, rtol=1e-5)
    # the change is only along the feature's decoder row: the SAE error term is kept
    delta = sae.normalize(out[3:])[0] - sae.normalize(x[3:])[0]
    expected = (7.5 - f_before[:, 5:6]) * sae.decoder_rows(torch.tensor([5]))
    torch.testing.assert_close(delta, expected, atol=1e-4, rtol=1e-4)


def test_two_requests_clamp_different_features_independently():
    sae = tied_sae()
    reg = Registry(D_IN)
    reg.add_sae("s", sae)
    a = compile_spec(InterventionSpec(edits=[ClampEdit(sae="s", feature=1, value=4.0)]), reg, SHAPE)
    b = compile_spec(InterventionSpec(edits=[ClampEdit(sae="s", feature=2, value=0.0, phase="generation")]), reg, SHAPE)
    plan = BatchPlan([a, b], D_IN)
    x = make_x(tokens=4)
    rows = torch.tensor([row_of(0, "prompt"), row_of(1, "prompt"), row_of(1, "generation"), row_of(0, "generation")])
    out, _, _ = apply_layer(plan.tables[3], x, rows)
    f = sae.encode(out)
    torch.testing.assert_close(f[[0, 3], 1], torch.full((2,), 4.0), atol=1e-4, rtol=1e-5)
    assert torch.equal(out[1], x[1])  # b clamps only generated tokens
    assert float(f[2, 2]) == pytest.approx(0.0, abs=1e-4)


def test_max_multiple_uses_recorded_max_and_limits_apply(tmp_path):
    sae = tied_sae()
    save_sae(sae, None, tmp_path / "s", feature_max=torch.full((D_SAE,), 2.0))
    reg = Registry(D_IN)
    reg.add_sae("s", load_sae(tmp_path / "s"))
    reg.add_sae("nomax", sae)
    c = compile_spec(InterventionSpec(edits=[ClampEdit(sae="s", feature=3, value=5, mode="max_multiple")]), reg, SHAPE)
    assert c.applied[0]["target"] == 10.0
    with pytest.raises(InvalidArgument, match=r"^edits\[0\]\.mode"):
        compile_spec(InterventionSpec(edits=[ClampEdit(sae="nomax", feature=3, value=5, mode="max_multiple")]), reg, SHAPE)
    with pytest.raises(LimitExceeded, match=r"^edits\[0\]\.value"):
        compile_spec(InterventionSpec(edits=[ClampEdit(sae="s", feature=3, value=60, mode="max_multiple")]), reg, SHAPE,
                     Limits(max_clamp_value=100))
    with pytest.raises(InvalidArgument, match=r"^edits\[0\]\.feature.*0\.\.47"):
        compile_spec(InterventionSpec(edits=[ClampEdit(sae="s", feature=D_SAE, value=1)]), reg, SHAPE)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("mode", MODES)
def test_sae_readings_through_the_core_equal_the_reference(variant, mode):
    arch, extra, flavour = VARIANTS[variant]
    t = make_tensors(flavour)
    cfg = make_cfg(arch, mode, **extra)
    reg = Registry(D_IN)
    reg.add_sae("s", build_sae(parse_config(cfg, "test"), {k: v.clone() for k, v in t.items()}, "test"))
    feats = [0, 7, 19, 47]
    spec = InterventionSpec(reads=[ReadSpec(name=f"f{f}", kind="sae_feature", source="s", feature=f) for f in feats])
    plan = plan_for(reg, spec)
    x = make_x(tokens=5)
    _, pre, _ = apply_layer(plan.tables[3], x, torch.full((5,), row_of(1, "prompt")))
    ref = ref_encode(variant, t, cfg, x)
    for slot in plan.read_slots[1]:
        torch.testing.assert_close(pre[:, slot.column], ref[:, int(slot.name[1:])], atol=1e-5, rtol=1e-5)


def test_sae_of_another_width_is_refused():
    reg = Registry(D_IN + 1)
    with pytest.raises(InvalidArgument, match="d_model"):
        reg.add_sae("s", tied_sae())
