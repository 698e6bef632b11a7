"""LoadedModel and load_model: one handle on a causal LM with its tokenizer and the modules steering needs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from service.models._progress import Stages, quiet_transformers
from steering.errors import FailedPrecondition, InvalidArgument, invalid

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_SPEC = "default"
QUANTIZE_CHOICES: tuple[str, ...] = ("4bit", "8bit")
DTYPE_CHOICES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


@dataclass
class LoadedModel:
    """A causal LM ready for inference (eval mode, no grads) plus what steering/monitors need from it.

    ``layers`` is the ModuleList of decoder blocks (hook these for the residual stream), ``final_norm``
    the norm applied before ``lm_head``; ``lm_head(final_norm(h))`` gives logits (including any logit
    soft-capping the model applies). ``chat_template`` says whether the tokenizer carries one.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    n_layers: int
    d_model: int
    vocab_size: int
    layers: nn.ModuleList
    final_norm: nn.Module
    lm_head: nn.Module
    device: torch.device
    dtype: torch.dtype
    quantized: str | None
    chat_template: bool


class _SoftcappedHead(nn.Module):
    """lm_head followed by the tanh soft-capping some models (Gemma 2) apply to final logits."""

    def __init__(self, head: nn.Module, cap: float) -> None:
        super().__init__()
        self.head = head
        self.cap = cap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(hidden) / self.cap) * self.cap


def parse_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPE_CHOICES:
        raise invalid("dtype", f"must be one of {sorted(DTYPE_CHOICES)}, got {dtype!r}")
    return DTYPE_CHOICES[dtype]


def parse_quantize(quantize: str | None) -> str | None:
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise invalid("quantize", f"must be one of {list(QUANTIZE_CHOICES)} or None, got {quantize!r}")
    return quantize


def parse_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise invalid(
            "device", f"must be a torch device string such as 'cpu' or 'cuda:0', got {device!r}"
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FailedPrecondition(f"device: {device!r} requested but CUDA is not available", field="device")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _find_stack(model: nn.Module) -> tuple[nn.ModuleList, nn.Module]:
    """Decoder layers and final norm for LLaMA/Gemma/Mistral/Qwen-style models (model.model.layers)."""
    inner = getattr(model, "model", None)
    for candidate in (inner, getattr(inner, "language_model", None)):
        layers = getattr(candidate, "layers", None)
        norm = getattr(candidate, "norm", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0 and isinstance(norm, nn.Module):
            return layers, norm
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise FailedPrecondition(
        f"model: unsupported architecture {model_type!r} ({type(model).__name__}); expected decoder layers at "
        "model.model.layers with a final norm at model.model.norm (LLaMA, Gemma, Mistral, Qwen style)",
        field="model",
    )


def wrap_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, name: str, quantized: str | None = None
) -> LoadedModel:
    """Put ``model`` in eval mode with grads off and describe it as a LoadedModel."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    layers, final_norm = _find_stack(model)
    text_config: Any = model.config.get_text_config()
    head = model.get_output_embeddings()
    if head is None:
        raise FailedPrecondition(
            f"model: {type(model).__name__} has no output embedding (lm_head)", field="model"
        )
    cap = getattr(text_config, "final_logit_softcapping", None)
    lm_head: nn.Module = _SoftcappedHead(head, float(cap)) if cap else head
    embed: Any = model.get_input_embeddings()
    dtype = embed.weight.dtype
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        n_layers=len(layers),
        d_model=int(text_config.hidden_size),
        vocab_size=int(text_config.vocab_size),
        layers=layers,
        final_norm=final_norm,
        lm_head=lm_head,
        device=next(model.parameters()).device,
        dtype=dtype,
        quantized=quantized,
        chat_template=bool(getattr(tokenizer, "chat_template", None)),
    )


def _checkpoint_dir(spec: str) -> Path:
    path = Path(spec).expanduser()
    if not path.exists():
        raise invalid("model", f"{spec!r} is neither {DEFAULT_SPEC!r} nor an existing checkpoint directory")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise invalid(
            "model",
            f"{spec!r} is not a Hugging Face checkpoint directory (expected a folder with config.json)",
        )
    if not any(next(path.glob(g), None) for g in _WEIGHT_GLOBS):
        raise invalid(
            "model", f"{spec!r} has config.json but no weights (*.safetensors or pytorch_model*.bin)"
        )
    return path


def _quant_config(quantize: str | None, compute_dtype: torch.dtype) -> Any:
    if quantize is None:
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise FailedPrecondition(
            f"quantize: {quantize!r} needs bitsandbytes; install steerwatch[quant]", field="quantize"
        ) from exc
    if quantize == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_type="nf4"
        )
    _quiet_int8_cast_warning()
    return BitsAndBytesConfig(load_in_8bit=True)


class _OnceFilter(logging.Filter):
    """Let a message prefix through once; bitsandbytes logs its int8 cast warning on every matmul."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        if self.seen:
            return False
        self.seen = True
        return True


def _quiet_int8_cast_warning() -> None:
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OnceFilter) for f in log.filters):
        log.addFilter(_OnceFilter("MatMul8bitLt: inputs will be cast"))


