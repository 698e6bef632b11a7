"""The batched intervention core: per-layer tables of active entries and one gather per token.

A batch's requests occupy slots; slot ``s`` owns row ``2s+1`` (its prompt tokens) and row ``2s+2`` (its
generated tokens); row 0 means "nothing". An engine hands each hooked layer the residual stream as a
flat [T, d_model] tensor plus a per-token row index [T]. Every edit is a gather from a [R, ...] table
followed by elementwise ops over [T, d_model], so a step's cost does not depend on how many distinct
request configurations share the batch; tokens whose row edits nothing are copied through
``torch.where`` and come out bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from monitors.read_table import ReadTable, build_read_table
from steering.compile import PHASE_ROWS, CompiledRequest, LayerEdits, ResolvedRead

ROWS_PER_SLOT = len(PHASE_ROWS)


def row_of(slot: int, phase: str) -> int:
    """Row index of a slot's prompt (phase 'prompt') or generated ('generation') tokens."""
    return 1 + ROWS_PER_SLOT * slot + PHASE_ROWS.index(phase)


@dataclass
class ClampTable:
    """Clamps of one SAE at one layer: features [n], per-row targets and masks [R, n]."""

    sae: Any
    feats: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor
    dec: torch.Tensor  # W_dec[feats], [n, d_model]


@dataclass
class LayerTable:
    """Everything one layer does for one batch composition."""

    add: torch.Tensor | None = None  # [R, d]
    ablate: torch.Tensor | None = None  # [R, K, d], orthonormal rows per table row
    clamps: list[ClampTable] = field(default_factory=list)
    edit_rows: torch.Tensor | None = None  # [R] bool: the row edits anything here
    reads_pre: ReadTable | None = None
    reads_post: ReadTable | None = None


@dataclass(frozen=True)
class ReadSlot:
    """Where a request's named reading lands: layer, before/after edits, column of that table."""

    name: str
    layer: int
    after_edits: bool
    column: int


