"""service.models: tiny test LLaMA, byte tokenizer, encode_prompt, load_model, and the real default model."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from service.models import (
    TINY_CHAT_TEMPLATE,
    LoadedModel,
    byte_tokenizer,
    default_model_dir,
    encode_prompt,
    is_prepared,
    load_model,
    prepare_default_model,
    save_tiny_llama,
    tiny_llama,
    wrap_model,
)
from service.models import default as default_mod
from steering.errors import FailedPrecondition, InvalidArgument

TEXT = "The quick brown fox jumps over the lazy dog."


def _logits(lm: LoadedModel, text: str = TEXT) -> torch.Tensor:
    ids = torch.tensor([encode_prompt(lm.tokenizer, text)], device=lm.device)
    with torch.no_grad():
        return lm.model(ids).logits.float()


def _greedy(lm: LoadedModel, prompt: str, n: int = 24) -> str:
    ids = torch.tensor([encode_prompt(lm.tokenizer, prompt)])
    with torch.no_grad():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return lm.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


# ---------------------------------------------------------------- tiny model + byte tokenizer


def test_tiny_shape_and_inference_mode(tiny: LoadedModel) -> None:
    assert (tiny.n_layers, tiny.d_model, tiny.vocab_size) == (2, 64, 259)
    assert isinstance(tiny.layers, torch.nn.ModuleList) and len(tiny.layers) == 2
    assert tiny.layers is tiny.model.model.layers
    assert tiny.final_norm is tiny.model.model.norm
    assert tiny.lm_head is tiny.model.lm_head
    assert tiny.quantized is None and tiny.chat_template is False
    assert tiny.dtype == torch.float32 and tiny.device == torch.device("cpu")
    assert not tiny.model.training
    assert not any(p.requires_grad for p in tiny.model.parameters())


def test_tiny_is_deterministic_and_seeded(tiny: LoadedModel) -> None:
    again = tiny_llama(seed=0)
    assert torch.equal(_logits(tiny), _logits(again))
    assert not torch.equal(_logits(tiny), _logits(tiny_llama(seed=1)))


def test_tiny_does_not_touch_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_llama(seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_lm_head_of_final_norm_gives_logits(tiny: LoadedModel) -> None:
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = tiny.layers[-1].register_forward_hook(hook)
    try:
        logits = _logits(tiny)
    finally:
        handle.remove()
    with torch.no_grad():
        rebuilt = tiny.lm_head(tiny.final_norm(captured[0]))
    torch.testing.assert_close(rebuilt, logits)


@pytest.mark.parametrize(
    "text", ["Hello, wörld!", "plain ascii ~!@#$%^&*()", "日本語 🙂\n\ttab", " leading space"]
)
def test_byte_tokenizer_round_trips(text: str) -> None:
    tok = byte_tokenizer()
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id == 256
    assert ids[1:] == list(text.encode("utf-8"))  # id == byte value
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.eos_token_id, tok.pad_token_id) == (257, 258)


def test_tiny_rejects_bad_shapes() -> None:
    with pytest.raises(InvalidArgument) as err:
        tiny_llama(d_model=65, n_heads=4)
    assert err.value.field == "d_model"
    with pytest.raises(InvalidArgument) as err:
        tiny_llama(vocab_size=100)
    assert err.value.field == "vocab_size"


# ---------------------------------------------------------------- encode_prompt


def test_encode_prompt_adds_exactly_one_bos(tiny: LoadedModel) -> None:
    tok = tiny.tokenizer
    assert encode_prompt(tok, "hi") == [256, ord("h"), ord("i")]
    # a prompt that already spells the BOS token is not doubled
    assert encode_prompt(tok, "<bos>hi") == [256, ord("h"), ord("i")]
    assert encode_prompt(tok, "<bos><bos>hi") == [256, ord("h"), ord("i")]


def test_encode_prompt_without_bos_token() -> None:
    class NoBos:
        bos_token_id = None
        chat_template = None

        def __call__(self, text: str, add_special_tokens: bool = True):
            return SimpleNamespace(input_ids=list(text.encode()))

    assert encode_prompt(NoBos(), "ab") == [97, 98]


def test_chat_fallback_format(tiny: LoadedModel) -> None:
    tok = tiny.tokenizer
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Another?"},
    ]
    ids = encode_prompt(tok, messages)
    assert ids[0] == 256 and ids.count(256) == 1
    assert (
        tok.decode(ids[1:])
        == "System: Be terse.\nUser: Name a colour.\nAssistant: Red.\nUser: Another?\nAssistant:"
    )
    # chat_template=True wraps a plain string as one user message
    assert tok.decode(encode_prompt(tok, "hi", chat_template=True)[1:]) == "User: hi\nAssistant:"
    # a raw string stays raw by default
    assert tok.decode(encode_prompt(tok, "hi")[1:]) == "hi"


def test_chat_template_used_without_doubling_bos() -> None:
    tok = byte_tokenizer(chat_template=TINY_CHAT_TEMPLATE)
    messages = [{"role": "user", "content": "hi"}]
    ids = encode_prompt(tok, messages)  # the template itself emits {{ bos_token }}
    assert ids[0] == 256 and ids.count(256) == 1
    assert tok.decode(ids[1:]) == "<|user|>\nhi\n<|assistant|>\n"
    # chat_template=False ignores the tokenizer's template
    assert tok.decode(encode_prompt(tok, messages, chat_template=False)[1:]) == "User: hi\nAssistant:"


@pytest.mark.parametrize(
    ("prompt", "field"),
    [
        ("", "prompt"),
        ("   \n", "prompt"),
        ([], "prompt"),
        ([{"role": "tool", "content": "x"}], "prompt[0].role"),
        ([{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}], "prompt[1].role"),
        ([{"role": "user", "content": 3}], "prompt[0].content"),
        (["just a string"], "prompt[0]"),
        ([{"role": "user", "content": ""}], "prompt"),
        (42, "prompt"),
    ],
)
def test_encode_prompt_errors_name_the_field(tiny: LoadedModel, prompt, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        encode_prompt(tiny.tokenizer, prompt)
    assert err.value.field == field
    assert str(err.value).startswith(field)
    if field.endswith(".role"):
        assert "system" in str(err.value) and "assistant" in str(err.value)


def test_encode_prompt_rejects_bad_chat_template_flag(tiny: LoadedModel) -> None:
    with pytest.raises(InvalidArgument) as err:
        encode_prompt(tiny.tokenizer, "hi", chat_template="yes")  # type: ignore[arg-type]
    assert err.value.field == "chat_template"


# ---------------------------------------------------------------- load_model


def test_load_model_from_dir_matches_in_memory(tiny: LoadedModel, tiny_dir: Path) -> None:
    lm = load_model(str(tiny_dir), progress=False)
    assert (lm.n_layers, lm.d_model, lm.vocab_size) == (tiny.n_layers, tiny.d_model, tiny.vocab_size)
    assert lm.name == tiny_dir.name and lm.quantized is None
    assert encode_prompt(lm.tokenizer, "Hello, wörld!") == encode_prompt(tiny.tokenizer, "Hello, wörld!")
    assert lm.tokenizer.decode(encode_prompt(lm.tokenizer, "Hello, wörld!"), skip_special_tokens=True) == (
        "Hello, wörld!"
    )
    assert torch.equal(_logits(lm), _logits(tiny))
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())


def test_load_model_bfloat16(tiny: LoadedModel, tiny_dir: Path) -> None:
    lm = load_model(str(tiny_dir), dtype="bfloat16", progress=False)
    assert lm.dtype == torch.bfloat16
    torch.testing.assert_close(_logits(lm), _logits(tiny), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_load_model_quantized_on_cpu(tiny: LoadedModel, tiny_dir: Path, quantize: str) -> None:
    import bitsandbytes as bnb

    lm = load_model(str(tiny_dir), quantize=quantize, progress=False)
    assert lm.quantized == quantize and len(lm.layers) == 2 and lm.d_model == 64
    linear_cls = bnb.nn.Linear4bit if quantize == "4bit" else bnb.nn.Linear8bitLt
    assert isinstance(lm.layers[0].self_attn.q_proj, linear_cls)
    got, want = _logits(lm), _logits(tiny)
    assert torch.isfinite(got).all()
    rel = ((got - want).norm() / want.norm()).item()
    print(f"{quantize}: relative logit error vs fp32 {rel:.4f}")
    # NF4 on a random d_model=64 model is coarse (~0.12 measured); int8 is ~0.01
    assert rel < (0.3 if quantize == "4bit" else 0.05)
    assert _greedy(lm, "Hi", n=4) is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_load_model_cuda_without_cuda(tiny_dir: Path) -> None:
    with pytest.raises(FailedPrecondition) as err:
        load_model(str(tiny_dir), device="cuda", progress=False)
    assert err.value.field == "device"


def test_load_model_detects_missing_weights(tiny_dir: Path, tmp_path: Path) -> None:
    broken = save_tiny_llama(tmp_path / "broken")
    tensors = load_file(str(broken / "model.safetensors"))
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InvalidArgument) as err:
        load_model(str(broken), progress=False)
    assert err.value.field == "model" and "up_proj" in str(err.value)


def test_load_model_errors_name_the_field(tiny_dir: Path, tmp_path: Path) -> None:
    cases = [
        ({"spec": str(tmp_path / "nope")}, "model", "default"),
        ({"spec": str(tmp_path)}, "model", "config.json"),
        ({"spec": str(tiny_dir / "config.json")}, "model", "config.json"),
        ({"spec": ""}, "model", "default"),
        ({"spec": str(tiny_dir), "quantize": "3bit"}, "quantize", "'4bit', '8bit'"),
        ({"spec": str(tiny_dir), "dtype": "float64"}, "dtype", "'bfloat16', 'float16', 'float32'"),
        ({"spec": str(tiny_dir), "device": "gpu0"}, "device", "cpu"),
    ]
    for kwargs, field, allowed in cases:
        with pytest.raises(InvalidArgument) as err:
            load_model(**kwargs, progress=False)
        assert err.value.field == field, kwargs
        assert str(err.value).startswith(f"{field}:") and allowed in str(err.value), str(err.value)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InvalidArgument) as err:
        load_model(str(tmp_path), progress=False)
    assert err.value.field == "model" and "weights" in str(err.value)


def test_wrap_model_rejects_unknown_layout() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=300, n_positions=32))
    with pytest.raises(FailedPrecondition) as err:
        wrap_model(model, byte_tokenizer(), name="gpt2")
    assert err.value.field == "model" and "gpt2" in str(err.value)


# ---------------------------------------------------------------- default-model cache (no real model)


def test_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STEERWATCH_CACHE", str(tmp_path))
    assert default_model_dir() == tmp_path / "models" / "gemma3-270m"


def test_prepare_is_atomic_and_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[Path] = []

    def fake_build(out: Path, stages) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / default_mod.MARKER).write_text(json.dumps(default_mod._expected_marker()))

    monkeypatch.setattr(default_mod, "_build", fake_build)
    target = prepare_default_model(tmp_path, quiet=True)
    assert target == default_model_dir(tmp_path) and is_prepared(target)
    assert prepare_default_model(tmp_path, quiet=True) == target and len(calls) == 1  # cached
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temp dirs left behind

    (target / default_mod.MARKER).unlink()  # an interrupted/old cache is rebuilt
    prepare_default_model(tmp_path, quiet=True)
    assert len(calls) == 2 and is_prepared(target)


def test_prepare_removes_abandoned_temp_dirs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    parent = default_model_dir(tmp_path).parent
    parent.mkdir(parents=True)
    old, fresh = parent / ".gemma3-270m.tmp-old", parent / ".gemma3-270m.tmp-live"
    old.mkdir()
    fresh.mkdir()
    os.utime(old, (time.time() - 3 * 3600,) * 2)

    def fake_build(out: Path, stages) -> None:
        (out / default_mod.MARKER).write_text(json.dumps(default_mod._expected_marker()))

    monkeypatch.setattr(default_mod, "_build", fake_build)
    prepare_default_model(tmp_path, quiet=True)
    assert not old.exists() and fresh.exists()  # a concurrent preparer's dir is left alone


def test_prepare_failure_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def failing_build(out: Path, stages) -> None:
        (out / "model.safetensors").write_text("partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(default_mod, "_build", failing_build)
    with pytest.raises(RuntimeError):
        prepare_default_model(tmp_path, quiet=True)
    assert list(default_model_dir(tmp_path).parent.iterdir()) == []


# ---------------------------------------------------------------- the real default model (slow)


@pytest.mark.slow
def test_default_model_shape(default_model: LoadedModel) -> None:
    lm = default_model
    assert (lm.n_layers, lm.d_model, lm.vocab_size) == (18, 640, 262144)
    assert lm.name == "gemma-3-270m" and lm.quantized is None and lm.chat_template is False
    assert len(lm.layers) == 18 and lm.dtype == torch.float32
    assert is_prepared(default_model_dir())
    config = json.loads((default_model_dir() / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    assert lm.model.lm_head.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr()


@pytest.mark.slow
def test_default_tokenizer_adds_bos(default_model: LoadedModel) -> None:
    from transformers import AutoTokenizer

    tok = default_model.tokenizer
    assert tok("hi").input_ids[0] == tok.bos_token_id == 2
    fresh = AutoTokenizer.from_pretrained(str(default_model_dir()))  # as saved on disk, not patched by us
    assert fresh("hi").input_ids == [2, 2202]
    ids = encode_prompt(tok, "The capital of France is")
    assert ids[0] == 2 and ids.count(2) == 1


@pytest.mark.slow
def test_default_model_knows_paris(default_model: LoadedModel) -> None:
    # Greedy on "The capital of France is" gives "... the capital of the country of France. It is the
    # largest city in France ..." -- fluent, but no "Paris"; " Paris" is the 3rd most likely next token.
    text = _greedy(default_model, "The capital of France is", n=24)
    print(f"greedy: {text!r}")
    assert "France" in text and "The The" not in text
    with torch.no_grad():
        logits = _logits(default_model, "The capital of France is")[0, -1]
    paris = default_model.tokenizer(" Paris", add_special_tokens=False).input_ids[0]
    assert paris in logits.topk(5).indices.tolist()
    answer = _greedy(default_model, "Q: What is the capital of France?\nA:", n=12)
    print(f"Q/A greedy: {answer!r}")
    assert "Paris" in answer


@pytest.mark.slow
def test_default_lm_head_of_final_norm_gives_logits(default_model: LoadedModel) -> None:
    captured: list[torch.Tensor] = []
    handle = default_model.layers[-1].register_forward_hook(
        lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        logits = _logits(default_model, "Hello there")
    finally:
        handle.remove()
    with torch.no_grad():
        rebuilt = default_model.lm_head(default_model.final_norm(captured[0]))
    torch.testing.assert_close(rebuilt, logits, atol=1e-3, rtol=1e-4)


@pytest.mark.slow
def test_default_second_load_is_fast(default_model: LoadedModel) -> None:
    start = time.perf_counter()
    again = load_model("default", progress=False)
    elapsed = time.perf_counter() - start
    print(f"second load of the default model: {elapsed:.1f} s")
    assert again.n_layers == 18
    assert elapsed < 60  # ~4 s measured on 2 CPU cores; the bound only catches an accidental re-prepare
