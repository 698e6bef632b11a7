"""SAE maths: encode / encode_features / decode against an independent reference, TopK sparsity,
normalisation inverses and the clamp identity."""

from __future__ import annotations

import math

import pytest
import torch

from monitors.sae import SAE, load_sae, save_sae
from steering.errors import InvalidArgument
from tests.monitors.test_sae_fixtures import (
    D_IN,
    D_SAE,
    LN_EPS,
    MODES,
    VARIANTS,
    K,
    make_cfg,
    make_tensors,
    make_x,
    ref_decode,
    ref_encode,
)

ATOL = 1e-5


def _load(tmp_path, variant: str, mode: str = "none", apply_b_dec: bool = True, seed: int = 0):
    arch, extra, flavour = VARIANTS[variant]
    tensors = make_tensors(flavour, seed)
    cfg = make_cfg(arch, mode, apply_b_dec, **extra)
    save_sae(tensors, cfg, tmp_path / "sae")
    return load_sae(tmp_path / "sae"), tensors, cfg


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_encode_and_decode_match_reference(tmp_path, variant, mode, apply_b_dec):
    sae, tensors, cfg = _load(tmp_path, variant, mode, apply_b_dec)
    x = make_x()
    expected = ref_encode(variant, tensors, cfg, x)
    got = sae.encode(x)
    assert got.dtype == torch.float32 and got.shape == (x.shape[0], D_SAE)
    assert (expected != 0).any(), "fixture should activate some features"
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)

    idx = torch.tensor([0, 7, 3, 47, 20, 21])
    torch.testing.assert_close(sae.encode_features(x, idx), expected[:, idx], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(sae.encode_features(x, idx), got[:, idx], atol=1e-6, rtol=1e-6)

    x_norm, state = sae.normalize(x)
    torch.testing.assert_close(sae.encode_features_normalized(x_norm, idx), got[:, idx], atol=1e-6, rtol=1e-6)
    recon = sae.decode(got, state)
    torch.testing.assert_close(recon, ref_decode(variant, tensors, cfg, x, expected), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("variant", ["standard", "jumprelu", "gated", "batchtopk_threshold"])
def test_subset_encode_reads_only_selected_columns(tmp_path, variant):
    sae, _, _ = _load(tmp_path, variant, "layer_norm")
    assert sae.subset_exact
    x = make_x()
    idx = torch.tensor([5, 11, 40])
    before = sae.encode_features(x, idx)
    others = torch.ones(D_SAE, dtype=torch.bool)
    others[idx] = False
    sae._w_enc_t[others] = float("nan")  # poison every column that is not selected
    after = sae.encode_features(x, idx)
    assert torch.isfinite(after).all()
    torch.testing.assert_close(after, before)


@pytest.mark.parametrize("variant", ["topk", "topk_rescale", "batchtopk_plain"])
def test_topk_keeps_exactly_k_per_row(tmp_path, variant):
    arch, extra, flavour = VARIANTS[variant]
    tensors = make_tensors(flavour)
    tensors["b_enc"] = torch.full((D_SAE,), 10.0)  # every pre-activation positive: exactly k survive
    save_sae(tensors, make_cfg(arch, **extra), tmp_path / "sae")
    sae = load_sae(tmp_path / "sae")
    assert not sae.subset_exact
    f = sae.encode(make_x(tokens=64))
    assert ((f != 0).sum(dim=-1) == K).all()


def test_topk_never_exceeds_k_and_relus_kept_values(tmp_path):
    tensors = make_tensors("plain")
    tensors["b_enc"] = torch.full((D_SAE,), -4.0)
    save_sae(tensors, make_cfg("topk", k=K), tmp_path / "sae")
    f = load_sae(tmp_path / "sae").encode(make_x(tokens=64))
    counts = (f != 0).sum(dim=-1)
    assert (counts <= K).all() and (counts < K).any()
    assert (f >= 0).all()


@pytest.mark.parametrize("mode", ["none", "expected_average_only_in"])
def test_denormalize_delta_is_exact_inverse_for_linear_modes(tmp_path, mode):
    sae, _, _ = _load(tmp_path, "standard", mode)
    x = make_x()
    x_norm, state = sae.normalize(x)
    d = torch.randn_like(x) * 3.0  # large: the map is linear, no first-order restriction
    moved, _ = sae.normalize(x + sae.denormalize_delta(d, state))
    torch.testing.assert_close(moved, x_norm + d, atol=1e-5, rtol=1e-5)


def test_denormalize_delta_constant_norm_keeps_direction(tmp_path):
    sae, _, _ = _load(tmp_path, "standard", "constant_norm_rescale")
    x = make_x()
    x_norm, state = sae.normalize(x)
    d = torch.randn_like(x)
    moved, _ = sae.normalize(x + sae.denormalize_delta(d, state))
    target = x_norm + d
    torch.testing.assert_close(moved, target * math.sqrt(D_IN) / target.norm(dim=-1, keepdim=True), atol=1e-5, rtol=1e-5)
    # first order: a small change orthogonal to x_norm survives re-normalisation unchanged
    small = _orthogonal_to(torch.randn_like(x), [x_norm]) * 1e-3
    moved, _ = sae.normalize(x + sae.denormalize_delta(small, state))
    assert (moved - (x_norm + small)).abs().max() < 1e-5


def test_denormalize_delta_layer_norm_is_layer_norm_of_shifted(tmp_path):
    sae, _, _ = _load(tmp_path, "standard", "layer_norm")
    x = make_x()
    x_norm, state = sae.normalize(x)
    d = torch.randn_like(x)
    moved, _ = sae.normalize(x + sae.denormalize_delta(d, state))
    denom = (x - x.mean(dim=-1, keepdim=True)).std(dim=-1, keepdim=True) + LN_EPS
    y = x_norm + d
    expected = (y - y.mean(dim=-1, keepdim=True)) / (y.std(dim=-1, keepdim=True) + LN_EPS / denom)
    torch.testing.assert_close(moved, expected, atol=1e-5, rtol=1e-5)
    ones = torch.ones_like(x)
    small = _orthogonal_to(torch.randn_like(x), [ones, x_norm]) * 1e-3
    moved, _ = sae.normalize(x + sae.denormalize_delta(small, state))
    assert (moved - (x_norm + small)).abs().max() < 1e-5


def _orthogonal_to(d: torch.Tensor, bases: list[torch.Tensor]) -> torch.Tensor:
    """Remove from each row of d its components along the (row-wise) span of ``bases``."""
    for i in range(d.shape[0]):
        q, _ = torch.linalg.qr(torch.stack([b[i] for b in bases], dim=1))
        d[i] = d[i] - q @ (q.T @ d[i])
    return d


@pytest.mark.parametrize("mode", ["none", "expected_average_only_in"])
@pytest.mark.parametrize("variant", ["standard", "jumprelu"])
def test_clamp_reencodes_to_target(tmp_path, variant, mode):
    """x' = x + denormalize_delta((c - f_i) W_dec[i]) re-encodes feature i to c when
    W_enc[:, i] . W_dec[i] == 1 and the feature stays above its threshold."""
    arch, extra, flavour = VARIANTS[variant]
    tensors = make_tensors(flavour)
    i = 9
    row = tensors["W_dec"][i] / tensors["W_dec"][i].norm()
    tensors["W_dec"][i], tensors["W_enc"][:, i] = row, row
    tensors["b_enc"][i] = 8.0  # active on every token
    if "threshold" in tensors:
        tensors["threshold"][i] = 0.5
    save_sae(tensors, make_cfg(arch, mode, **extra), tmp_path / "sae")
    sae = load_sae(tmp_path / "sae")
    x = make_x()
    idx = torch.tensor([i])
    x_norm, state = sae.normalize(x)
    f = sae.encode_features_normalized(x_norm, idx)
    assert (f > 1).all()
    target = torch.full_like(f, 3.0)
    x_new = x + sae.denormalize_delta((target - f) @ sae.decoder_rows(idx), state)
    torch.testing.assert_close(sae.encode_features(x_new, idx), target, atol=1e-4, rtol=1e-5)


def test_decoder_rows_and_decode_agree(tmp_path):
    sae, tensors, _ = _load(tmp_path, "gated")
    idx = torch.tensor([4, 2])
    torch.testing.assert_close(sae.decoder_rows(idx), tensors["W_dec"][idx])
    f = torch.zeros(1, D_SAE)
    f[0, 4] = 2.0
    torch.testing.assert_close(sae.decode(f), 2.0 * tensors["W_dec"][4] + tensors["b_dec"][None])


def test_topk_rescale_is_folded_into_decoder_rows(tmp_path):
    sae, tensors, _ = _load(tmp_path, "topk_rescale")
    rows = sae.decoder_rows(torch.arange(D_SAE))
    torch.testing.assert_close(rows.norm(dim=-1), torch.ones(D_SAE))
    assert sae.cfg.rescale_acts_by_decoder_norm is False


def test_decode_needs_state_for_per_token_modes(tmp_path):
    sae, _, _ = _load(tmp_path, "standard", "layer_norm")
    x = make_x()
    f = sae.encode(x)
    with pytest.raises(InvalidArgument, match=r"^state: .*layer_norm"):
        sae.decode(f)
    _, state = sae.normalize(x[:3])
    with pytest.raises(InvalidArgument, match=r"^state: covers 3 token"):
        sae.decode(f, state)
    other, _, _ = _load(tmp_path / "o", "standard", "constant_norm_rescale")
    _, foreign = other.normalize(x)
    with pytest.raises(InvalidArgument, match=r"^state: comes from 'constant_norm_rescale'"):
        sae.denormalize_delta(torch.zeros_like(x), foreign)


def test_expected_average_decode_without_state(tmp_path):
    sae, tensors, cfg = _load(tmp_path, "standard", "expected_average_only_in")
    x = make_x()
    f = sae.encode(x)
    torch.testing.assert_close(sae.decode(f), ref_decode("standard", tensors, cfg, x, f), atol=1e-4, rtol=1e-5)


def test_inputs_are_checked(tmp_path):
    sae: SAE
    sae, _, _ = _load(tmp_path, "standard")
    with pytest.raises(InvalidArgument, match=r"^x: shape \[7, 15\] .*\[T, 16\]"):
        sae.encode(torch.zeros(7, 15))
    with pytest.raises(InvalidArgument, match=r"^x: dtype int64"):
        sae.encode(torch.zeros(7, D_IN, dtype=torch.int64))
    with pytest.raises(InvalidArgument, match=r"^idx: "):
        sae.encode_features(make_x(), torch.tensor([1.0]))
    with pytest.raises(InvalidArgument, match=r"^f: shape"):
        sae.decode(torch.zeros(2, D_IN))


def test_low_precision_input_is_encoded_in_float32(tmp_path):
    sae, _, _ = _load(tmp_path, "jumprelu")
    x = make_x().to(torch.bfloat16)
    got = sae.encode(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, sae.encode(x.float()))


def test_to_moves_and_returns_self(tmp_path):
    sae, _, _ = _load(tmp_path, "gated")
    assert sae.to("cpu") is sae
    meta = sae.to("meta")
    assert meta.device.type == "meta" and meta._mag_scale.device.type == "meta"
    with pytest.raises(InvalidArgument, match=r"^x: is on cpu"):
        meta.encode(make_x())
