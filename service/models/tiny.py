"""A tiny random-weight LLaMA with a byte-level tokenizer, built in-process for tests (no download).

Token ids 0..255 are the raw bytes, so any text (ASCII or UTF-8) round-trips through encode/decode;
``<bos>``, ``<eos>`` and ``<pad>`` follow at 256, 257 and 258. The tokenizer adds ``<bos>`` like a real
LLaMA 3 tokenizer does. Weights depend only on ``seed``: two builds with the same arguments are identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from service.models._progress import quiet_transformers
from service.models.loading import LoadedModel, parse_dtype, wrap_model
from steering.errors import invalid

if TYPE_CHECKING:  # transformers' model classes take seconds to import; load them on first use
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
BYTE_VOCAB = 256
TINY_VOCAB = BYTE_VOCAB + 3  # 256 bytes + <bos>, <eos>, <pad>

# A LLaMA-3-shaped chat template for tests that need a tokenizer with one; it emits the BOS itself,
# which is the case encode_prompt must not double.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-char map (the alphabet ByteLevel pre-tokenizer/decoder use)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def byte_tokenizer(*, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: id == byte value for 0..255, then <bos>=256, <eos>=257, <pad>=258."""
    from transformers import PreTrainedTokenizerFast

    mapping = _bytes_to_unicode()
    vocab = {mapping[b]: b for b in range(BYTE_VOCAB)}
    vocab.update({BOS: 256, EOS: 257, PAD: 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS, PAD])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 256)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=4096
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def _tiny_config(n_layers: int, d_model: int, n_heads: int, n_kv_heads: int, vocab_size: int) -> LlamaConfig:
    for field, value in (
        ("n_layers", n_layers),
        ("d_model", d_model),
        ("n_heads", n_heads),
        ("n_kv_heads", n_kv_heads),
    ):
        if value < 1:
            raise invalid(field, f"must be >= 1, got {value}")
    if d_model % n_heads:
        raise invalid("d_model", f"must be divisible by n_heads ({n_heads}), got {d_model}")
    if n_heads % n_kv_heads:
        raise invalid("n_kv_heads", f"must divide n_heads ({n_heads}), got {n_kv_heads}")
    if vocab_size < TINY_VOCAB:
        raise invalid("vocab_size", f"must be >= {TINY_VOCAB} (256 bytes + 3 specials), got {vocab_size}")
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=4 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=4096,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
        tie_word_embeddings=False,
    )


def _build(
    n_layers: int, d_model: int, n_heads: int, n_kv_heads: int, vocab_size: int, seed: int, dtype: str
) -> LlamaForCausalLM:
    from transformers import LlamaForCausalLM

    torch_dtype = parse_dtype(dtype)
    config = _tiny_config(n_layers, d_model, n_heads, n_kv_heads, vocab_size)
    # Random init draws from the global RNG; fork it so building a tiny model does not disturb callers.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.to(torch_dtype)  # type: ignore[arg-type]  # transformers' stub for .to is too narrow
    model.generation_config.pad_token_id = 258
    return model


def tiny_llama(
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    vocab_size: int = TINY_VOCAB,
    seed: int = 0,
    dtype: str = "float32",
    chat_template: str | None = None,
) -> LoadedModel:
    """A random-weight LlamaForCausalLM plus byte tokenizer, deterministic in ``seed``, on CPU."""
    model = _build(n_layers, d_model, n_heads, n_kv_heads, vocab_size, seed, dtype)
    return wrap_model(model, byte_tokenizer(chat_template=chat_template), name=f"tiny-llama-seed{seed}")


def save_tiny_llama(
    directory: str | Path,
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    vocab_size: int = TINY_VOCAB,
    seed: int = 0,
    dtype: str = "float32",
    chat_template: str | None = None,
) -> Path:
    """Write the same tiny model as a normal Hugging Face checkpoint directory; returns the directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model = _build(n_layers, d_model, n_heads, n_kv_heads, vocab_size, seed, dtype)
    with quiet_transformers():
        model.save_pretrained(out)
    byte_tokenizer(chat_template=chat_template).save_pretrained(out)
    return out
