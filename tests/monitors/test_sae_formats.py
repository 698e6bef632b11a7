"""Non-SAELens SAE layouts: each written in its own layout, loaded with load_sae, and checked against
a reference written from that format's own formula (not from monitors.sae); plus metadata, the
refusals of malformed files, and check_sae_fits."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from monitors.sae import load_sae, save_sae
from monitors.sae.formats import check_sae_fits, comparable_model_name
from steering.errors import InvalidArgument
from tests.monitors.test_sae_fixtures import D_IN, D_SAE, K, make_x

ATOL = 1e-5


def _rand(*shape, g, scale=1.0):
    return torch.randn(*shape, generator=g) * scale


def _refused(path, pattern):
    with pytest.raises(InvalidArgument, match=pattern) as info:
        load_sae(path)
    return str(info.value)


def _close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


# ---- EleutherAI sparsify ---------------------------------------------------------------------------

def sparsify_tensors(seed=0, d_in=D_IN, d_sae=D_SAE):
    g = torch.Generator().manual_seed(seed)
    return {
        "encoder.weight": _rand(d_sae, d_in, g=g, scale=1 / math.sqrt(d_in)),
        "encoder.bias": _rand(d_sae, g=g, scale=0.2),
        "W_dec": _rand(d_sae, d_in, g=g) * torch.rand(d_sae, 1, generator=g).add(0.5),
        "b_dec": _rand(d_in, g=g, scale=0.3),
    }


def write_sparsify(root, tensors=None, **cfg):
    root.mkdir(parents=True, exist_ok=True)
    body = {"activation": "topk", "expansion_factor": D_SAE // D_IN, "normalize_decoder": True, "num_latents": 0,
            "k": K, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN, **cfg}
    (root / "cfg.json").write_text(json.dumps(body))
    save_file(sparsify_tensors() if tensors is None else tensors, str(root / "sae.safetensors"))
    return root


def sparsify_reference(t, x, k=K):
    """sparsify SparseCoder.encode/decode: ReLU(encoder(x - b_dec)), top-k, acts @ W_dec + b_dec."""
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    values, indices = pre.topk(k, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, indices, values)
    return f, f @ t["W_dec"] + t["b_dec"]


def test_sparsify_matches_its_formula_and_reads_the_hookpoint(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m", "batch_size": 8}))
    tensors = sparsify_tensors()
    sae = load_sae(write_sparsify(tmp_path / "run" / "layers.6", tensors))
    assert (sae.architecture, sae.d_in, sae.d_sae, sae.cfg.k) == ("topk", D_IN, D_SAE, K)  # type: ignore[attr-defined]
    meta = sae.cfg.metadata
    assert (meta.hook_name, meta.hook_layer, meta.model_name) == ("blocks.6.hook_resid_post", 6, "EleutherAI/pythia-70m")
    x = make_x()
    f_ref, recon_ref = sparsify_reference(tensors, x)
    _close(sae.encode(x), f_ref)
    _close(sae.decode(f_ref), recon_ref)
    _close(sae.decode(sae.encode(x)), recon_ref)
    idx = torch.tensor([0, 7, 30])
    _close(sae.encode_features(x, idx), f_ref[:, idx])


def test_sparsify_num_latents_bf16_and_the_weights_file_as_path(tmp_path):
    tensors = {k: v.to(torch.bfloat16) for k, v in sparsify_tensors(1, d_sae=40).items()}
    root = write_sparsify(tmp_path / "layers.2", tensors, num_latents=40, k=3)
    sae = load_sae(root / "sae.safetensors")
    assert (sae.d_sae, sae.cfg.dtype, sae.hook_layer) == (40, "bfloat16", 2)
    x = make_x()
    f_ref, recon_ref = sparsify_reference({k: v.float() for k, v in tensors.items()}, x, k=3)
    _close(sae.encode(x), f_ref)
    _close(sae.decode(sae.encode(x)), recon_ref)


def test_sparsify_refusals(tmp_path):
    t = sparsify_tensors()
    bad = {**t, "W_dec": t["W_dec"].T.contiguous()}
    _refused(write_sparsify(tmp_path / "a", bad),
             r"^sae.safetensors:W_dec: expected shape \[48, 16\] \(cfg.json d_in=16, d_sae=48\) but got \[16, 48\]")
    # cfg.json says d_in 16, the weights were made for d_in 20
    _refused(write_sparsify(tmp_path / "b", sparsify_tensors(d_in=20, d_sae=D_SAE)),
             r"^sae.safetensors:encoder.weight: expected shape \[48, 16\] .* but got \[48, 20\]")
    _refused(write_sparsify(tmp_path / "c", {k: v for k, v in t.items() if k != "b_dec"}),
             r"^sae.safetensors:b_dec: missing in .*needs encoder.weight, encoder.bias, W_dec, b_dec")
    _refused(write_sparsify(tmp_path / "d", {**t, "W_skip": torch.zeros(D_IN, D_IN)}),
             r"^sae.safetensors:W_skip: unexpected tensor")
    _refused(write_sparsify(tmp_path / "e", activation="groupmax"), r"^cfg.json:activation: 'groupmax' is not supported")
    _refused(write_sparsify(tmp_path / "f", transcode=True), r"^cfg.json:transcode: is true: a transcoder")
    _refused(write_sparsify(tmp_path / "g", k=49), r"^cfg.json:k: k=49 is out of range; allowed 1..d_sae=48")
    _refused(write_sparsify(tmp_path / "h", d_in="16"), r"^cfg.json:d_in: must be an integer >= 1")
    nan = {**t, "encoder.bias": t["encoder.bias"].clone()}
    nan["encoder.bias"][3] = float("nan")
    _refused(write_sparsify(tmp_path / "i", nan), r"^sae.safetensors:encoder.bias: contains 1 non-finite")


def test_parent_of_sparsify_hookpoints_lists_them(tmp_path):
    for name in ("layers.0", "layers.1", "layers.10"):
        write_sparsify(tmp_path / "run" / name)
    msg = _refused(tmp_path / "run", r"^path: .*holds one sparsify SAE per hookpoint \(3\)")
    assert "layers.0, layers.1, layers.10" in msg


def test_sparsify_cfg_without_weights_names_both_layouts(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({"d_in": D_IN, "k": K, "expansion_factor": 3}))
    msg = _refused(tmp_path / "s", r"^sae_weights.safetensors: missing")
    assert "sae.safetensors" in msg


# ---- Llama Scope -----------------------------------------------------------------------------------

NORM_IN, NORM_OUT = 9.5, 11.0
THETA = 0.3


def llama_scope_tensors(seed=2, d=D_IN, d_sae=D_SAE):
    g = torch.Generator().manual_seed(seed)
    return {
        "encoder.weight": _rand(d_sae, d, g=g, scale=1 / math.sqrt(d)),
        "encoder.bias": _rand(d_sae, g=g, scale=0.2),
        "decoder.weight": _rand(d, d_sae, g=g, scale=0.3) * torch.rand(1, d_sae, generator=g).add(0.5),
        "decoder.bias": _rand(d, g=g, scale=0.3),
    }


def llama_scope_hp(**over):
    hp = {
        "hook_point_in": "blocks.15.hook_resid_post", "hook_point_out": "blocks.15.hook_resid_post",
        "use_decoder_bias": True, "apply_decoder_bias_to_pre_encoder": False, "expansion_factor": D_SAE // D_IN,
        "d_model": D_IN, "d_sae": D_SAE, "act_fn": "jumprelu", "jump_relu_threshold": THETA,
        "norm_activation": "dataset-wise", "dataset_average_activation_norm": {"in": NORM_IN, "out": NORM_OUT},
        "sparsity_include_decoder_norm": True, "top_k": 50,
    }
    hp.update(over)
    return hp


def write_llama_scope(root, tensors=None, **over):
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    (root / "hyperparams.json").write_text(json.dumps(llama_scope_hp(**over)))
    save_file(llama_scope_tensors() if tensors is None else tensors, str(root / "checkpoints" / "final.safetensors"))
    return root


def llama_scope_reference(t, hp, x):
    """lm_saes SparseAutoEncoder.from_config + encode/decode (the Llama Scope release's inference path)."""
    d = hp["d_model"]
    s_in = math.sqrt(d) / hp["dataset_average_activation_norm"]["in"]
    s_out = math.sqrt(d) / hp["dataset_average_activation_norm"]["out"]
    enc_w, enc_b = t["encoder.weight"].clone(), t["encoder.bias"] / s_in  # standardize_parameters_of_dataset_...
    dec_w, dec_b = t["decoder.weight"] * s_in / s_out, t["decoder.bias"] / s_out
    if hp["sparsity_include_decoder_norm"]:  # transform_to_unit_decoder_norm
        n = torch.norm(dec_w, p=2, dim=0)
        dec_w, enc_w, enc_b = dec_w / n, enc_w * n[:, None], enc_b * n
    xin = x - dec_b if hp["apply_decoder_bias_to_pre_encoder"] else x
    h = xin @ enc_w.T + enc_b
    f = h.where(h > hp["jump_relu_threshold"], 0)  # topk with threshold > 0 runs as jumprelu
    return f, f @ dec_w.T + dec_b, s_in


@pytest.mark.parametrize(("act_fn", "pre_encoder", "include_norm"),
                         [("jumprelu", False, True), ("topk", True, True), ("jumprelu", False, False)])
def test_llama_scope_matches_lm_saes_inference(tmp_path, act_fn, pre_encoder, include_norm):
    tensors = llama_scope_tensors()
    over = {"act_fn": act_fn, "apply_decoder_bias_to_pre_encoder": pre_encoder,
            "sparsity_include_decoder_norm": include_norm}
    sae = load_sae(write_llama_scope(tmp_path / "Llama3_1-8B-Base-L15R-8x", tensors, **over))
    assert sae.architecture == "jumprelu" and sae.cfg.normalize_activations == "expected_average_only_in"
    assert (sae.hook_layer, sae.cfg.metadata.model_name) == (15, "meta-llama/Llama-3.1-8B")
    x = make_x(tokens=9)
    f_ref, recon_ref, s_in = llama_scope_reference(tensors, llama_scope_hp(**over), x)
    assert int((f_ref > 0).sum()) > 0 and int((f_ref == 0).sum()) > 0  # the threshold bites both ways
    f = sae.encode(x)
    _close(f, f_ref * s_in)  # activations on the normalised (training) scale
    _close(sae.decode(f), recon_ref)
    idx = torch.tensor([1, 5, 40])
    _close(sae.encode_features(x, idx), f_ref[:, idx] * s_in)


def test_llama_scope_input_is_scaled_to_norm_sqrt_d_model(tmp_path):
    x = make_x(tokens=64)
    avg = float(x.norm(dim=-1).mean())
    sae = load_sae(write_llama_scope(tmp_path / "sae", dataset_average_activation_norm={"in": avg, "out": avg}))
    x_norm, _ = sae.normalize(x)
    assert float(x_norm.norm(dim=-1).mean()) == pytest.approx(math.sqrt(D_IN), rel=1e-5)


def test_llama_scope_relu_topk_and_no_norm(tmp_path):
    tensors = llama_scope_tensors(3)
    sae = load_sae(write_llama_scope(tmp_path / "a", tensors, act_fn="relu", norm_activation="inference",
                                     sparsity_include_decoder_norm=False, hook_point_in="blocks.3.hook_resid_post",
                                     hook_point_out=None))
    assert sae.architecture == "standard" and sae.cfg.normalize_activations == "none" and sae.hook_layer == 3
    x = make_x()
    f_ref = torch.relu(x @ tensors["encoder.weight"].T + tensors["encoder.bias"])
    _close(sae.encode(x), f_ref)
    _close(sae.decode(f_ref), f_ref @ tensors["decoder.weight"].T + tensors["decoder.bias"])
    topk = load_sae(write_llama_scope(tmp_path / "b", tensors, act_fn="topk", jump_relu_threshold=0.0, top_k=4))
    assert topk.architecture == "topk" and topk.cfg.k == 4  # type: ignore[attr-defined]


def test_llama_scope_refusals(tmp_path):
    t = llama_scope_tensors()
    root = write_llama_scope(tmp_path / "a")
    (root / "checkpoints" / "final.safetensors").unlink()
    _refused(root, r"^checkpoints/final.safetensors: missing in ")
    _refused(write_llama_scope(tmp_path / "b", {**t, "decoder.weight": torch.zeros(20, D_SAE)}),
             r"^checkpoints/final.safetensors:decoder.weight: expected shape \[16, 48\] \(hyperparams.json d_model=16, d_sae=48\) but got \[20, 48\]")
    _refused(write_llama_scope(tmp_path / "c", dataset_average_activation_norm=None),
             r"^hyperparams.json:dataset_average_activation_norm: must be an object")
    _refused(write_llama_scope(tmp_path / "d", dataset_average_activation_norm={"in": 0, "out": 1}),
             r"^hyperparams.json:dataset_average_activation_norm.in: must be a finite number > 0")
    _refused(write_llama_scope(tmp_path / "e", norm_activation="token-wise"),
             r"^hyperparams.json:norm_activation: 'token-wise' is not supported")
    _refused(write_llama_scope(tmp_path / "f", hook_point_in="blocks.8.ln2.hook_normalized", hook_point_out="blocks.8.hook_mlp_out"),
             r"^hyperparams.json:hook_point_out: .*a transcoder")
    _refused(write_llama_scope(tmp_path / "g", act_fn="gelu"), r"^hyperparams.json:act_fn: 'gelu' is not supported")
    zero = {**t, "decoder.weight": t["decoder.weight"].clone()}
    zero["decoder.weight"][:, 7] = 0
    _refused(write_llama_scope(tmp_path / "h", zero), r"^checkpoints/final.safetensors:decoder.weight: column 7 has zero norm")
    _refused(write_llama_scope(tmp_path / "i", d_model=None), r"^hyperparams.json:d_model: must be an integer >= 1")


# ---- Gemma Scope 2 ---------------------------------------------------------------------------------

def gemma_tensors(seed=4, d_in=D_IN, d_sae=D_SAE):
    g = torch.Generator().manual_seed(seed)
    return {
        "w_enc": _rand(d_in, d_sae, g=g, scale=1 / math.sqrt(d_in)),
        "w_dec": _rand(d_sae, d_in, g=g, scale=0.5),
        "b_enc": _rand(d_sae, g=g, scale=0.2),
        "b_dec": _rand(d_in, g=g, scale=0.3),
        "threshold": torch.rand(d_sae, generator=g) * 0.5,
    }


def write_gemma(root, tensors=None, config=None):
    root.mkdir(parents=True, exist_ok=True)
    if config is not False:
        cfg = {"hf_hook_point_in": "model.layers.9.output", "width": D_SAE, "model_name": "google/gemma-3-270m-it",
               "architecture": "jump_relu", "l0": 20, **(config or {})}
        (root / "config.json").write_text(json.dumps(cfg))
    save_file(gemma_tensors() if tensors is None else tensors, str(root / "params.safetensors"))
    return root


def test_gemma_scope_2_matches_its_formula(tmp_path):
    tensors = gemma_tensors()
    sae = load_sae(write_gemma(tmp_path / "resid_post" / "layer_9_width_16k_l0_small", tensors))
    meta = sae.cfg.metadata
    assert (sae.architecture, sae.cfg.apply_b_dec_to_input, sae.cfg.normalize_activations) == ("jumprelu", False, "none")
    assert (meta.hook_name, meta.hook_layer, meta.model_name) == ("blocks.9.hook_resid_post", 9, "google/gemma-3-270m-it")
    x = make_x()
    pre = x @ tensors["w_enc"] + tensors["b_enc"]
    f_ref = torch.relu(pre) * (pre > tensors["threshold"])
    recon_ref = f_ref @ tensors["w_dec"] + tensors["b_dec"]
    _close(sae.encode(x), f_ref)
    _close(sae.decode(sae.encode(x)), recon_ref)


def test_gemma_scope_2_without_config_reads_the_folder_name(tmp_path):
    sae = load_sae(write_gemma(tmp_path / "resid_post_all" / "layer_4_width_16k_l0_big", config=False))
    assert sae.hook_layer == 4 and sae.cfg.metadata.model_name is None


def test_gemma_scope_2_refusals(tmp_path):
    t = gemma_tensors()
    _refused(write_gemma(tmp_path / "a", {**t, "w_dec": torch.zeros(D_SAE, 20)}),
             r"^params.safetensors:w_dec: expected shape \[48, 16\] \(from params.safetensors:w_enc, d_in=16, d_sae=48\) but got \[48, 20\]")
    _refused(write_gemma(tmp_path / "b", {k: v for k, v in t.items() if k != "threshold"}),
             r"^params.safetensors:threshold: missing in .*needs w_enc, b_enc, threshold, w_dec, b_dec")
    _refused(write_gemma(tmp_path / "c", {k: v for k, v in t.items() if k != "w_enc"}), r"^params.safetensors:w_enc: missing")
    _refused(write_gemma(tmp_path / "d", config={"width": 64}), r"^config.json:width: is 64 but params.safetensors:w_enc")
    _refused(write_gemma(tmp_path / "e", config={"hf_hook_point_out": "model.layers.9.post_feedforward_layernorm.output"}),
             r"^config.json:hf_hook_point_out: .*a transcoder")
    _refused(write_gemma(tmp_path / "f", config={"affine_connection": True}), r"^config.json:affine_connection: is true")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "params.safetensors").write_bytes(b"not safetensors")
    _refused(tmp_path / "g", r"^params.safetensors: is not a readable safetensors file")