def apply_layer(table: LayerTable, x: torch.Tensor, rows: torch.Tensor
                ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Run one layer's reads and edits. x [T, d] (any float dtype), rows [T] long.

    Returns (edited x in x's dtype, or None when the layer edits nothing; pre-edit reads [T, n_pre];
    post-edit reads [T, n_post]). Reads are float32.
    """
    pre = table.reads_pre.read(x) if table.reads_pre is not None else None
    out = None
    if table.edit_rows is not None:
        out = _edit(table, x, rows)
    post = None
    if table.reads_post is not None:
        post = table.reads_post.read(out if out is not None else x)
    return out, pre, post


def _edit(table: LayerTable, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    h = x.float()
    if table.ablate is not None:
        dirs = table.ablate[rows]  # [T, K, d]
        h = h - torch.einsum("tk,tkd->td", torch.einsum("tkd,td->tk", dirs, h), dirs)
    for c in table.clamps:
        x_norm, state = c.sae.normalize(h)
        f = c.sae.encode_features_normalized(x_norm, c.feats)  # [T, n]
        delta = ((c.target[rows] - f) * c.mask[rows]) @ c.dec
        h = h + c.sae.denormalize_delta(delta, state)
    if table.add is not None:
        h = h + table.add[rows]
    assert table.edit_rows is not None
    active = table.edit_rows[rows][:, None]
    return torch.where(active, h.to(x.dtype), x)


class BatchPlan:
    """Tables for one batch composition (a list of slots, None for an empty slot)."""

    def __init__(self, requests: list[CompiledRequest | None], d_model: int, device: torch.device | str = "cpu"):
        self.requests = requests
        self.n_rows = 1 + ROWS_PER_SLOT * len(requests)
        self.d_model = d_model
        self.device = torch.device(device)
        self.tables: dict[int, LayerTable] = {}
        self.read_slots: list[list[ReadSlot]] = [[] for _ in requests]
        self._build()

    @property
    def layers(self) -> list[int]:
        return sorted(self.tables)

    def _build(self) -> None:
        layers = set()
        for req in self.requests:
            if req is not None:
                layers |= req.edit_layers() | {r.layer for r in req.reads}
        for layer in sorted(layers):
            self.tables[layer] = self._layer_table(layer)

    def _edits_at(self, layer: int) -> list[tuple[int, LayerEdits]]:
        found = []
        for slot, req in enumerate(self.requests):
            if req is None:
                continue
            for phase in PHASE_ROWS:
                e = req.edits[phase].get(layer)
                if e is not None:
                    found.append((row_of(slot, phase), e))
        return found

    def _layer_table(self, layer: int) -> LayerTable:
        table = LayerTable()
        edits = self._edits_at(layer)
        if edits:
            self._fill_edits(table, edits)
        for after in (False, True):
            reads = self._reads_at(layer, after)
            if reads:
                rt, columns = build_read_table([r for _, r in reads], self.device)
                for slot, r in reads:
                    self.read_slots[slot].append(ReadSlot(r.name, layer, after, columns[r.key]))
                if after:
                    table.reads_post = rt
                else:
                    table.reads_pre = rt
        return table

    def _reads_at(self, layer: int, after: bool) -> list[tuple[int, ResolvedRead]]:
        return [(slot, r) for slot, req in enumerate(self.requests) if req is not None
                for r in req.reads if r.layer == layer and r.after_edits == after]

    def _fill_edits(self, table: LayerTable, edits: list[tuple[int, LayerEdits]]) -> None:
        R, d, dev = self.n_rows, self.d_model, self.device
        edit_rows = torch.zeros(R, dtype=torch.bool)
        if any(e.add is not None for _, e in edits):
            table.add = torch.zeros(R, d)
        k = max(len(e.ablate) for _, e in edits)
        if k:
            table.ablate = torch.zeros(R, k, d)
        for row, e in edits:
            edit_rows[row] = e.add is not None or bool(e.ablate) or bool(e.clamps)
            if e.add is not None:
                table.add[row] = e.add  # type: ignore[index]
            if e.ablate:
                basis = orthonormal(torch.stack(e.ablate))
                table.ablate[row, : basis.shape[0]] = basis  # type: ignore[index]
        table.clamps = self._clamp_tables(edits)
        table.edit_rows = edit_rows.to(dev)
        table.add = None if table.add is None else table.add.to(dev)
        table.ablate = None if table.ablate is None else table.ablate.to(dev)

    def _clamp_tables(self, edits: list[tuple[int, LayerEdits]]) -> list[ClampTable]:
        groups: dict[str, list[tuple[int, dict[int, float]]]] = {}
        for row, e in edits:
            for sae_id, feats in e.clamps.items():
                groups.setdefault(sae_id, []).append((row, feats))
        return [self._clamp_table(sae_id, entries) for sae_id, entries in groups.items()]

    def _clamp_table(self, sae_id: str, entries: list[tuple[int, dict[int, float]]]) -> ClampTable:
        sae = self._sae_for(sae_id)
        feats = sorted({f for _, fs in entries for f in fs})
        col = {f: i for i, f in enumerate(feats)}
        target = torch.zeros(self.n_rows, len(feats))
        mask = torch.zeros(self.n_rows, len(feats))
        for row, fs in entries:
            for f, c in fs.items():
                target[row, col[f]] = c
                mask[row, col[f]] = 1.0
        idx = torch.tensor(feats, dtype=torch.long, device=self.device)
        return ClampTable(sae, idx, target.to(self.device), mask.to(self.device), sae.decoder_rows(idx).float())

    def _sae_for(self, sae_id: str) -> Any:
        for req in self.requests:
            if req is not None and sae_id in req.saes:
                return req.saes[sae_id]
        raise KeyError(sae_id)


def orthonormal(dirs: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis [k', d] of the span of dirs [k, d] (Gram-Schmidt, dependent rows dropped)."""
    basis: list[torch.Tensor] = []
    for v in dirs.double():
        for b in basis:
            v = v - (v @ b) * b
        n = v.norm()
        if n > 1e-6:
            basis.append(v / n)
    return torch.stack(basis).float()
