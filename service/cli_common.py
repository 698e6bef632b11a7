"""Helpers shared by the model-loading CLI commands (``train``, ``sae``, ``extract``) and the pack
builder: the common ``--model``/data arguments, loading the model, tokenising, the progress bar,
reading a JSONL dataset, checking ``--layer``/``--layers`` and printing the ``--json`` payload.

Heavy imports (torch, transformers) happen inside the functions so that building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

if TYPE_CHECKING:
    from service.models import LoadedModel


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default' (Gemma 3 270M, embedded) or a local HF checkpoint dir")
    p.add_argument("--quantize", choices=["4bit", "8bit"], default=None, help="load through bitsandbytes")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--on-error", choices=["reject", "skip"], default="reject",
                   help="malformed JSONL lines: stop with the line number (reject) or skip and report them")
    p.add_argument("--text-batch", type=int, default=8, help="texts per forward pass while collecting activations")
    p.add_argument("--max-length", type=int, default=256, help="tokens kept per text (longer texts are truncated)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the progress bar and tables")


def load_lm(args: argparse.Namespace) -> LoadedModel:
    from service.models import load_model

    return load_model(args.model, quantize=args.quantize, dtype=args.dtype, device=args.device,
                      progress=not args.json)


def encoder(lm: LoadedModel) -> Callable[[str], list[int]]:
    from service.models import encode_prompt

    return lambda text: encode_prompt(lm.tokenizer, text)


def pad_id(lm: LoadedModel) -> int:
    tok: Any = lm.tokenizer
    for value in (tok.pad_token_id, tok.eos_token_id):
        if value is not None:
            return int(value)
    return 0


@contextmanager
def progress_bar(console: Console, quiet: bool) -> Iterator[Progress]:
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=console, disable=quiet, transient=False)
    with progress:
        yield progress


def read_items(path: str | Path, model: type, on_error: str, console: Console, quiet: bool) -> tuple[list, list]:
    from monitors.datasets import read_jsonl

    loaded: Any = read_jsonl(path, model, on_error=on_error)  # type: ignore[arg-type]
    if loaded.skipped and not quiet:
        console.print(f"[yellow]skipped {len(loaded.skipped)} malformed line(s) of {path}:[/]")
        for line, reason in loaded.skipped[:20]:
            console.print(f"  [yellow]{path}:{line}[/] {reason}")
    return loaded.items, [{"line": line, "reason": reason} for line, reason in loaded.skipped]


def read_corpus(args: argparse.Namespace, console: Console) -> tuple[list, list, str]:
    """``--corpus`` (default: the packaged neutral_corpus): (items, skipped lines, path)."""
    from monitors.datasets import CorpusText, packaged

    path = Path(args.corpus) if args.corpus else packaged("neutral_corpus")
    items, skipped = read_items(path, CorpusText, args.on_error, console, args.json)
    return items, skipped, str(path)


def checked_layers(args: argparse.Namespace, n_layers: int) -> list[int]:
    from service.cli_args import parse_layers
    from steering.tensors import require_index

    if args.layer is not None:
        which: list[int] = [args.layer]
        field = "--layer"
    else:
        parsed = parse_layers(args.layers, n_layers, "--layers")
        which = list(range(n_layers)) if isinstance(parsed, str) else sorted(set(parsed))
        field = "--layers"
    for layer in which:
        require_index(layer, n_layers, field)
    return which


def emit_json(payload: dict[str, Any]) -> None:
    print(json.dumps(payload))
