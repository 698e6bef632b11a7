"""SAELens directories: round trips, legacy configs, sidecars and every refusal of a malformed dir."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from monitors.sae import (
    Architecture,
    StandardConfig,
    TopKConfig,
    get_architecture,
    layer_from_hook_name,
    load_sae,
    register_architecture,
    save_sae,
    validate_features,
)
from steering.errors import AlreadyExists, InvalidArgument
from tests.monitors.test_sae_fixtures import D_IN, D_SAE, make_cfg, make_tensors, make_x


def _write(path, cfg, tensors):
    """Write a directory by hand (bypassing save_sae's checks)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    if tensors is not None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "sae_weights.safetensors"))
    return path


def _refused(path, pattern):
    with pytest.raises(InvalidArgument, match=pattern) as info:
        load_sae(path)
    return str(info.value)


# ---- round trips ------------------------------------------------------------------------------

def test_round_trip_keeps_tensors_cfg_and_unknown_keys(tmp_path):
    tensors = make_tensors("threshold")
    cfg = make_cfg("jumprelu", "layer_norm", False, device="cpu", custom_key={"a": [1, 2]})
    cfg["metadata"]["dataset_path"] = "some/dataset"
    save_sae(tensors, cfg, tmp_path / "a")
    sae = load_sae(tmp_path / "a")
    assert (sae.architecture, sae.d_in, sae.d_sae, sae.hook_layer) == ("jumprelu", D_IN, D_SAE, 3)
    assert sae.cfg.extras == {"device": "cpu", "custom_key": {"a": [1, 2]}}
    for name, value in tensors.items():
        torch.testing.assert_close(sae.state_tensors()[name], value)
    out = sae.to_cfg_dict()
    assert out["custom_key"] == {"a": [1, 2]} and out["metadata"]["dataset_path"] == "some/dataset"
    save_sae(sae, None, tmp_path / "b")
    again = load_sae(tmp_path / "b")
    assert again.cfg == sae.cfg
    x = make_x()
    torch.testing.assert_close(again.encode(x), sae.encode(x))


@pytest.mark.parametrize("variant", ["topk_rescale", "batchtopk_scalar", "batchtopk_plain"])
def test_converted_architectures_round_trip(tmp_path, variant):
    from tests.monitors.test_sae_fixtures import VARIANTS

    arch, extra, flavour = VARIANTS[variant]
    save_sae(make_tensors(flavour), make_cfg(arch, **extra), tmp_path / "a")
    sae = load_sae(tmp_path / "a")
    save_sae(sae, None, tmp_path / "b")
    again = load_sae(tmp_path / "b")
    assert again.architecture == arch and type(again) is type(sae)
    x = make_x()
    torch.testing.assert_close(again.encode(x), sae.encode(x))


def test_bf16_file_loads_as_float32(tmp_path):
    tensors = {k: v.to(torch.bfloat16) for k, v in make_tensors("plain").items()}
    save_sae(tensors, make_cfg("standard", dtype="bfloat16"), tmp_path / "sae")
    sae = load_sae(tmp_path / "sae")
    w_enc = sae.state_tensors()["W_enc"]
    assert w_enc.dtype == torch.float32
    torch.testing.assert_close(w_enc, tensors["W_enc"].float())


def test_legacy_config_layout(tmp_path):
    cfg = {
        "d_in": D_IN, "d_sae": D_SAE, "dtype": "torch.float32", "model_name": "gpt2",
        "hook_point": "blocks.12.hook_resid_pre", "hook_point_layer": 12, "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 4}, "normalize_activations": False, "device": "cpu",
    }
    sae = load_sae(_write(tmp_path / "sae", cfg, make_tensors("plain")))
    assert isinstance(sae.cfg, TopKConfig)
    # hook_resid_pre of block 12 is the output of block 11, where steerwatch's hook reads it
    assert (sae.architecture, sae.cfg.k, sae.cfg.metadata.hook_layer, sae.hook_layer) == ("topk", 4, 12, 11)
    assert sae.cfg.normalize_activations == "none" and sae.cfg.metadata.model_name == "gpt2"
    assert sae.cfg.extras == {"activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4}, "device": "cpu"}


def test_legacy_bool_normalize_and_meta_key(tmp_path):
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "normalize_activations": True, "hook_layer": 5,
           "meta": {"hook_name": "blocks.5.hook_resid_post"}}
    sae = load_sae(_write(tmp_path / "sae", cfg, make_tensors("plain")))
    assert sae.architecture == "standard" and sae.cfg.apply_b_dec_to_input is True
    assert sae.cfg.normalize_activations == "expected_average_only_in" and sae.hook_layer == 5


def test_hook_layer_parsing():
    assert layer_from_hook_name("blocks.12.hook_resid_post") == 12
    assert layer_from_hook_name("model.layers.7.mlp") == 7
    assert layer_from_hook_name("hook_embed") is None and layer_from_hook_name(None) is None


def test_expected_average_factor_from_scaler_sidecar(tmp_path):
    cfg = make_cfg("standard", "expected_average_only_in")
    del cfg["norm_scaling_factor"]
    path = _write(tmp_path / "sae", cfg, make_tensors("plain"))
    x = make_x()
    assert load_sae(path).normalize(x)[0].equal(x)  # no factor anywhere: weights assumed folded
    (path / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 2.5}))
    sae = load_sae(path)
    assert sae.cfg.norm_scaling_factor == 2.5
    torch.testing.assert_close(sae.normalize(x)[0], x * 2.5)


