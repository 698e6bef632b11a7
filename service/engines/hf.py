"""The transformers engine: continuous batching over a left-padded KV cache, with the core in hooks.

One worker thread owns the model. Each loop turn it drops cancelled requests (their slots are free
before the next forward), prefills newly admitted requests together, merges them into the running
batch, and runs one decode step for every running request. Requests are validated and compiled on the
caller's thread, so a bad request is refused alone and never reaches the batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import torch
from transformers import DynamicCache

from service.engines import kv
from service.engines.admission import admit
from service.engines.sampling import sample
from service.engines.sequence import Sequence
from service.engines.types import Event, FinalEvent, GenerationRequest, PromptEvent, QueuedEvents
from steering.batch import BatchPlan, row_of
from steering.compile import ModelShape
from steering.errors import LimitExceeded, Unavailable
from steering.hooks import LayerHooks
from steering.registry import Registry
from steering.spec import Limits

log = logging.getLogger(__name__)


class EngineLimits(Limits):
    """Engine-wide bounds on top of the per-edit limits."""

    max_batch: int = 16
    max_queue: int = 256
    max_prompt_tokens: int = 4096
    max_new_tokens: int = 2048


class Handle:
    """A submitted request: cancel it from any thread."""

    def __init__(self, seq: Sequence, wake: Callable[[], None]) -> None:
        self._seq, self._wake = seq, wake

    def cancel(self) -> None:
        self._seq.cancelled = True
        self._wake()


class EventStream(QueuedEvents):
    """A submitted request's events on the caller's event loop; ``cancel`` ends it at the next step."""

    def __init__(self, engine: HFEngine, req: GenerationRequest) -> None:
        super().__init__()
        loop = asyncio.get_running_loop()

        def emit(ev: Event) -> None:
            loop.call_soon_threadsafe(self._queue.put_nowait, ev)

        self._handle = engine.submit(req, emit)

    def cancel(self) -> None:
        """Cancel unless already finished (idempotent, any thread)."""
        if not self.finished:
            self._handle.cancel()


class HFEngine:
    """Batched generation with per-request reads and edits on a transformers model."""

    def __init__(self, lm: Any, registry: Registry | None = None, limits: EngineLimits | None = None,
                 *, hooks: bool = True) -> None:
        self.lm = lm
        self.shape = ModelShape(lm.n_layers, lm.d_model, _canonical_name(lm.name))
        self.registry = registry or Registry(lm.d_model)
        self.limits = limits or EngineLimits()
        self.hooks = LayerHooks(lm.layers)
        self._with_hooks = hooks  # False: the plain engine that benchmarks compare against
        self._waiting: queue.Queue[Sequence] = queue.Queue()
        self._running: list[Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self._plan: BatchPlan | None = None
        self._wake_event = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.eos_ids = _eos_ids(lm)
        self._calls: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = queue.Queue()

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> HFEngine:
        """Install the hooks and start the worker; an engine may be stopped and started again."""
        if self._thread is None:
            self._stop.clear()
            if self._with_hooks:
                self.hooks.install()
            self._thread = threading.Thread(target=self._loop, name="steerwatch-hf-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake_event.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.hooks.remove()  # a stopped engine leaves the model exactly as it found it

    def __enter__(self) -> HFEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        """The engine thread runs. It survives a failing step; it dies only of something fatal."""
        return self._thread is not None and self._thread.is_alive()

    def abandon(self) -> None:
        """After the engine thread died: end every request it held, so no stream waits forever."""
        if not self.alive:
            self._end_all_on_stop()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return self._waiting.qsize()

    # ---- submission ------------------------------------------------------------------------
    def submit(self, req: GenerationRequest, emit: Callable[[Event], None]) -> Handle:
        """Validate and enqueue ``req``; events go to ``emit`` (called on the engine thread)."""
        if self._stop.is_set():
            raise Unavailable("engine: shutting down; retry on another replica")
        if self._thread is not None and not self._thread.is_alive():  # started, then died (not yet started: queue)
            raise Unavailable("engine: not running (it stopped or failed); retry on another replica")
        ids, compiled = admit(req, tokenizer=self.lm.tokenizer, max_prompt_tokens=self.limits.max_prompt_tokens,
                              max_new_tokens=self.limits.max_new_tokens, registry=self.registry, shape=self.shape,
                              limits=self.limits, hooks=self._with_hooks)
        if self._waiting.qsize() >= self.limits.max_queue:
            raise LimitExceeded(f"limits.max_queue: the server is overloaded ({self.limits.max_queue} requests "
                                f"already wait for a batch slot); retry later or on another replica",
                                field="limits.max_queue")
        seq = Sequence(req, compiled, ids, emit, self.lm.tokenizer)
        self._waiting.put(seq)
        self._wake_event.set()
        return Handle(seq, self._wake_event.set)

    def stream(self, req: GenerationRequest) -> Iterator[Event]:
        """Blocking iterator over a request's events (for the CLI and tests)."""
        q: queue.Queue[Event] = queue.Queue()
        handle = self.submit(req, q.put)
        done = False
        try:
            while not done:
                ev = q.get()
                done = isinstance(ev, FinalEvent)
                yield ev
        finally:
            if not done:
                handle.cancel()

    def open_stream(self, req: GenerationRequest) -> EventStream:
        """Submit ``req`` and return its events as an async iterator that can be cancelled."""
        return EventStream(self, req)

    async def generate(self, req: GenerationRequest) -> AsyncIterator[Event]:
        """Async iterator over a request's events; closing it (client gone) cancels the request."""
        stream = self.open_stream(req)
        try:
            async for ev in stream:
                yield ev
        finally:
            stream.cancel()

    def run(self, req: GenerationRequest) -> list[Event]:
        """All events of one request."""
        return list(self.stream(req))

    # ---- the loop --------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                try:
                    self._turn()
                except Exception:  # a step failed: end its requests, keep serving others
                    log.exception("engine step failed")
                    self._fail_all("internal error in the engine step")
        self._end_all_on_stop()

    def _end_all_on_stop(self) -> None:
        """Nobody waits forever on a stopped engine: running and queued requests end as cancelled."""
        for s in self._running:
            s.finish("cancelled", error="engine stopped")
        while True:
            try:
                self._waiting.get_nowait().finish("cancelled", error="engine stopped")
            except queue.Empty:
                break
        self._running, self._cache, self._mask, self._plan = [], None, None, None

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Run ``fn`` on the engine thread between two steps (for other forwards on the same model,
        e.g. extracting a vector: the hooks and the model are only ever used by one thread)."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if self._thread is None:
            raise Unavailable("engine: not running")
        self._calls.put((fn, fut))
        self._wake_event.set()
        return fut

    def _run_calls(self) -> None:
        while True:
            try:
                fn, fut = self._calls.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except Exception as exc:  # handed to the caller, never to the batch
                    fut.set_exception(exc)

    def _turn(self) -> None:
        self._run_calls()
        self._drop_finished()
        new = self._admit()
        if new:
            try:
                self._prefill(new)
            except Exception:  # not running yet, so _fail_all would miss them: their clients would wait forever
                for seq in new:
                    if not seq.done:
                        seq.finish("error", error="internal error in the engine step")
                raise
            self._drop_finished()  # ended at their first token (EOS, max_tokens=1, error)
        if self._running:
            self._decode()
        elif not new:
            self._wake_event.wait(0.05)
            self._wake_event.clear()

    def _admit(self) -> list[Sequence]:
        new: list[Sequence] = []
        while len(self._running) + len(new) < self.limits.max_batch:
            try:
                seq = self._waiting.get_nowait()
            except queue.Empty:
                break
            if seq.cancelled:
                seq.finish("cancelled")
                continue
            seq.admitted_at = time.perf_counter()
            new.append(seq)
        return new

    def _prefill(self, new: list[Sequence]) -> None:
        width = max(len(s.prompt_ids) for s in new)
        pad = self.lm.tokenizer.pad_token_id or 0
        dev = self.lm.device
        ids = torch.full((len(new), width), pad, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for i, s in enumerate(new):
            ids[i, width - len(s.prompt_ids):] = torch.tensor(s.prompt_ids)
            mask[i, width - len(s.prompt_ids):] = 1
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        plan = _plan_for([s.compiled for s in new], self.shape.d_model, dev)
        rows = torch.tensor([row_of(i, "prompt") for i in range(len(new))])[:, None] * mask  # pads: row 0
        cache = DynamicCache(config=self.lm.model.config)
        logits = self._forward(ids, mask, pos, cache, plan, rows.reshape(-1), prompt_ends=True)
        reads = self._host_reads(plan)
        opened = self._prompt_gates(new, plan)
        first = self._new_gates(new, plan)
        for i, s in enumerate(new):
            s.position = len(s.prompt_ids)
            if plan is not None and plan.read_slots[i]:
                s.emit(self._prompt_event(s, plan, reads, i, width, opened[i]))
        self._merge(new, cache, mask.to(dev))
        for i, s in enumerate(new):
            last = {slot.name: reads[(slot.layer, slot.after_edits)][i * width + width - 1, slot.column].item()
                    for slot in (plan.read_slots[i] if plan is not None else [])}
            self._advance(s, logits[i], last, first[i])

    def _prompt_gates(self, new: list[Sequence], plan: BatchPlan | None) -> list[dict[str, int]]:
        """Gates the prompt fired (name -> prompt position). A gate fired by the last prompt position
        in the generation series is token 0's, reported with that token."""
        opened: list[dict[str, int]] = [{} for _ in new]
        if plan is None or not plan.n_gates:
            return opened
        for i, (s, origins) in enumerate(zip(new, plan.gate_origins(), strict=True)):
            for j, (fired, on_prompt, at) in enumerate(origins):
                if fired and on_prompt:
                    s.gates_open.add(j)
                    opened[i][s.compiled.gates[j].spec.name] = at
        return opened

    def _decode(self) -> None:
        seqs = self._running
        dev = self.lm.device
        ids = torch.tensor([[s.last_token] for s in seqs], dtype=torch.long)
        assert self._mask is not None
        self._mask = torch.cat([self._mask, torch.ones(len(seqs), 1, dtype=self._mask.dtype, device=dev)], 1)
        pos = torch.tensor([[s.position] for s in seqs], dtype=torch.long)
        rows = torch.tensor([row_of(i, "generation") for i in range(len(seqs))])
        logits = self._forward(ids, self._mask, pos, self._cache, self._plan, rows)
        reads = self._host_reads(self._plan)
        opened = self._new_gates(seqs, self._plan)
        for i, s in enumerate(seqs):
            s.position += 1
            slots = self._plan.read_slots[i] if self._plan is not None else []
            values = {slot.name: reads[(slot.layer, slot.after_edits)][i, slot.column].item() for slot in slots}
            self._advance(s, logits[i], values, opened[i])
        self.steps += 1

    @staticmethod
    def _new_gates(seqs: list[Sequence], plan: BatchPlan | None) -> list[list[str]]:
        """Names of the gates that latched in this step, per sequence (one small copy to the host,
        next to the readings' copy; the steering itself already switched on inside the step)."""
        flags = plan.gate_flags() if plan is not None else None
        if flags is None:
            return [[] for _ in seqs]
        host = flags.cpu().tolist()
        out = []
        for i, s in enumerate(seqs):
            names = []
            for j, g in enumerate(s.compiled.gates):
                if host[i][j] and j not in s.gates_open:
                    s.gates_open.add(j)
                    names.append(g.spec.name)
            out.append(names)
        return out

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any,
                 plan: BatchPlan | None, rows: torch.Tensor, prompt_ends: bool = False) -> torch.Tensor:
        dev = self.lm.device
        self.hooks.set_step(plan, rows.to(dev) if plan is not None else None, (ids.shape[0], ids.shape[1]),
                            prompt_ends)
        try:
            out = self.lm.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                                past_key_values=cache, use_cache=True, logits_to_keep=1)
        finally:
            self.hooks.plan = None
        return out.logits[:, -1, :].float()

    def _host_reads(self, plan: BatchPlan | None) -> dict[tuple[int, bool], torch.Tensor]:
        """The step's readings on the CPU, keyed by (layer, after_edits): one transfer per table."""
        out = {}
        for layer, (pre, post) in self.hooks.reads.items():
            if pre is not None:
                out[(layer, False)] = pre.cpu()
            if post is not None:
                out[(layer, True)] = post.cpu()
        return out

    def _prompt_event(self, s: Sequence, plan: BatchPlan, reads: dict, i: int, width: int,
                      gates: dict[str, int]) -> PromptEvent:
        n = len(s.prompt_ids)
        start = i * width + width - n
        values = {slot.name: reads[(slot.layer, slot.after_edits)][start:start + n, slot.column].tolist()
                  for slot in plan.read_slots[i]}
        toks = [self.lm.tokenizer.decode([t]) for t in s.prompt_ids]
        return PromptEvent(toks, list(s.prompt_ids), values, gates)

    def _eos_for(self, s: Sequence) -> set[int]:
        return set() if s.req.sampling.ignore_eos else self.eos_ids

    def _advance(self, s: Sequence, logits: torch.Tensor, readings: dict[str, float],
                 gates: list[str] | None = None) -> None:
        """Sample and record one token. A request whose logits went NaN/+inf (an edit too strong for the
        model) ends alone with an error; the other rows of the batch are independent and carry on."""
        if bool(torch.isnan(logits).any() or torch.isposinf(logits).any()):
            s.finish("error", error="non-finite logits: an edit of this request is too strong for the model")
            return
        s.take(sample(logits, s.req.sampling, s.generator), readings, self._eos_for(s), gates)

    def _merge(self, new: list[Sequence], cache: DynamicCache, mask: torch.Tensor) -> None:
        if self._cache is None or self._mask is None or not self._running:
            self._cache, self._mask = cache, mask
        else:
            self._cache, self._mask = kv.merge(self._cache, self._mask, cache, mask)
        self._running = self._running + new
        self._save_gates()
        self._plan = _plan_for([s.compiled for s in self._running], self.shape.d_model, self.lm.device)

    def _drop_finished(self) -> None:
        for s in self._running:
            if s.cancelled and not s.done:
                s.finish("cancelled")
        keep = [i for i, s in enumerate(self._running) if not s.done]
        if len(keep) == len(self._running):
            return
        if not keep:
            self._running, self._cache, self._mask, self._plan = [], None, None, None
            return
        assert self._cache is not None and self._mask is not None
        self._cache, self._mask = kv.select(self._cache, self._mask, keep)
        self._running = [self._running[i] for i in keep]
        self._save_gates()
        self._plan = _plan_for([s.compiled for s in self._running], self.shape.d_model, self.lm.device)

    def _save_gates(self) -> None:
        """The running plan's gate state goes back to its requests before the plan is replaced."""
        if self._plan is not None:
            self._plan.save_gates()

    def _fail_all(self, message: str) -> None:
        for s in self._running:
            if not s.done:
                s.finish("error", error=message)
        self._running, self._cache, self._mask, self._plan = [], None, None, None


def _plan_for(compiled: list, d_model: int, device: Any) -> BatchPlan | None:
    """None when no request reads or edits anything: the hooks then stay idle (bit-identical path)."""
    if all(c.empty for c in compiled):
        return None
    return BatchPlan([None if c.empty else c for c in compiled], d_model, device)


def _canonical_name(name: str) -> str:
    """The model name SAEs are checked against: only the embedded default's is canonical (a local
    checkpoint is named after its directory, which says nothing reliable about the model)."""
    from service.models import DEFAULT_MODEL_NAME

    return name if name == DEFAULT_MODEL_NAME else ""


def _eos_ids(lm: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(lm.model, "generation_config", None), lm.tokenizer):
        value = getattr(src, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids
