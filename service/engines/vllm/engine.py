"""The vLLM engine: the same requests, events, monitors and steering as the HF engine, on vLLM's
continuous batching (``AsyncLLM``).

The service side validates and compiles each request exactly as the HF engine does (a bad request is
refused before vLLM sees it), makes sure every vector, probe and SAE it names is registered with the
workers (``collective_rpc``), and submits the prompt's token ids with the request's spec as JSON in
``SamplingParams.extra_args``. Generated tokens stream back as vLLM deltas; the readings of the position
that predicted each token arrive on the readout channel, and ``Sequence`` turns both into the engine's
events (stop strings, EOS, max tokens), so the servicer cannot tell the engines apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch

from service.engines.admission import admit, encode_request
from service.engines.hf import EngineLimits, _canonical_name
from service.engines.sequence import Sequence
from service.engines.types import Event, GenerationRequest, PromptEvent, QueuedEvents, Sampling
from service.engines.vllm.options import VLLMOptions
from service.engines.vllm.readouts import ReadoutChannel, RequestReadouts
from service.engines.vllm.worker import EXTRA_KEY
from steering.compile import CompiledRequest, ModelShape
from steering.errors import FailedPrecondition, LimitExceeded, Unavailable
from steering.registry import Registry
from steering.spec import InterventionSpec

log = logging.getLogger(__name__)

HOOKS_VERSION = "1"  # bump when the hook code changes: it names the compile cache directory


class AuxModel:
    """What the service keeps of the model when vLLM owns it: the tokenizer and its name."""

    def __init__(self, name: str, tokenizer: Any, n_layers: int, d_model: int) -> None:
        self.name, self.tokenizer, self.n_layers, self.d_model = name, tokenizer, n_layers, d_model


class VLLMEngine:
    """Batched generation with per-request reads and edits inside vLLM's workers."""

    def __init__(self, model_dir: str | Path, *, name: str | None = None, limits: EngineLimits | None = None,
                 options: VLLMOptions | None = None, hooks: bool = True, registry: Registry | None = None) -> None:
        from transformers import AutoConfig, AutoTokenizer

        self.model_dir = str(model_dir)
        config = AutoConfig.from_pretrained(self.model_dir)
        text = getattr(config, "text_config", None) or config
        name = name or Path(self.model_dir).name
        self.lm = AuxModel(name, AutoTokenizer.from_pretrained(self.model_dir), int(text.num_hidden_layers),
                           int(text.hidden_size))
        self.shape = ModelShape(self.lm.n_layers, self.lm.d_model, _canonical_name(name))
        self.registry = registry or Registry(self.lm.d_model)
        self.limits = limits or EngineLimits()
        self.options = options or VLLMOptions()
        self._with_hooks = hooks
        self.llm: Any = None
        self.readouts = ReadoutChannel()
        self._sent: dict[tuple[str, str], Any] = {}
        self._sync_lock = asyncio.Lock()
        self._inflight = 0
        self.eos_ids = _eos_ids(self.model_dir, self.lm.tokenizer)
        self.canary: dict[str, Any] = {}

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> VLLMEngine:
        """Start vLLM (workers load the model and install the hooks), connect the readout channel,
        then prove the hooks are live with the canary. Raises when they are not."""
        from vllm import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        cpu = current_platform.is_cpu()
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # the hooks follow the legacy runner's batch layout
        if cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.options.kv_cache_gb))
        await self.readouts.start()
        eager = self.options.enforce_eager if self.options.enforce_eager is not None else cpu
        kwargs: dict[str, Any] = dict(
            model=self.model_dir, dtype=self.options.dtype, enforce_eager=eager, seed=self.options.seed,
            max_model_len=self.options.max_model_len, max_num_seqs=self.options.max_num_seqs,
            max_num_batched_tokens=self.options.max_num_batched_tokens,
            enable_prefix_caching=self.options.enable_prefix_caching,
            tensor_parallel_size=self.options.tensor_parallel_size,
            gpu_memory_utilization=self.options.gpu_memory_utilization,
            worker_cls=("service.engines.vllm.worker.SteerCPUWorker" if cpu
                        else "service.engines.vllm.worker.SteerGPUWorker") if self._with_hooks else "auto",
        )
        if not eager:
            kwargs["compilation_config"] = _compilation(cpu)
        if not cpu and self._with_hooks:
            kwargs["async_scheduling"] = False  # a step's layout is prepared, then run, then the next one
        arch = _architecture(self.model_dir)
        if arch is not None:
            kwargs["hf_overrides"] = {"architectures": [arch]}
        args = AsyncEngineArgs(**kwargs)
        self.llm = AsyncLLM.from_engine_args(args)
        if self._with_hooks:
            await self.llm.collective_rpc("steerwatch_setup", args=({
                "limits": self.limits.model_dump_json(include=set(_spec_limit_fields())),
                "model_name": self.shape.name, "readouts": self.readouts.address},))
            self.canary = await self._run_canary()
        return self

    async def astop(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
        await self.readouts.stop()

    def stop(self) -> None:
        """Synchronous stop for callers off the event loop (the readout socket is closed with it)."""
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None

    @property
    def alive(self) -> bool:
        """vLLM's engine core and output loop run (AsyncLLM.errored turns True when either died)."""
        return self.llm is not None and not self.llm.errored

    def abandon(self) -> None:
        """Nothing to do: vLLM ends every open stream with EngineDeadError itself."""

    @property
    def running(self) -> int:
        return self._inflight

    @property
    def queued(self) -> int:
        return 0  # vLLM's scheduler owns its queue; ``running`` counts every request not yet finished

    def call(self, fn: Any) -> Any:
        raise FailedPrecondition("engine: vLLM owns the model in its worker processes; extracting vectors "
                                 "from pairs and explanations need the HF engine (`--engine hf`) or the CLI")

    # ---- control plane ---------------------------------------------------------------------------
    async def worker_stats(self) -> list[dict[str, Any]]:
        return await self.llm.collective_rpc("steerwatch_stats")

    async def _sync(self, spec: InterventionSpec) -> None:
        """Send the workers every object ``spec`` names that they lack or hold an older version of."""
        async with self._sync_lock:
            items = []
            for kind, id_ in _sources(spec):
                obj = getattr(self.registry, kind)(id_)
                if self._sent.get((kind, id_)) is not obj:
                    items.append((kind, id_, obj))
            if not items:
                return
            buf = io.BytesIO()
            torch.save(items, buf)
            await self.llm.collective_rpc("steerwatch_register", args=(buf.getvalue(),))
            for kind, id_, obj in items:
                self._sent[(kind, id_)] = obj

    # ---- requests -----------------------------------------------------------------------------
    def open_stream(self, req: GenerationRequest) -> VLLMStream:
        """Validate and compile ``req`` (raising for a bad one), then start it."""
        if not self.alive:
            raise Unavailable("engine: not running (it stopped or failed); retry on another replica")
        ids, compiled = admit(req, tokenizer=self.lm.tokenizer, max_prompt_tokens=self._prompt_limit(),
                              max_new_tokens=self.limits.max_new_tokens, registry=self.registry, shape=self.shape,
                              limits=self.limits, hooks=self._with_hooks)
        if self._inflight >= self.options.max_num_seqs + self.limits.max_queue:
            raise LimitExceeded(f"limits.max_queue: the server is overloaded ({self.limits.max_queue} requests "
                                f"already wait for a batch slot); retry later or on another replica",
                                field="limits.max_queue")
        return VLLMStream(self, req, ids, compiled)

    def _prompt_limit(self) -> int:
        return min(self.limits.max_prompt_tokens, self.options.max_model_len - 1)

    def _encode(self, req: GenerationRequest) -> list[int]:
        return encode_request(self.lm.tokenizer, req, self._prompt_limit())

    async def generate(self, req: GenerationRequest) -> AsyncIterator[Event]:
        stream = self.open_stream(req)
        try:
            async for ev in stream:
                yield ev
        finally:
            stream.cancel()

    async def run(self, req: GenerationRequest) -> list[Event]:
        return [ev async for ev in self.generate(req)]

    def sampling_params(self, req: GenerationRequest, corr: str, spec_json: str | None, **extra: Any) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        s = req.sampling
        return SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                              seed=s.seed, ignore_eos=s.ignore_eos, detokenize=False,
                              output_kind=RequestOutputKind.DELTA,
                              extra_args={EXTRA_KEY: {"id": corr, "spec": spec_json}}, **extra)

    # ---- canary -------------------------------------------------------------------------------
    async def _run_canary(self) -> dict[str, Any]:
        """A huge random vector must change the first token's log-probability, and a projection on it
        must read non-zero at every prompt position. Anything else means the hooks are not in the
        forward pass (a stale compiled graph, a missed layer): refuse to serve rather than serve
        unsteered and unmonitored."""
        from vllm.inputs import TokensPrompt

        from steering.vectors import make_vector

        layer = self.shape.n_layers // 2
        g = torch.Generator().manual_seed(1234)
        v = torch.randn(self.shape.d_model, generator=g)
        vec = make_vector({layer: v / v.norm() * 1e4}, method="canary")
        buf = io.BytesIO()
        torch.save([("vector", "steerwatch:canary", vec)], buf)
        await self.llm.collective_rpc("steerwatch_register", args=(buf.getvalue(),))
        ids = self._encode(GenerationRequest(prompt="The canary sings"))
        spec = InterventionSpec.model_validate({
            "edits": [{"kind": "add", "vector": "steerwatch:canary", "coef": 1.0, "phase": "both"}],
            "reads": [{"name": "canary", "kind": "direction", "source": "steerwatch:canary", "layer": layer}]})
        probe = GenerationRequest(prompt="x", sampling=Sampling(max_tokens=1))
        results = []
        for spec_json in (None, spec.model_dump_json()):
            corr = f"canary-{uuid.uuid4().hex}"
            readouts = self.readouts.open(corr)
            try:
                prompt = TokensPrompt(prompt_token_ids=ids, cache_salt=corr)
                final = None
                async for out in self.llm.generate(prompt, self.sampling_params(probe, corr, spec_json, logprobs=1),
                                                   request_id=corr):
                    final = out
                assert final is not None
                lp = final.outputs[0].logprobs[0]
                if spec_json is not None:
                    await readouts.wait_for(range(len(ids)), {"canary"}, self.options.readout_timeout_s)
                results.append((sorted((t, round(x.logprob, 5)) for t, x in lp.items()), readouts))
            finally:
                self.readouts.close(corr)
        (plain, _), (steered, reads) = results
        values = [reads.values.get(p, {}).get("canary") for p in range(len(ids))]
        if plain == steered:
            raise FailedPrecondition("engine: canary failed: a 1e4-norm steering vector did not change the logits; "
                                     "the hooks are not in the compiled model (clear the compile cache)")
        if any(x is None or x == 0.0 for x in values):
            raise FailedPrecondition(f"engine: canary failed: readings missing or zero at prompt positions: {values}")
        log.info("vLLM canary passed: steered first token %s vs plain %s", steered[:1], plain[:1])
        return {"plain": plain, "steered": steered, "readings": values}