# ---- Goodfire --------------------------------------------------------------------------------------

def goodfire_state(seed=5, d_in=D_IN, d_sae=D_SAE):
    g = torch.Generator().manual_seed(seed)
    return {
        "encoder_linear.weight": _rand(d_sae, d_in, g=g, scale=1 / math.sqrt(d_in)),
        "encoder_linear.bias": _rand(d_sae, g=g, scale=0.2),
        "decoder_linear.weight": _rand(d_in, d_sae, g=g, scale=0.5),
        "decoder_linear.bias": _rand(d_in, g=g, scale=0.3),
    }


def test_goodfire_matches_its_formula_as_file_or_directory(tmp_path):
    state = goodfire_state()
    (tmp_path / "gf").mkdir()
    file = tmp_path / "gf" / "Llama-3.1-8B-Instruct-SAE-l19.pth"
    torch.save(state, file)
    x = make_x()
    f_ref = torch.relu(x @ state["encoder_linear.weight"].T + state["encoder_linear.bias"])
    recon_ref = f_ref @ state["decoder_linear.weight"].T + state["decoder_linear.bias"]
    for path in (file, tmp_path / "gf"):
        sae = load_sae(path)
        assert (sae.architecture, sae.cfg.apply_b_dec_to_input, sae.d_in, sae.d_sae) == ("standard", False, D_IN, D_SAE)
        assert (sae.hook_layer, sae.cfg.metadata.model_name) == (19, "meta-llama/Llama-3.1-8B-Instruct")
        _close(sae.encode(x), f_ref)
        _close(sae.decode(sae.encode(x)), recon_ref)