def test_finetuning_scaling_factor_is_folded_into_decoder(tmp_path):
    tensors = make_tensors("plain")
    tensors["scaling_factor"] = torch.linspace(0.5, 2.0, D_SAE)
    with pytest.raises(InvalidArgument, match=r"^sae_weights.safetensors:scaling_factor: .*finetuning_scaling_factor"):
        load_sae(_write(tmp_path / "bad", make_cfg("standard"), tensors))
    sae = load_sae(_write(tmp_path / "ok", make_cfg("standard", finetuning_scaling_factor=True), tensors))
    f = torch.rand(3, D_SAE)
    expected = (f * tensors["scaling_factor"]) @ tensors["W_dec"] + tensors["b_dec"]
    torch.testing.assert_close(sae.decode(f), expected)
    ones = {**make_tensors("plain"), "scaling_factor": torch.ones(D_SAE)}
    assert load_sae(_write(tmp_path / "ones", make_cfg("standard"), ones)).architecture == "standard"


# ---- sidecar and feature validation ------------------------------------------------------------

def test_feature_max_sidecar(tmp_path):
    fmax = torch.rand(D_SAE) * 10
    save_sae(make_tensors("plain"), make_cfg("standard"), tmp_path / "sae", feature_max=fmax)
    sae = load_sae(tmp_path / "sae")
    assert sae.feature_max is not None
    torch.testing.assert_close(sae.feature_max, fmax)
    save_file({"max_activation": torch.rand(D_SAE + 1)}, str(tmp_path / "sae" / "feature_stats.safetensors"))
    _refused(tmp_path / "sae", r"^feature_stats.safetensors:max_activation: shape \[49\] does not match the required \[48\]")
    save_file({"other": torch.rand(D_SAE)}, str(tmp_path / "sae" / "feature_stats.safetensors"))
    _refused(tmp_path / "sae", r"^feature_stats.safetensors:max_activation: missing")
    assert load_sae(_write(tmp_path / "none", make_cfg("standard"), make_tensors("plain"))).feature_max is None


def test_validate_features(tmp_path):
    sae = load_sae(_write(tmp_path / "sae", make_cfg("standard"), make_tensors("plain")))
    idx = validate_features(sae, [0, 47, 3], "monitor.features")
    assert idx.dtype == torch.int64 and idx.tolist() == [0, 47, 3]
    cases: list[tuple[Any, int]] = [([1, 48], 1), ([-1], 0), ([True], 0), ([2.0], 0)]
    for bad, where in cases:
        with pytest.raises(InvalidArgument, match=rf"^monitor.features\[{where}\]: .*allowed 0..47"):
            validate_features(sae, bad, "monitor.features")
    with pytest.raises(InvalidArgument, match=r"^f\[2\]: feature 5 repeats f\[0\]"):
        validate_features(sae, [5, 6, 5], "f")


def test_registry_refuses_duplicates():
    existing = get_architecture("standard")
    with pytest.raises(AlreadyExists, match="standard"):
        register_architecture(Architecture("standard", StandardConfig, existing.build))


# ---- malformed directories --------------------------------------------------------------------

def test_missing_directory_and_files(tmp_path):
    _refused(tmp_path / "nope", r"^path: .*nope.* is not a directory")
    (tmp_path / "empty").mkdir()
    _refused(tmp_path / "empty", r"^cfg.json: missing in .*empty")
    _refused(_write(tmp_path / "noweights", make_cfg("standard"), None), r"^sae_weights.safetensors: missing")


