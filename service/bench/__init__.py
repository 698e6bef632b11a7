"""``steerwatch bench``: throughput and latency of steerwatch configurations against the plain engine.

Every row runs in one process on one loaded model, side by side with its baseline: the plain engine
(``HFEngine(hooks=False)``: the same batching loop with no hooks installed) at the same batch size.
Each configuration generates exactly ``max_tokens`` tokens per request (``ignore_eos``), so rows differ
only in what the hooks do. Per measured run:

* wall: from the first ``submit`` to the last ``FinalEvent``; tokens/s = generated tokens / wall;
* TTFT: from the first ``submit`` to a request's first ``TokenEvent`` (includes validation, compiling the
  interventions, prefill and the first sample), averaged over the batch;
* TPOT: (last token time - first token time) / (tokens - 1) per request, i.e. decode steps only,
  averaged over the batch.

A batch's requests are all submitted before the engine's worker starts, so they are admitted and
prefilled together. Each run gets a fresh engine whose hooks are removed afterwards (a stopped engine
would otherwise leave idle hooks on the shared model and slow down the plain rows). Rows are warmed up
once, then measured ``repeats`` times, interleaved (reversed order on odd repeats); the table shows
the median of each metric, TPOT's spread, and how many cores other processes used meanwhile (a shared
machine's noise). Steering vectors, the probe and the SAE have random weights: the cost of the core
does not depend on their values. docs/benchmarks.md has the rows, a measured table and its reading.
"""

from service.bench.measure import (
    BenchResult,
    Measurement,
    Row,
    bench,
    machine_info,
    measure,
    run_scenarios,
    summarize,
    timings,
)
from service.bench.report import markdown, rich_table, run_bench
from service.bench.scenarios import (
    GENERATE,
    PLAIN,
    Scenario,
    Sources,
    bench_layer,
    caa_ablate_all_spec,
    caa_spec,
    mixed_specs,
    monitor_spec,
    random_sae_dir,
    register_sources,
    scenarios,
)

__all__ = [
    "GENERATE", "PLAIN", "BenchResult", "Measurement", "Row", "Scenario", "Sources", "bench", "bench_layer",
    "caa_ablate_all_spec", "caa_spec", "machine_info", "markdown", "measure", "mixed_specs", "monitor_spec",
    "random_sae_dir", "register_sources", "rich_table", "run_bench", "run_scenarios", "scenarios", "summarize",
    "timings",
]
