"""Running the rows: timing each request's tokens, repeats, medians and ratios to the plain engine."""


from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from service.bench.scenarios import PROMPT, RUN_TIMEOUT_S, SAE_WIDTH, Scenario, register_sources, scenarios
from service.engines.hf import EngineLimits, HFEngine
from service.engines.types import Event, FinalEvent, GenerationRequest, Sampling, TokenEvent
from steering.errors import invalid
from steering.registry import Registry
from steering.spec import InterventionSpec


@dataclass(frozen=True)
class Measurement:
    """One run of a scenario. ``others_cores``: CPU used meanwhile by other processes, in cores."""

    tokens: int
    wall_s: float
    ttft_s: float
    tpot_s: float
    others_cores: float = float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


@dataclass(frozen=True)
class Row:
    """The median of a scenario's runs, and its ratios to the plain engine at the same batch size."""

    name: str
    batch: int
    tokens_per_s: float
    tpot_ms: float
    ttft_ms: float
    speed_ratio: float  # tokens/s relative to plain (1.0 = as fast)
    tpot_ratio: float  # TPOT relative to plain (1.0 = same per-token latency)
    ttft_ratio: float
    others_cores: float  # median CPU other processes used during the runs (contention), in cores
    runs: int
    tpot_min_ms: float = float("nan")  # spread of TPOT over the runs
    tpot_max_ms: float = float("nan")


@dataclass
class BenchResult:
    """Rows in display order plus the description of the machine and run."""

    rows: list[Row]
    info: dict[str, str] = field(default_factory=dict)


class _Recorder:
    """Collects event arrival times for a batch of requests (emit runs on the engine thread)."""

    def __init__(self, n: int) -> None:
        self.token_times: list[list[float]] = [[] for _ in range(n)]
        self.finals: list[FinalEvent | None] = [None] * n
        self.last_final = 0.0
        self._left = n
        self._lock = threading.Lock()
        self.done = threading.Event()

    def emitter(self, i: int) -> Callable[[Event], None]:
        def emit(ev: Event) -> None:
            now = time.perf_counter()
            if isinstance(ev, TokenEvent):
                self.token_times[i].append(now)
            elif isinstance(ev, FinalEvent):
                self.finals[i] = ev
                with self._lock:
                    self.last_final = max(self.last_final, now)
                    self._left -= 1
                    if self._left == 0:
                        self.done.set()

        return emit

    def measurement(self, t0: float) -> Measurement:
        for f in self.finals:
            if f is None or f.finish_reason != "length":
                reason = "missing" if f is None else f"{f.finish_reason}: {f.error or ''}"
                raise RuntimeError(f"bench: a request did not run to max_tokens ({reason})")
        return timings(self.token_times, t0, self.last_final)


def timings(token_times: Sequence[Sequence[float]], t0: float, end: float) -> Measurement:
    """Measurement from per-request token arrival times, the batch start ``t0`` and its end."""
    ttft = [times[0] - t0 for times in token_times]
    tpot = [(times[-1] - times[0]) / (len(times) - 1) for times in token_times if len(times) > 1]
    return Measurement(sum(len(t) for t in token_times), end - t0, statistics.fmean(ttft),
                       statistics.fmean(tpot) if tpot else float("nan"))


def bench_limits(batch: int, max_tokens: int) -> EngineLimits:
    """Engine limits roomy enough for the bench's batch and length (beyond 16 configurations the mix
    repeats with coefficients up to 4.75x larger: up to 19 at 256)."""
    return EngineLimits(max_batch=max(16, batch), max_queue=max(256, batch),
                        max_new_tokens=max(2048, max_tokens), max_abs_coef=64.0)


def request(prompt: str, max_tokens: int, spec: InterventionSpec) -> GenerationRequest:
    """A greedy request that generates exactly ``max_tokens`` tokens."""
    return GenerationRequest(prompt=prompt, sampling=Sampling(max_tokens=max_tokens, ignore_eos=True),
                             interventions=spec)


def measure_engine(lm: Any, registry: Registry, scenario: Scenario, prompt: str, max_tokens: int) -> Measurement:
    """Run a scenario's batch on a fresh engine: submit all, then start the worker, then wait."""
    engine = HFEngine(lm, registry, bench_limits(scenario.batch, max_tokens), hooks=scenario.hooks)
    rec = _Recorder(scenario.batch)
    try:
        t0 = time.perf_counter()
        for i, spec in enumerate(scenario.specs):
            engine.submit(request(prompt, max_tokens, spec), rec.emitter(i))
        engine.start()
        if not rec.done.wait(RUN_TIMEOUT_S):
            raise RuntimeError(f"bench: {scenario.name!r} did not finish within {RUN_TIMEOUT_S:.0f} s")
    finally:
        engine.stop()
        engine.hooks.remove()
    return rec.measurement(t0)


def measure_generate(lm: Any, prompt: str, max_tokens: int) -> Measurement:
    """Plain ``model.generate`` (greedy, batch 1, DynamicCache), timed through a streamer."""
    from transformers.generation.streamers import BaseStreamer

    from service.models import encode_prompt
    from service.models._progress import quiet_transformers

    class _Times(BaseStreamer):
        def __init__(self) -> None:
            self.calls: list[float] = []

        def put(self, value: Any) -> None:
            self.calls.append(time.perf_counter())

        def end(self) -> None:
            pass

    streamer = _Times()
    t0 = time.perf_counter()
    ids = torch.tensor([encode_prompt(lm.tokenizer, prompt)], device=lm.device)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    with torch.inference_mode(), quiet_transformers(errors_only=True):
        lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                          min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad, streamer=streamer)
    times = streamer.calls[1:]  # the first put is the prompt
    if len(times) != max_tokens:
        raise RuntimeError(f"bench: generate produced {len(times)} tokens, expected {max_tokens}")
    return timings([times], t0, times[-1])


