"""All readings taken at one layer for a batch, computed once for every token.

Readers at a layer are deduplicated by key across requests (two requests watching the same probe
share one column), stacked into one [n, d_model] matmul for the linear ones, and grouped per SAE so
each SAE encodes only the union of monitored features. A request then picks its columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class ReadSource(Protocol):
    """What the table needs of a resolved reading (steering.compile.ResolvedRead)."""

    @property
    def key(self) -> tuple[str, ...]: ...
    @property
    def reader(self) -> Any: ...
    @property
    def sae(self) -> Any: ...
    @property
    def feature(self) -> int | None: ...


@dataclass
class SaeColumns:
    """One SAE's monitored features [n] and where they land in the output."""

    sae: Any
    feats: torch.Tensor
    first_column: int


@dataclass
class ReadTable:
    """Linear readers [n_lin, d] and SAE feature groups; ``read`` returns [T, n_columns] float32."""

    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    is_sigmoid: torch.Tensor | None = None
    is_cosine: torch.Tensor | None = None
    saes: list[SaeColumns] = field(default_factory=list)
    n_columns: int = 0
    any_cosine: bool = False  # the token norms are computed only when a cosine reader needs them

    def read(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        parts = []
        if self.weight is not None:
            z = torch.addmm(self.bias, h, self.weight.T)  # type: ignore[arg-type]
            z = torch.where(self.is_sigmoid, torch.sigmoid(z), z)  # type: ignore[arg-type]
            if self.any_cosine:
                norm = h.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                z = torch.where(self.is_cosine, z / norm, z)  # type: ignore[arg-type]
            parts.append(z)
        for group in self.saes:
            x_norm, _ = group.sae.normalize(h)
            parts.append(group.sae.encode_features_normalized(x_norm, group.feats))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def build_read_table(reads: list[ReadSource], device: torch.device) -> tuple[ReadTable, dict[tuple[str, ...], int]]:
    """Deduplicate readers by key and lay out columns: linear readers first, then SAE groups."""
    columns: dict[tuple[str, ...], int] = {}
    linear = _unique([r for r in reads if r.reader is not None])
    table = ReadTable()
    if linear:
        table.weight = torch.stack([r.reader.weight for r in linear]).to(device)
        table.bias = torch.tensor([r.reader.bias for r in linear], device=device)
        table.is_sigmoid = torch.tensor([r.reader.transform == "sigmoid" for r in linear], device=device)
        table.is_cosine = torch.tensor([r.reader.transform == "cosine" for r in linear], device=device)
        table.any_cosine = any(r.reader.transform == "cosine" for r in linear)
        columns.update({r.key: i for i, r in enumerate(linear)})
    col = len(linear)
    by_sae: dict[int, tuple[Any, list[int]]] = {}
    for r in _unique([r for r in reads if r.sae is not None]):
        by_sae.setdefault(id(r.sae), (r.sae, []))[1].append(r.feature)  # type: ignore[arg-type]
    for sae, feats in by_sae.values():
        feats = sorted(set(feats))
        table.saes.append(SaeColumns(sae, torch.tensor(feats, dtype=torch.long, device=device), col))
        key_prefix = [r.key[:-1] for r in reads if r.sae is sae][0]
        columns.update({(*key_prefix, str(f)): col + i for i, f in enumerate(feats)})
        col += len(feats)
    table.n_columns = col
    return table, columns


def _unique(reads: list[ReadSource]) -> list[ReadSource]:
    seen: dict[tuple[str, ...], ReadSource] = {}
    for r in reads:
        seen.setdefault(r.key, r)
    return list(seen.values())
