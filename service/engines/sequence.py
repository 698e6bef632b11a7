"""One request's generation state: tokens so far, incremental text with stop strings, and its events."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from service.engines.sampling import make_generator
from service.engines.types import Event, FinalEvent, FinishReason, GenerationRequest, TokenEvent
from steering.compile import CompiledRequest

log = logging.getLogger(__name__)


class Sequence:
    """Owned by the engine thread, except ``cancelled`` which any thread may set."""

    def __init__(self, req: GenerationRequest, compiled: CompiledRequest, prompt_ids: list[int],
                 emit: Callable[[Event], None], tokenizer: Any) -> None:
        self.req, self.compiled, self.prompt_ids = req, compiled, prompt_ids
        self.emit, self.tokenizer = emit, tokenizer
        self.generator = make_generator(req.sampling)
        self.generated: list[int] = []
        self.text = ""  # text emitted so far
        self.position = 0  # next absolute position in the cache
        self.cancelled = False
        self.done = False
        self.submitted_at = time.perf_counter()
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None

    @property
    def last_token(self) -> int:
        return self.generated[-1]

    def take(self, token: int, readings: dict[str, float], eos: set[int]) -> None:
        """Record a sampled token, stream its event, and finish when a stop condition holds."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token in eos:
            self.generated.append(token)
            self._send(TokenEvent(len(self.generated) - 1, token, "", "", readings))
            self.finish("stop", flush=True)
            return
        self.generated.append(token)
        full = self.tokenizer.decode(self.generated[:], skip_special_tokens=True)
        cut = _first_stop(full, self.req.sampling.stop)
        visible = full[:cut] if cut is not None else full[: len(full) - _holdback(full, self.req.sampling.stop)]
        if visible.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            visible = self.text
        delta = visible[len(self.text):] if visible.startswith(self.text) else ""
        self.text += delta
        piece = self.tokenizer.decode([token])
        self._send(TokenEvent(len(self.generated) - 1, token, delta, piece, readings))
        if cut is not None:
            self.finish("stop_string")
        elif len(self.generated) >= self.req.sampling.max_tokens:
            self.finish("length", flush=True)

    def _send(self, event: Event) -> None:
        """Deliver an event; a consumer that raises loses its request, never the engine's batch."""
        try:
            self.emit(event)
        except Exception:
            log.exception("event consumer failed; cancelling its request")
            self.cancelled = True

    def finish(self, reason: FinishReason, *, flush: bool = False, error: str | None = None) -> None:
        if self.done:
            return
        self.done = True
        if flush:
            full = self.tokenizer.decode(self.generated, skip_special_tokens=True)
            if full.startswith(self.text) and len(full) > len(self.text):
                self.text = full  # text held back for a stop string that never completed
        now = time.perf_counter()
        queue_s = (self.admitted_at or now) - self.submitted_at
        ttft = None if self.first_token_at is None else self.first_token_at - self.submitted_at
        self._send(FinalEvent(reason, self.text, len(self.prompt_ids), len(self.generated), queue_s, ttft,
                             now - self.submitted_at, list(self.compiled.applied), error))


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _holdback(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if s.startswith(text[-n:]):
                best = max(best, n)
                break
    return best
