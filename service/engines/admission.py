"""What every engine checks before a request may join a batch: its length limits, its prompt, and its
interventions compiled against the registry and the model. A bad request is refused here, alone, with
an error naming the field, and never reaches the batch."""

from __future__ import annotations

from typing import Any

from service.engines.types import GenerationRequest
from steering.compile import CompiledRequest, ModelShape, compile_spec
from steering.errors import FailedPrecondition, LimitExceeded, invalid
from steering.registry import Registry
from steering.spec import Limits


def encode_request(tokenizer: Any, req: GenerationRequest, max_prompt_tokens: int) -> list[int]:
    """The prompt's token ids (chat messages through the template), refused beyond the limit."""
    from service.models import encode_prompt

    prompt: Any = req.prompt if isinstance(req.prompt, str) else [m.model_dump() for m in req.prompt]
    ids = encode_prompt(tokenizer, prompt)
    if len(ids) > max_prompt_tokens:
        raise LimitExceeded(f"prompt: {len(ids)} tokens is beyond the limit; allowed 1..{max_prompt_tokens}",
                            field="prompt")
    if not ids:
        raise invalid("prompt", "encodes to no tokens")
    return ids


def admit(req: GenerationRequest, *, tokenizer: Any, max_prompt_tokens: int, max_new_tokens: int,
          registry: Registry, shape: ModelShape, limits: Limits, hooks: bool) -> tuple[list[int], CompiledRequest]:
    """(prompt ids, compiled interventions), or the error that refuses ``req``."""
    if req.sampling.max_tokens > max_new_tokens:
        raise LimitExceeded(f"sampling.max_tokens: {req.sampling.max_tokens} is beyond the limit; "
                            f"allowed 1..{max_new_tokens}", field="sampling.max_tokens")
    ids = encode_request(tokenizer, req, max_prompt_tokens)
    compiled = compile_spec(req.interventions, registry, shape, limits)
    if not compiled.empty and not hooks:
        raise FailedPrecondition("interventions: this engine was built without hooks (plain baseline)")
    return ids, compiled
