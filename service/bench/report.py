"""The machine description, the result tables and the CLI entry point of ``steerwatch bench``."""


from __future__ import annotations

import argparse
import math

from rich.console import Console
from rich.table import Table

from service.bench.measure import BenchResult, Row, bench

HEADERS = ("configuration", "batch", "tok/s", "× plain", "TPOT ms (min–max)", "× plain", "TTFT ms", "× plain",
           "other CPU")


def _cells(row: Row) -> list[str]:
    tpot = f"{row.tpot_ms:.1f}"
    if row.runs > 1:
        digits = 0 if row.tpot_min_ms >= 10 else 1
        tpot += f" ({row.tpot_min_ms:.{digits}f}–{row.tpot_max_ms:.{digits}f})"
    return [row.name, str(row.batch), f"{row.tokens_per_s:.2f}", _x(row.speed_ratio), tpot, _x(row.tpot_ratio), f"{row.ttft_ms:.0f}", _x(row.ttft_ratio),
            "–" if math.isnan(row.others_cores) else f"{row.others_cores:.2f}"]


def _x(ratio: float) -> str:
    return "–" if math.isnan(ratio) else f"{ratio:.2f}×"


def rich_table(result: BenchResult) -> Table:
    """The result as a rich table (the machine in the caption)."""
    table = Table(title="steerwatch bench", caption="; ".join(f"{k}: {v}" for k, v in result.info.items()))
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in result.rows:
        table.add_row(*_cells(row))
    return table


def markdown(result: BenchResult) -> str:
    """The result as a Markdown machine list and table."""
    lines = [f"- {k}: {v}" for k, v in result.info.items()]
    lines += ["", "| " + " | ".join(HEADERS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(HEADERS) - 1)) + "|"]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in result.rows]
    return "\n".join(lines)


def run_bench(args: argparse.Namespace) -> int:
    """Entry point of ``steerwatch bench``: load the model, run every row, print the table."""
    from service.models import load_model

    err = Console(stderr=True)
    if getattr(args, "engine", "hf") == "vllm":
        return _run_vllm_bench(args, err)
    lm = load_model(args.model, quantize=args.quantize, dtype=args.dtype, device=args.device)
    result = bench(lm, max_tokens=args.max_tokens, batch=args.batch, repeats=args.repeats,
                   progress=lambda msg: err.print(f"[dim]{msg}[/]"))
    Console().print(rich_table(result))
    if args.markdown:
        print(markdown(result))
    return 0



def _run_vllm_bench(args: argparse.Namespace, err: Console) -> int:
    from service.bench.vllm_bench import bench_vllm
    from service.engines.vllm.options import VLLMOptions
    from service.models import DEFAULT_MODEL_NAME, prepare_default_model
    from steering.errors import invalid

    try:
        batches = sorted({int(b) for b in args.batches.split(",") if b.strip()})
    except ValueError:
        raise invalid("--batches", f"must be comma-separated integers, got {args.batches!r}") from None
    if not batches or min(batches) < 1 or max(batches) > 1024:
        raise invalid("--batches", f"each batch must be in 1..1024, got {args.batches!r}")
    if args.quantize:
        raise invalid("--quantize", "not with --engine vllm (bitsandbytes quantization is the HF engine's)")
    default = args.model == "default"
    model_dir = str(prepare_default_model()) if default else args.model
    options = VLLMOptions(dtype=args.dtype, max_model_len=512, max_num_seqs=max(batches), kv_cache_gb=4)
    rows, info = bench_vllm(model_dir, DEFAULT_MODEL_NAME if default else None, options, batches=batches,
                            max_tokens=args.max_tokens, repeats=args.repeats,
                            progress=lambda msg: err.print(f"[dim]{msg}[/]"))
    result = BenchResult(rows, info)
    Console().print(rich_table(result))
    if args.markdown:
        print(markdown(result))
    return 0