def measure(lm: Any, registry: Registry, scenario: Scenario, prompt: str, max_tokens: int) -> Measurement:
    """One run of ``scenario``, with the CPU other processes took meanwhile."""
    busy0, own0, t0 = system_busy_s(), time.process_time(), time.perf_counter()
    if scenario.engine:
        m = measure_engine(lm, registry, scenario, prompt, max_tokens)
    else:
        m = measure_generate(lm, prompt, max_tokens)
    busy1, own1, t1 = system_busy_s(), time.process_time(), time.perf_counter()
    others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0)
    return dataclasses.replace(m, others_cores=others)


def system_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot, all cores (user, system, irq, steal);
    NaN where /proc/stat is not available."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields)
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


# ---- the whole bench ---------------------------------------------------------------------------------

def run_scenarios(lm: Any, registry: Registry, rows: list[Scenario], *, prompt: str, max_tokens: int,
                  repeats: int, warmup_tokens: int = 4,
                  progress: Callable[[str], None] | None = None) -> list[list[Measurement]]:
    """Warm every scenario up once, then measure them ``repeats`` times, interleaved."""
    say = progress or (lambda _msg: None)
    for sc in rows:
        say(f"warm-up: {sc.name} (batch {sc.batch})")
        measure(lm, registry, sc, prompt, max(2, min(warmup_tokens, max_tokens)))
    runs: list[list[Measurement]] = [[] for _ in rows]
    for r in range(repeats):
        order = list(range(len(rows)))
        if r % 2:
            order.reverse()  # alternate the order so a slow drift does not favour one row
        for i in order:
            m = measure(lm, registry, rows[i], prompt, max_tokens)
            runs[i].append(m)
            say(f"run {r + 1}/{repeats}: {rows[i].name} (batch {rows[i].batch}): "
                f"{m.tokens_per_s:.2f} tok/s, TPOT {m.tpot_s * 1e3:.1f} ms, TTFT {m.ttft_s * 1e3:.0f} ms, "
                f"other processes {m.others_cores:.2f} cores")
    return runs


def summarize(rows: list[Scenario], runs: list[list[Measurement]]) -> list[Row]:
    """Median per metric, and ratios to the plain engine row of the same batch size."""
    med = [(statistics.median(m.tokens_per_s for m in ms), statistics.median(m.tpot_s for m in ms),
            statistics.median(m.ttft_s for m in ms)) for ms in runs]
    others = [statistics.median(m.others_cores for m in ms) for ms in runs]
    plain = {sc.batch: med[i] for i, sc in enumerate(rows) if sc.engine and not sc.hooks}
    out = []
    for sc, (tps, tpot, ttft), busy, ms in zip(rows, med, others, runs, strict=True):
        base = plain.get(sc.batch, (tps, tpot, ttft))
        out.append(Row(sc.name, sc.batch, tps, tpot * 1e3, ttft * 1e3, _ratio(tps, base[0]),
                       _ratio(tpot, base[1]), _ratio(ttft, base[2]), busy, len(ms),
                       min(m.tpot_s for m in ms) * 1e3, max(m.tpot_s for m in ms) * 1e3))
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else float("nan")


def bench(lm: Any, *, max_tokens: int = 32, batch: int = 16, repeats: int = 1, d_sae: int = SAE_WIDTH,
          prompt: str = PROMPT, generate_reference: bool = True,
          progress: Callable[[str], None] | None = None) -> BenchResult:
    """Run every row on the loaded model ``lm`` and return the table (see the module docstring)."""
    if max_tokens < 2:
        raise invalid("max_tokens", f"must be >= 2 (TPOT needs two tokens), got {max_tokens}")
    if batch < 1 or repeats < 1:
        raise invalid("batch" if batch < 1 else "repeats", "must be >= 1")
    info = machine_info(lm)
    registry = Registry(lm.d_model)
    with tempfile.TemporaryDirectory(prefix="steerwatch-bench-") as tmp:
        src = register_sources(registry, lm.n_layers, lm.d_model, Path(tmp), d_sae=d_sae, device=lm.device,
                               model=lm.name)
    rows = scenarios(src, batch, generate_reference=generate_reference)
    start = time.perf_counter()
    runs = run_scenarios(lm, registry, rows, prompt=prompt, max_tokens=max_tokens, repeats=repeats,
                         progress=progress)
    from service.models import encode_prompt

    info.update({
        "prompt tokens": str(len(encode_prompt(lm.tokenizer, prompt))),
        "generated tokens per request": f"{max_tokens} (ignore_eos, greedy)",
        "repeats": f"{repeats} (median reported)" if repeats > 1 else "1",
        "SAE": f"random-weight JumpReLU, d_in {lm.d_model}, d_sae {d_sae}, SAELens format",
        "bench wall time": f"{time.perf_counter() - start:.0f} s",
        "load average at end": _loadavg(),
        "other CPU": "cores busy in other processes during a row's runs (median); near 0 = machine to itself",
    })
    return BenchResult(summarize(rows, runs), info)


# ---- description and rendering -----------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform's answer elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_info(lm: Any) -> dict[str, str]:
    """What the numbers were measured on."""
    import transformers

    dev = torch.device(lm.device)
    info = {
        "CPU": cpu_model(),
        "cores": str(os.cpu_count()),
        "torch": f"{torch.__version__} ({torch.get_num_threads()} threads)",
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""),
        "model": f"{lm.name} ({lm.n_layers} layers, d_model {lm.d_model})",
        "dtype": str(lm.dtype).removeprefix("torch.") + (f", quantized {lm.quantized}" if lm.quantized else ""),
        "load average at start": _loadavg(),
    }
    return info