def test_bad_json_and_bad_safetensors(tmp_path):
    _refused(_write(tmp_path / "a", "{not json", make_tensors("plain")), r"^cfg.json: is not valid JSON .*line 1")
    _refused(_write(tmp_path / "b", "[1, 2]", make_tensors("plain")), r"^cfg.json: must be a JSON object, got list")
    path = _write(tmp_path / "c", make_cfg("standard"), None)
    (path / "sae_weights.safetensors").write_bytes(b"garbage bytes")
    _refused(path, r"^sae_weights.safetensors: is not a readable safetensors file")


def test_unknown_architecture_lists_allowed(tmp_path):
    msg = _refused(_write(tmp_path / "a", make_cfg("matryoshka"), make_tensors("plain")), r"^cfg.json:architecture: unknown")
    assert "allowed: batchtopk, gated, jumprelu, standard, topk" in msg


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"d_in": -3}, r"^cfg.json:d_in: .*greater than 0"),
        ({"d_sae": None}, r"^cfg.json:d_sae: "),
        ({"normalize_activations": "rms"}, r"^cfg.json:normalize_activations: .*'layer_norm'"),
        ({"architecture": "topk", "k": 49}, r"^cfg.json: k=49 is out of range; allowed 1..d_sae=48"),
        ({"architecture": "topk"}, r"^cfg.json:k: Field required"),
        ({"activation_fn_str": "tanh-relu"}, r"^cfg.json:activation_fn_str: 'tanh-relu' is not supported; allowed: relu, topk"),
        ({"hook_layer": 4}, r"^cfg.json:metadata: hook_layer 4 contradicts hook_name"),
        ({"dtype": "int8"}, r"^cfg.json:dtype: .*'bfloat16'"),
    ],
)
def test_bad_cfg_values(tmp_path, change, pattern):
    cfg = {**make_cfg("standard"), **change}
    if change.get("hook_layer") is not None:
        cfg["metadata"] = {**cfg["metadata"], "hook_layer": change["hook_layer"]}
        del cfg["hook_layer"]
    _refused(_write(tmp_path / "sae", cfg, make_tensors("plain")), pattern)


def test_missing_tensor_is_named(tmp_path):
    tensors = make_tensors("plain")
    msg = _refused(_write(tmp_path / "a", make_cfg("jumprelu"), tensors), r"^sae_weights.safetensors:threshold: missing")
    assert "'jumprelu' architecture needs W_enc, W_dec, b_dec, b_enc, threshold" in msg
    _refused(_write(tmp_path / "b", make_cfg("gated"), tensors), r"^sae_weights.safetensors:b_gate: missing")


def test_wrong_shape_says_expected_and_got(tmp_path):
    tensors = make_tensors("plain")
    tensors["W_enc"] = tensors["W_enc"].T.contiguous()
    _refused(_write(tmp_path / "a", make_cfg("standard"), tensors),
             r"^sae_weights.safetensors:W_enc: expected shape \[16, 48\] \(cfg.json d_in=16, d_sae=48\) but got \[48, 16\]")
    _refused(_write(tmp_path / "b", {**make_cfg("standard"), "d_sae": 40}, make_tensors("plain")),
             r"^sae_weights.safetensors:W_enc: expected shape \[16, 40\]")


def test_non_finite_and_non_float_tensors(tmp_path):
    tensors = make_tensors("plain")
    tensors["W_enc"][3, 5] = float("nan")
    _refused(_write(tmp_path / "a", make_cfg("standard"), tensors),
             r"^sae_weights.safetensors:W_enc: contains 1 non-finite value\(s\) \(first at flat index 149\)")
    tensors = make_tensors("gated")
    tensors["r_mag"][0] = 200.0
    _refused(_write(tmp_path / "b", make_cfg("gated"), tensors), r"^sae_weights.safetensors:r_mag: exp\(r_mag\) overflows")
    tensors = make_tensors("plain")
    tensors["b_dec"] = torch.zeros(D_IN, dtype=torch.int32)
    _refused(_write(tmp_path / "c", make_cfg("standard"), tensors), r"^sae_weights.safetensors:b_dec: dtype int32 not allowed")


def test_save_refuses_what_load_would_refuse(tmp_path):
    tensors = make_tensors("plain")
    tensors["b_enc"][0] = float("inf")
    with pytest.raises(InvalidArgument, match=r"^sae_weights.safetensors:b_enc: contains 1 non-finite"):
        save_sae(tensors, make_cfg("standard"), tmp_path / "sae")
    assert not (tmp_path / "sae").exists()
    with pytest.raises(InvalidArgument, match=r"^cfg: required"):
        save_sae(make_tensors("plain"), None, tmp_path / "sae")
