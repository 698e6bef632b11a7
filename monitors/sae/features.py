"""Feature-index validation shared by monitors and steering."""

from __future__ import annotations

import torch

from monitors.sae.base import SAE
from steering.errors import invalid
from steering.tensors import require_index


def validate_features(sae: SAE, features: list[int], field: str) -> torch.Tensor:
    """Check every index is an int in 0..d_sae-1 and none repeats; return them as int64 [n] on
    the SAE's device. Errors name ``field[i]``. Duplicates are refused because a clamp sums one
    decoder row per entry and would apply a repeated feature twice."""
    if not isinstance(features, (list, tuple)):
        raise invalid(field, f"must be a list of feature indices in 0..{sae.d_sae - 1}, got {type(features).__name__}")
    seen: dict[int, int] = {}
    for i, value in enumerate(features):
        require_index(value, sae.d_sae, f"{field}[{i}]")
        if value in seen:
            raise invalid(f"{field}[{i}]", f"feature {value} repeats {field}[{seen[value]}]; each feature may appear once")
        seen[value] = i
    return torch.tensor(list(features), dtype=torch.int64, device=sae.device)