def test_goodfire_refusals(tmp_path):
    state = goodfire_state()
    (tmp_path / "two").mkdir()
    torch.save(state, tmp_path / "two" / "a.pt")
    torch.save(state, tmp_path / "two" / "b.pth")
    _refused(tmp_path / "two", r"^path: .*holds 2 torch files \(a.pt, b.pth\)")
    (tmp_path / "junk.pt").write_bytes(b"definitely not a pickle")
    _refused(tmp_path / "junk.pt", r"^junk.pt: is not a readable torch state dict")
    torch.save({k: v for k, v in state.items() if k != "decoder_linear.bias"}, tmp_path / "m.pt")
    _refused(tmp_path / "m.pt", r"^m.pt:decoder_linear.bias: missing in ")
    torch.save({**state, "decoder_linear.weight": torch.zeros(D_SAE, D_IN)}, tmp_path / "t.pt")
    _refused(tmp_path / "t.pt", r"^t.pt:decoder_linear.weight: expected shape \[16, 48\] .* but got \[48, 16\]")
    bad = {**state, "encoder_linear.weight": state["encoder_linear.weight"].clone()}
    bad["encoder_linear.weight"][0, 0] = float("inf")
    torch.save(bad, tmp_path / "n.pt")
    _refused(tmp_path / "n.pt", r"^n.pt:encoder_linear.weight: contains 1 non-finite")
    torch.save([1, 2, 3], tmp_path / "l.pt")
    _refused(tmp_path / "l.pt", r"^l.pt: must hold a dict of name -> tensor")


