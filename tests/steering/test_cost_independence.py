"""A step's work does not grow with the number of distinct request configurations in the batch:
the same tokens through a plan of 1 configuration and of 16 run the same sequence of tensor ops."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from steering.batch import BatchPlan, apply_layer, row_of
from steering.compile import ModelShape, compile_spec
from steering.registry import Registry
from steering.spec import AblateEdit, AddEdit, InterventionSpec
from steering.vectors import make_vector

D = 32


class OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def ops_for(n_configs: int) -> tuple[list[str], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    reg = Registry(D)
    specs = []
    for i in range(n_configs):
        reg.add_vector(f"v{i}", make_vector({0: torch.randn(D, generator=g)}))
        specs.append(InterventionSpec(edits=[AddEdit(vector=f"v{i}", coef=0.5 + i, layers=[0]),
                                             AblateEdit(vector=f"v{(i + 1) % n_configs}", layers=[0])]))
    plan = BatchPlan([compile_spec(s, reg, ModelShape(2, D)) for s in specs], D)
    tokens = 64
    rows = torch.tensor([row_of(t % n_configs, "generation") for t in range(tokens)])
    x = torch.randn(tokens, D, generator=g)
    with OpLog() as log:
        out, _, _ = apply_layer(plan.tables[0], x, rows)
    return log.ops, out


def test_op_sequence_is_the_same_for_1_and_16_configurations():
    ops1, _ = ops_for(1)
    ops16, out16 = ops_for(16)
    assert ops1 == ops16
    assert out16.shape == (64, D)