class VLLMStream(QueuedEvents):
    """One request on vLLM as the engine's events; ``cancel`` aborts it in vLLM (any time, idempotent)."""

    def __init__(self, engine: VLLMEngine, req: GenerationRequest, ids: list[int], compiled: CompiledRequest) -> None:
        self.engine, self.req, self.ids, self.compiled = engine, req, ids, compiled
        super().__init__()
        self.corr = req.request_id + "-" + uuid.uuid4().hex[:12] if req.request_id else uuid.uuid4().hex
        self.seq = Sequence(req, compiled, ids, self._queue.put_nowait, engine.lm.tokenizer)
        self.num_cached_tokens: int | None = None  # prompt tokens vLLM served from its prefix cache
        self.read_names = {r.name for r in compiled.reads}  # once per request, not per token
        engine._inflight += 1
        self._task = asyncio.create_task(self._drive(), name=f"vllm-{self.corr}")

    def cancel(self) -> None:
        if not self._task.done():
            self._task.cancel()

    def _salt(self, spec_json: str | None) -> str | None:
        """Prefix caching must never hand a steered request KV computed without its edits (or the other
        way round), and a monitored request must compute every prompt token to read it."""
        if self.compiled.reads or self.compiled.gates:
            return f"sw-read-{self.corr}"
        if spec_json is not None:
            return "sw-edit-" + hashlib.sha256(spec_json.encode()).hexdigest()[:24]
        return None

    async def _drive(self) -> None:
        from vllm.inputs import TokensPrompt

        engine, seq = self.engine, self.seq
        spec_json = None if self.compiled.empty else self.req.interventions.model_dump_json()
        readouts = engine.readouts.open(self.corr) if spec_json is not None else None
        try:
            if spec_json is not None:
                await engine._sync(self.req.interventions)
            prompt = TokensPrompt(prompt_token_ids=self.ids)
            salt = self._salt(spec_json)
            if salt is not None:
                prompt["cache_salt"] = salt
            params = engine.sampling_params(self.req, self.corr, spec_json)
            # aclosing: ending early (stop string, policy stop, missing readings) closes the generator,
            # which aborts the request inside vLLM at once instead of whenever it is collected
            async with contextlib.aclosing(engine.llm.generate(prompt, params, request_id=self.corr)) as outputs:
                async for out in outputs:
                    if await self._consume(out, readouts):
                        return
        except asyncio.CancelledError:
            seq.finish("cancelled")
        except Exception as exc:  # engine failure: this request ends with an error, the server lives on
            log.exception("vLLM request %s failed", self.corr)
            seq.finish("error", error=f"engine: {type(exc).__name__}: {exc}")
        finally:
            if not seq.done:
                seq.finish("cancelled")
            engine.readouts.close(self.corr)
            engine._inflight -= 1

    async def _consume(self, out: Any, readouts: RequestReadouts | None) -> bool:
        """Take one vLLM output's new tokens; True once the sequence is over."""
        seq = self.seq
        if seq.admitted_at is None:
            seq.admitted_at = time.perf_counter()
            self.num_cached_tokens = out.num_cached_tokens
        for tok in out.outputs[0].token_ids:
            await self._take(int(tok), readouts)
            if seq.done:
                return True
        if out.finished:
            reason = out.outputs[0].finish_reason
            seq.finish("length" if reason == "length" else "cancelled" if reason == "abort" else "stop", flush=True)
            return True
        return False

    async def _take(self, tok: int, readouts: RequestReadouts | None) -> None:
        seq, n = self.seq, len(self.ids)
        k = len(seq.generated)
        readings: dict[str, float] = {}
        gates: list[str] = []
        if readouts is not None:
            names = self.read_names
            need = range(0, n) if k == 0 else range(n + k - 1, n + k)
            ok = await readouts.wait_for(need, names, self.engine.options.readout_timeout_s) if names else True
            if readouts.error is not None:
                seq.finish("error", error=readouts.error)
                return
            if not ok:
                seq.finish("error", error=f"engine: readings for token {k} did not arrive within "
                                          f"{self.engine.options.readout_timeout_s} s")
                return
            if k == 0 and names:
                seq._send(self._prompt_event(readouts, names))
            readings = {name: readouts.values[n + k - 1][name] for name in names}
            gates = [g for g, on_prompt, at in readouts.gates if not on_prompt and at == k]
        seq.take(tok, readings, set() if self.req.sampling.ignore_eos else self.engine.eos_ids, gates)

    def _prompt_event(self, readouts: RequestReadouts, names: set[str]) -> PromptEvent:
        n = len(self.ids)
        values = {name: [readouts.values[p][name] for p in range(n)] for name in sorted(names)}
        tok = self.engine.lm.tokenizer
        gates = {g: at for g, on_prompt, at in readouts.gates if on_prompt}
        return PromptEvent([tok.decode([t]) for t in self.ids], list(self.ids), values, gates)