# ---- shared ----------------------------------------------------------------------------------------

def test_unrecognised_directory_lists_the_layouts_looked_for(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("hello")
    msg = _refused(tmp_path / "x", r"^cfg.json: missing in ")
    for name in ("SAELens", "sparsify", "Llama Scope", "Gemma Scope 2", "Goodfire"):
        assert name in msg
    (tmp_path / "w.bin").write_bytes(b"x")
    _refused(tmp_path / "w.bin", r"^path: .*is a file but not a known SAE weights file; looked for: SAELens")


def test_converted_saes_save_as_saelens_and_reload_the_same(tmp_path):
    torch.save(goodfire_state(), tmp_path / "g.pt")
    sources = [write_llama_scope(tmp_path / "ls"), write_gemma(tmp_path / "gs"), write_sparsify(tmp_path / "layers.1"),
               tmp_path / "g.pt"]
    x = make_x()
    for i, src in enumerate(sources):
        sae = load_sae(src)
        save_sae(sae, None, tmp_path / f"out{i}")
        again = load_sae(tmp_path / f"out{i}")
        assert again.cfg == sae.cfg
        _close(again.decode(again.encode(x)), sae.decode(sae.encode(x)))


def test_feature_stats_sidecar_beside_another_layout(tmp_path):
    root = write_gemma(tmp_path / "gs")
    fmax = torch.rand(D_SAE)
    save_file({"max_activation": fmax}, str(root / "feature_stats.safetensors"))
    sae = load_sae(root)
    assert sae.feature_max is not None
    torch.testing.assert_close(sae.feature_max, fmax)


# ---- check_sae_fits --------------------------------------------------------------------------------

def test_check_sae_fits(tmp_path):
    sae = load_sae(write_gemma(tmp_path / "gs"))  # d_in 16, layer 9, google/gemma-3-270m-it
    check_sae_fits(sae, d_model=D_IN, layer=9, model_name="gemma-3-270m", field="monitor.sae")
    check_sae_fits(sae, d_model=D_IN, layer=None, model_name=None, field="monitor.sae")
    with pytest.raises(InvalidArgument, match=r"^monitor.sae: SAE has d_in 16 but the model's d_model is 640"):
        check_sae_fits(sae, d_model=640, layer=9, model_name=None, field="monitor.sae")
    with pytest.raises(InvalidArgument, match=r"^clamp\[0\].sae: SAE was trained on the output of layer 9 .* used at layer 4"):
        check_sae_fits(sae, d_model=D_IN, layer=4, model_name=None, field="clamp[0].sae")
    with pytest.raises(InvalidArgument, match=r"^s: SAE was trained on model 'google/gemma-3-270m-it' but the model is 'gemma-2-2b'"):
        check_sae_fits(sae, d_model=D_IN, layer=9, model_name="gemma-2-2b", field="s")
    unknown = load_sae(write_gemma(tmp_path / "bare", config=False))  # no layer, no model recorded
    check_sae_fits(unknown, d_model=D_IN, layer=3, model_name="anything", field="s")


def test_comparable_model_name():
    assert comparable_model_name("meta-llama/Llama-3.1-8B-Instruct") == comparable_model_name("Llama-3.1-8B")
    assert comparable_model_name("google/gemma-3-270m-pt") == "gemma-3-270m"
    assert comparable_model_name("gemma-2-2b") != comparable_model_name("gemma-3-270m")