def load_model(
    spec: str = DEFAULT_SPEC,
    *,
    quantize: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    progress: bool = True,
) -> LoadedModel:
    """Load ``"default"`` (embedded Gemma 3 270M, prepared once into the cache) or a local HF checkpoint dir.

    ``quantize`` is None, "4bit" (bitsandbytes NF4, compute in ``dtype``) or "8bit" (LLM.int8; bitsandbytes 0.50
    runs both on CPU, casting activations to float16 for the int8 matmul).
    ``dtype`` is one of float32/bfloat16/float16; ``device`` a torch device string. Errors name the field.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantize = parse_quantize(quantize)
    torch_dtype = parse_dtype(dtype)
    dev = parse_device(device)
    if not isinstance(spec, str) or not spec:
        raise invalid("model", f"must be {DEFAULT_SPEC!r} or a checkpoint directory path, got {spec!r}")
    if spec == DEFAULT_SPEC:
        from service.models.default import DEFAULT_MODEL_NAME, prepare_default_model

        path, name = prepare_default_model(quiet=not progress), DEFAULT_MODEL_NAME
    else:
        path = _checkpoint_dir(spec)
        name = path.resolve().name
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    qconfig = _quant_config(quantize, torch_dtype)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": str(dev)}
    with Stages(f"model {name}", quiet=not progress) as stages, quiet_transformers():
        with stages.stage("loading tokenizer"):
            tokenizer = _wrap_errors(spec, lambda: AutoTokenizer.from_pretrained(str(path)))
            if spec == DEFAULT_SPEC:
                # The saved post-processor already adds <bos>, but transformers 5 reloads the flag as False;
                # set it so a later add_eos_token toggle cannot rebuild the post-processor without BOS.
                tokenizer.add_bos_token = True
        with stages.stage(f"loading weights ({quantize or dtype}, {dev})"):
            model, info = _wrap_errors(
                spec,
                lambda: AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True, **kwargs),
            )
            bad = list(info.get("missing_keys") or []) + [str(k) for k in info.get("mismatched_keys") or []]
            if bad:  # transformers would silently random-initialise these
                raise invalid("model", f"{spec!r} is missing or has mis-shaped weights: {bad[:5]}")
            if qconfig is None:
                model.to(dev)
    return wrap_model(model, tokenizer, name=name, quantized=quantize)


def _wrap_errors(spec: str, fn: Any) -> Any:
    """Turn transformers' loading errors into InvalidArgument on ``model`` (ours pass through)."""
    try:
        return fn()
    except (InvalidArgument, FailedPrecondition):
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise invalid("model", f"could not load {spec!r}: {exc}") from exc


__all__ = [
    "DEFAULT_SPEC",
    "DTYPE_CHOICES",
    "QUANTIZE_CHOICES",
    "LoadedModel",
    "load_model",
    "parse_dtype",
    "parse_quantize",
    "wrap_model",
]
