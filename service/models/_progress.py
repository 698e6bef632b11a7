"""Stage-by-stage progress on stderr (rich), and silencing of transformers' own tqdm bars."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING

from transformers.utils import logging as hf_logging

if TYPE_CHECKING:
    from rich.progress import Progress


@contextlib.contextmanager
def quiet_transformers(*, errors_only: bool = False) -> Iterator[None]:
    """Hide transformers' tqdm bars (our display replaces them); ``errors_only`` also mutes its warnings."""
    bars_were_on = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    if errors_only:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_were_on:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_gguf_dequantize() -> Iterator[None]:
    """transformers' GGUF loader uses tqdm directly (not its logging switch); mute that bar meanwhile."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


class Stages:
    """``with Stages(title, quiet) as s: with s.stage("dequantizing"): ...`` -- one spinner line per stage."""

    def __init__(self, title: str, *, quiet: bool = False) -> None:
        self.title = title
        self.quiet = quiet
        self._progress: Progress | None = None

    def __enter__(self) -> Stages:
        if not self.quiet:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                SpinnerColumn(finished_text="[green]✓"),
                TextColumn(f"[bold]{self.title}[/bold] {{task.description}}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    @contextlib.contextmanager
    def stage(self, description: str) -> Iterator[None]:
        if self._progress is None:
            yield
            return
        task = self._progress.add_task(description, total=None)
        try:
            yield
        except BaseException:
            self._progress.update(task, description=f"{description} [red]failed")
            raise
        self._progress.update(task, total=1, completed=1)
