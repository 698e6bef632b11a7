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
        self.decoded = ""  # text decoded so far (may run ahead of ``text`` while a stop string could start)
        self._prefix = 0  # incremental detokenization offsets into ``generated``
        self._read = 0
        self.position = 0  # next absolute position in the cache
        self.cancelled = False
        self.done = False
        self.submitted_at = time.perf_counter()
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.gates_open: set[int] = set()  # gates already reported as fired

    @property
    def last_token(self) -> int:
        return self.generated[-1]

    def take(self, token: int, readings: dict[str, float], eos: set[int], gates: list[str] | None = None) -> None:
        """Record a sampled token, stream its event, and finish when a stop condition holds."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.generated.append(token)
        if token in eos:
            self._send(TokenEvent(len(self.generated) - 1, token, "", "", readings, gates or []))
            self.finish("stop", flush=True)
            return
        grown = self._detokenize()
        stops = self.req.sampling.stop
        # a stop string can only end in the new text or straddle into it from the last few characters
        search_from = max(0, len(self.decoded) - len(grown) - max((len(x) for x in stops), default=0))
        cut = _first_stop(self.decoded, stops, search_from)
        visible = self.decoded[:cut] if cut is not None else self.decoded[: len(self.decoded) - _holdback(self.decoded, stops)]
        delta = visible[len(self.text):]
        self.text += delta
        self._send(TokenEvent(len(self.generated) - 1, token, delta, self.tokenizer.decode([token]), readings,
                              gates or []))
        if cut is not None:
            self.finish("stop_string")
        elif len(self.generated) >= self.req.sampling.max_tokens:
            self.finish("length", flush=True)

    def _detokenize(self) -> str:
        """Append the text the newest token completes to ``decoded`` and return it.

        Incremental, as in vLLM's detokenizer: only tokens after ``_prefix`` are decoded each step, so
        the cost stays flat with output length; a token that ends mid-character adds nothing until the
        character completes.
        """
        prefix = self.tokenizer.decode(self.generated[self._prefix:self._read], skip_special_tokens=True)
        full = self.tokenizer.decode(self.generated[self._prefix:], skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        grown = full[len(prefix):]
        self.decoded += grown
        self._prefix, self._read = self._read, len(self.generated)
        return grown

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
        tail = ""
        if flush:
            full = self.tokenizer.decode(self.generated, skip_special_tokens=True)
            if full.startswith(self.text) and len(full) > len(self.text):
                tail = full[len(self.text):]  # held back for a stop string that never completed
                self.text = full
        now = time.perf_counter()
        queue_s = (self.admitted_at or now) - self.submitted_at
        ttft = None if self.first_token_at is None else self.first_token_at - self.submitted_at
        self._send(FinalEvent(reason, self.text, len(self.prompt_ids), len(self.generated), queue_s, ttft,
                             now - self.submitted_at, list(self.compiled.applied), error, tail))


def _first_stop(text: str, stops: list[str], start: int = 0) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
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
