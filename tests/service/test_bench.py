"""``steerwatch bench`` on a tiny random LLaMA: every row is measured, the table renders, and the
shared model is left without hooks."""

from __future__ import annotations

import math

import pytest

from service.bench import (
    GENERATE,
    PLAIN,
    BenchResult,
    Sources,
    bench,
    markdown,
    mixed_specs,
    register_sources,
    rich_table,
    timings,
)
from service.models.tiny import tiny_llama
from steering.compile import ModelShape, compile_spec
from steering.registry import Registry


@pytest.fixture(scope="module")
def result() -> tuple[BenchResult, object]:
    lm = tiny_llama(n_layers=3, d_model=64, seed=2)
    return bench(lm, max_tokens=4, batch=4, repeats=2, d_sae=64), lm


def test_every_row_is_measured(result):
    res, _ = result
    names = [r.name for r in res.rows]
    assert names[0] == PLAIN and GENERATE in names
    assert [r.batch for r in res.rows] == [1] * 7 + [4, 4]
    assert any(n.startswith("monitoring") for n in names) and any("ablation" in n for n in names)
    assert any(n.startswith("conditional CAA") for n in names)
    assert names[-1] == "4 different configurations"
    for row in res.rows:
        assert row.tokens_per_s > 0 and row.tpot_ms > 0 and row.ttft_ms > 0 and row.runs == 2
        assert math.isfinite(row.speed_ratio) and math.isfinite(row.tpot_ratio)
    plain_rows = [r for r in res.rows if r.name == PLAIN]
    assert [r.speed_ratio for r in plain_rows] == [1.0, 1.0]


def test_tables_render_every_row_and_the_machine(result):
    res, _ = result
    md = markdown(res)
    for row in res.rows:
        assert f"| {row.name} | {row.batch} |" in md
    assert "- CPU:" in md and "- torch:" in md and "tiny-llama" in md
    assert rich_table(res).row_count == len(res.rows)


def test_no_hooks_are_left_on_the_model(result):
    _, lm = result
    assert all(not layer._forward_hooks for layer in lm.layers)


def test_mixed_batch_is_sixteen_valid_distinct_configurations(tmp_path):
    reg = Registry(32)
    src = register_sources(reg, 18, 32, tmp_path, d_sae=32)
    assert isinstance(src, Sources) and src.layer == 6
    specs = mixed_specs(src, 16)
    assert len({s.model_dump_json() for s in specs if not s.empty}) == len([s for s in specs if not s.empty])
    assert sum(s.empty for s in specs) == 1  # a plain request in the mix
    assert sum(bool(s.gates) for s in specs) == 1  # and a conditional one
    for s in specs:
        compile_spec(s, reg, ModelShape(18, 32))


def test_timings_exclude_the_first_token_from_tpot():
    m = timings([[1.0, 1.5, 2.0], [1.2, 1.3, 1.4]], t0=0.5, end=2.0)
    assert m.tokens == 6 and m.wall_s == 1.5
    assert m.ttft_s == pytest.approx(0.6) and m.tpot_s == pytest.approx(0.3)  # (0.5 + 0.1) / 2
