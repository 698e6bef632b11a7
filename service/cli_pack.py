"""``steerwatch pack build|show``: the default monitor pack (see service/pack.py, docs/monitor-pack.md)."""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markdown import Markdown

PACK_COMMANDS = ("pack",)


def add_pack_parsers(sub: Any) -> None:
    p = sub.add_parser("pack", help="build or show the monitor pack (deception probe, sycophancy and refusal vectors)")
    psub = p.add_subparsers(dest="pack_command", required=True)
    b = psub.add_parser("build", help="build the pack for a model from the packaged datasets (~minutes on CPU)")
    b.add_argument("--model", default="default", help="'default' (Gemma 3 270M, embedded) or a local HF checkpoint dir")
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    b.add_argument("--device", default="cpu")
    b.add_argument("--out", default=None, help="pack directory (default: the cache, where serve looks)")
    b.add_argument("--quick", action="store_true", help="tiny sets: a smoke run whose numbers mean little")
    b.add_argument("--force", action="store_true", help="rebuild even when a pack is there")
    s = psub.add_parser("show", help="print a pack's report")
    s.add_argument("--model-name", default="gemma-3-270m", help="model whose cached pack to show")
    s.add_argument("--dir", default=None, help="a pack directory instead")


def run_pack(args: argparse.Namespace, console: Console) -> int:
    from service.pack import MANIFEST, REPORT, default_pack_dir

    if args.pack_command == "show":
        root = Path(args.dir) if args.dir else default_pack_dir(args.model_name)
        if not (root / REPORT).is_file():
            console.print(f"[red]no pack report at {root}[/]; build one with `steerwatch pack build`")
            return 1
        console.print(Markdown((root / REPORT).read_text()))
        return 0
    from service.models import load_model
    from service.pack_build import PackConfig, build_pack

    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    out = Path(args.out) if args.out else default_pack_dir(lm.name)
    if (out / MANIFEST).is_file() and not args.force:
        console.print(f"pack already built at {out} (use --force to rebuild)")
        return 0
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    build_pack(lm, tmp, PackConfig.quick() if args.quick else PackConfig(), _stages(console))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # a pack directory is either complete or absent
    console.print(Markdown((out / REPORT).read_text()))
    console.print(f"pack written to {out}")
    return 0


def _stages(console: Console) -> Any:
    @contextmanager
    def stage(title: str) -> Iterator[None]:
        with console.status(title):
            yield
        console.print(f"[green]✓[/] {title}")

    return stage
