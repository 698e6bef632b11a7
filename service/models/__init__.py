"""Model loading for steerwatch: the embedded default (Gemma 3 270M), local HF checkpoints, a tiny test LLaMA.

Public API::

    load_model(spec="default", *, quantize=None, dtype="float32", device="cpu", progress=True) -> LoadedModel
    tiny_llama(*, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, vocab_size=259, seed=0, ...) -> LoadedModel
    save_tiny_llama(dir, **same) -> Path
    encode_prompt(tokenizer, prompt, *, chat_template=None) -> list[int]
    prepare_default_model(cache_dir=None, *, quiet=False, force=False) -> Path
"""

from service.models.default import (
    DEFAULT_MODEL_NAME,
    cache_root,
    default_model_dir,
    is_prepared,
    prepare_default_model,
)
from service.models.loading import (
    DEFAULT_SPEC,
    DTYPE_CHOICES,
    QUANTIZE_CHOICES,
    LoadedModel,
    load_model,
    wrap_model,
)
from service.models.prompts import CHAT_ROLES, FALLBACK_ROLE_PREFIX, encode_prompt, format_fallback_chat
from service.models.tiny import TINY_CHAT_TEMPLATE, TINY_VOCAB, byte_tokenizer, save_tiny_llama, tiny_llama

__all__ = [
    "CHAT_ROLES",
    "DEFAULT_MODEL_NAME",
    "DEFAULT_SPEC",
    "DTYPE_CHOICES",
    "FALLBACK_ROLE_PREFIX",
    "QUANTIZE_CHOICES",
    "TINY_CHAT_TEMPLATE",
    "TINY_VOCAB",
    "LoadedModel",
    "byte_tokenizer",
    "cache_root",
    "default_model_dir",
    "encode_prompt",
    "format_fallback_chat",
    "is_prepared",
    "load_model",
    "prepare_default_model",
    "save_tiny_llama",
    "tiny_llama",
    "wrap_model",
]
