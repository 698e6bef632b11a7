"""The vLLM step layout (pure numpy, no vLLM needed) and the vLLM bench's rows."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from monitors.gate import GateSeries
from monitors.rules import RuleSpec
from service.bench.measure import bench_limits
from service.bench.scenarios import register_sources
from service.bench.vllm_bench import vllm_rows
from service.engines.vllm.layout import StepLayout
from steering.batch import row_of
from steering.compile import ModelShape, compile_spec
from steering.registry import Registry


def test_a_ragged_step_maps_tokens_to_positions_rows_and_a_right_aligned_grid():
    # slot 0: a prompt chunk of 3 (positions 2..4 of a 6-token prompt); slot 1: a decode at position 9
    # (prompt 7); slot 2: inactive; slot 3: the last 2 prompt tokens (positions 3, 4 of 5)
    lay = StepLayout(np.array([3, 1, 2, 2]), np.array([2, 9, 0, 3]), np.array([6, 7, 4, 5]),
                     np.array([True, True, False, True]))
    assert lay.positions().tolist() == [2, 3, 4, 9, 0, 1, 3, 4]
    assert lay.rows().tolist() == [row_of(0, "prompt")] * 3 + [row_of(1, "generation"), 0, 0] + [row_of(3, "prompt")] * 2
    index, width = lay.grid()
    assert width == 3
    assert index.reshape(4, 3).tolist() == [[0, 1, 2], [-1, -1, 3], [-1, 4, 5], [-1, 6, 7]]
    assert lay.prompt_ends().tolist() == [False, False, False, True]


def test_ragged_gate_update_equals_the_padded_grid_update():
    """The same scores fed as a ragged step (index) and as the HF engine's padded grid latch alike."""
    from monitors.gate import GateGroup, GateMember

    spec = RuleSpec(threshold=0.5, aggregation="mean", window=2, scope="both")
    scores = torch.tensor([0.1, 0.9, 0.8, 0.2, 0.7])  # slot 0: 3 prompt tokens (ends prompt); slot 1: 2 prompt tokens
    rows = torch.tensor([row_of(0, "prompt")] * 3 + [row_of(1, "prompt")] * 2)

    def run(padded: bool) -> list[bool]:
        members = [GateMember(s, 0, 0, GateSeries.new(spec)) for s in (0, 1)]
        group = GateGroup(members, torch.device("cpu"))
        fired = torch.zeros(3, 1, dtype=torch.bool)
        if padded:
            grid_scores = torch.tensor([0.1, 0.9, 0.8, 0.0, 0.2, 0.7])[:, None]
            grid_rows = torch.tensor([row_of(0, "prompt")] * 3 + [0] + [row_of(1, "prompt")] * 2)
            group.update(grid_scores, grid_rows, (2, 3), fired, torch.tensor([True, False]))
        else:
            index = torch.tensor([0, 1, 2, -1, 3, 4])
            from steering.batch import GateStep, _update_gates

            step = GateStep(fired, torch.zeros(5, dtype=torch.long), (2, 3), torch.tensor([True, False]), index)
            _update_gates(group, scores[:, None], rows, step)
        return fired[:2, 0].tolist()
    assert run(True) == run(False) == [True, False]


def test_the_vllm_bench_mix_has_256_distinct_configurations_within_its_limits():
    reg = Registry(64)
    with tempfile.TemporaryDirectory() as tmp:
        src = register_sources(reg, 6, 64, Path(tmp), d_sae=256)
    rows = vllm_rows(src, [16, 256])
    mixed = [specs for name, kind, specs in rows if name == "256 different configurations"][0]
    assert len({s.model_dump_json() for s in mixed}) == 256
    for spec in mixed:
        compile_spec(spec, reg, ModelShape(6, 64), bench_limits(256, 16))
    assert {kind for _, kind, _ in rows} == {"raw", "plain", "hooked"}