def _sources(spec: InterventionSpec) -> list[tuple[str, str]]:
    """(registry kind, id) of everything a spec names."""
    out: list[tuple[str, str]] = []
    for e in spec.edits:
        out.append(("sae", e.sae) if e.kind == "clamp" else ("vector", e.vector))
    kinds = {"probe": "probe", "direction": "vector", "sae_feature": "sae"}
    out.extend((kinds[r.kind], r.source) for r in spec.reads)
    return list(dict.fromkeys(out))


def _spec_limit_fields() -> list[str]:
    from steering.spec import Limits

    return list(Limits.model_fields)


def _compilation(cpu: bool) -> dict[str, Any]:
    """torch.compile with our own cache directory (hooks do not change vLLM's cache key, so a shared cache
    could hand back a graph compiled without them). On GPU the layer op is a piecewise split point, so
    CUDA graphs are captured around it while it runs eagerly (full-graph capture would freeze it)."""
    from service.models.default import cache_root

    config: dict[str, Any] = {"cache_dir": str(cache_root() / "vllm-compile" / f"hooks-v{HOOKS_VERSION}")}
    if not cpu:
        from vllm.config import CompilationConfig

        config["splitting_ops"] = [*CompilationConfig._attention_ops, "vllm::unified_kv_cache_update",
                                   "vllm::unified_mla_kv_cache_update", "steerwatch::layer_step"]
        config["cudagraph_mode"] = "PIECEWISE"
    return config


def _architecture(model_dir: str) -> str | None:
    """The causal-LM class for a config that names none (the prepared default model's does not, and
    vLLM would then load it as an embedding model)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = AutoConfig.from_pretrained(model_dir)
    if getattr(config, "architectures", None):
        return None
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)


def _eos_ids(model_dir: str, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    try:
        from transformers import GenerationConfig

        value: Any = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except (OSError, ValueError):
        value = None
    for v in (value, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list | tuple):
            ids.update(int(x) for x in v)
    return ids


@contextlib.asynccontextmanager
async def running_engine(model_dir: str | Path, **kwargs: Any) -> AsyncIterator[VLLMEngine]:
    """Start an engine for a block (tests, benchmarks) and always shut it down."""
    engine = VLLMEngine(model_dir, **kwargs)
    try:
        yield await engine.start()
    finally:
        await engine.astop()
