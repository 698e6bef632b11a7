"""Engine-neutral request and event types: what goes into an engine and what streams out of it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from steering.spec import InterventionSpec

FinishReason = Literal["stop", "length", "stop_string", "cancelled", "policy", "error"]


class Message(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class Sampling(BaseModel):
    """Per-request sampling. temperature 0 means greedy."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy; allowed 0..5")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus mass, allowed (0, 1]")
    top_k: int = Field(0, ge=0, le=100_000, description="0 = off")
    max_tokens: int = Field(64, ge=1, le=32_768, description="generated tokens at most")
    stop: list[str] = Field(default_factory=list, max_length=8, description="stop strings (not included in output)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="seed of this request's sampler")
    ignore_eos: bool = Field(False, description="keep generating past end-of-sequence (benchmarks, tests)")

    @field_validator("stop")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if any(not s or len(s) > 64 for s in v):
            raise ValueError("each stop string must be 1..64 characters")
        return v


class GenerationRequest(BaseModel):
    """A prompt (raw text or chat messages), sampling, and what to read and steer."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | list[Message]
    sampling: Sampling = Field(default_factory=Sampling)
    interventions: InterventionSpec = Field(default_factory=InterventionSpec)
    request_id: str = ""

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, v: str | list[Message]) -> str | list[Message]:
        if (isinstance(v, str) and not v) or (isinstance(v, list) and not v):
            raise ValueError("prompt must not be empty")
        return v


@dataclass
class PromptEvent:
    """Readings over the prompt, one value per prompt token (position) and reading name."""

    tokens: list[str]
    token_ids: list[int]
    readings: dict[str, list[float]]
    gates: dict[str, int] = field(default_factory=dict)  # gate name -> prompt position where it fired


@dataclass
class TokenEvent:
    """One generated token. Its readings come from the position that predicted it (the state in which
    the model chose this token), so a monitor can act before the token is shown."""

    index: int
    token_id: int
    text: str  # the text this token adds (may be empty while a multi-byte character is incomplete)
    token: str  # the token's own text, for per-token views
    readings: dict[str, float]
    gates: list[str] = field(default_factory=list)  # gates that fired on the state that chose this token


@dataclass
class FinalEvent:
    """The end of a generation: why it stopped, usage, timings and what was applied.

    ``text`` is the whole output. ``tail`` is the part of it that no TokenEvent streamed (text held
    back because it could have been the start of a stop string): streamed deltas + tail == text.
    """

    finish_reason: FinishReason
    text: str
    prompt_tokens: int
    completion_tokens: int
    queue_s: float
    ttft_s: float | None
    total_s: float
    applied: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    tail: str = ""


Event = PromptEvent | TokenEvent | FinalEvent


class QueuedEvents:
    """A request's events as an async iterator over a queue on the caller's event loop, ending after the
    FinalEvent. Engines feed ``_queue`` and implement ``cancel``."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self.finished = False

    def __aiter__(self) -> QueuedEvents:
        return self

    async def __anext__(self) -> Event:
        if self.finished:
            raise StopAsyncIteration
        ev = await self._queue.get()
        self.finished = isinstance(ev, FinalEvent)
        return ev

    def cancel(self) -> None:
        raise NotImplementedError
