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

from monitors.gate import GateGroup, GateMember, GateSeries
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
class EditTable:
    """One layer's edits for every row: additions, ablation bases, clamps, and which rows edit."""

    add: torch.Tensor | None = None  # [R, d]
    ablate: torch.Tensor | None = None  # [R, K, d], orthonormal rows per table row
    clamps: list[ClampTable] = field(default_factory=list)
    edit_rows: torch.Tensor | None = None  # [R] bool: the row edits anything here


@dataclass
class LayerTable:
    """Everything one layer does for one batch composition: reads, the gates they feed, edits, and
    per gate j the edits it switches on."""

    edits: EditTable | None = None
    gated: list[tuple[int, EditTable]] = field(default_factory=list)
    reads_pre: ReadTable | None = None
    reads_post: ReadTable | None = None
    gates_pre: GateGroup | None = None
    gates_post: GateGroup | None = None


@dataclass
class GateStep:
    """What gates need at every layer of one step: the latches [slots + 1, gates], each row's slot
    (row 0 maps to the spare slot, whose latches stay off) and the step's [slots, width] layout."""

    fired: torch.Tensor
    slot_of_row: torch.Tensor
    grid: tuple[int, int]
    # the grid's last column is each prompted slot's final prompt token: for all slots (a whole
    # prefill), or per slot ([slots] bool, a ragged step that mixes prompt chunks and decodes)
    prompt_ends: bool | torch.Tensor = False
    # ragged steps only: [slots * width] flat token index per grid cell, -1 for padding
    index: torch.Tensor | None = None


@dataclass(frozen=True)
class ReadSlot:
    """Where a request's named reading lands: layer, before/after edits, column of that table."""

    name: str
    layer: int
    after_edits: bool
    column: int


def apply_layer(table: LayerTable, x: torch.Tensor, rows: torch.Tensor, gates: GateStep | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Run one layer's reads, gate updates and edits. x [T, d] (any float dtype), rows [T] long.

    Returns (edited x in x's dtype, or None when the layer edits nothing; pre-edit reads [T, n_pre];
    post-edit reads [T, n_post]). Reads are float32. A gate fed by a pre-edit read switches its edits
    on at this very layer for the token that fired it.
    """
    pre = table.reads_pre.read(x) if table.reads_pre is not None else None
    if table.gates_pre is not None and gates is not None:
        _update_gates(table.gates_pre, pre, rows, gates)  # type: ignore[arg-type]
    out = _edit(table.edits, x, rows) if table.edits is not None else None
    for j, edits in table.gated:
        assert gates is not None, "a plan with gated edits needs its GateStep"
        on = gates.fired[gates.slot_of_row[rows], j]
        out = _edit(edits, out if out is not None else x, rows, on)
    post = None
    if table.reads_post is not None:
        post = table.reads_post.read(out if out is not None else x)
        if table.gates_post is not None and gates is not None:
            _update_gates(table.gates_post, post, rows, gates)
    return out, pre, post


def _update_gates(group: GateGroup, reads: torch.Tensor, rows: torch.Tensor, gates: GateStep) -> None:
    """Feed a gate group; a ragged step's tokens are first laid out on the padded grid (padding reads
    zero on row 0, which no gate watches)."""
    if gates.index is not None:
        reads = torch.cat([reads, reads.new_zeros(1, reads.shape[1])])[gates.index]
        rows = torch.cat([rows, rows.new_zeros(1)])[gates.index]
    group.update(reads, rows, gates.grid, gates.fired, gates.prompt_ends)


def _edit(table: EditTable, x: torch.Tensor, rows: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
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
    active = table.edit_rows[rows] if gate is None else table.edit_rows[rows] & gate
    return torch.where(active[:, None], h.to(x.dtype), x)


class BatchPlan:
    """Tables for one batch composition (a list of slots, None for an empty slot).

    A request's gate state outlives the plan (plans are rebuilt whenever the batch changes): the plan
    stacks it from each request's ``gate_state`` and ``save_gates`` writes it back."""

    def __init__(self, requests: list[CompiledRequest | None], d_model: int, device: torch.device | str = "cpu"):
        self.requests = requests
        self.n_rows = 1 + ROWS_PER_SLOT * len(requests)
        self.d_model = d_model
        self.device = torch.device(device)
        self.tables: dict[int, LayerTable] = {}
        self.read_slots: list[list[ReadSlot]] = [[] for _ in requests]
        self.n_gates = max((len(r.gates) for r in requests if r is not None), default=0)
        self.gate_step: GateStep | None = None
        if self.n_gates:
            self._init_gates()
        self._build()

    @property
    def layers(self) -> list[int]:
        return sorted(self.tables)

    def step(self, grid: tuple[int, int], prompt_ends: bool | torch.Tensor = False,
             index: torch.Tensor | None = None) -> GateStep | None:
        """The gate context for a forward over ``grid`` = (slots, tokens per slot); None without gates.
        ``prompt_ends``: the last column is each prompted slot's final prompt token (a whole prefill),
        or a [slots] bool of which slots it is. ``index``: for a ragged flat batch, the flat token of
        each grid cell (-1 padding); None when the tokens already are the grid, slot-major."""
        if self.gate_step is None:
            return None
        self.gate_step.grid, self.gate_step.prompt_ends, self.gate_step.index = grid, prompt_ends, index
        return self.gate_step

    def save_gates(self) -> None:
        """Write the stacked gate state back into the requests (before this plan is replaced)."""
        for table in self.tables.values():
            for group in (table.gates_pre, table.gates_post):
                if group is not None:
                    group.export()

    def gate_flags(self) -> torch.Tensor | None:
        """[slots, gates] latches as of the last forward (slots without a gate j read False)."""
        return None if self.gate_step is None else self.gate_step.fired[:-1]

    def gate_origins(self) -> list[list[tuple[bool, bool, int]]]:
        """Per slot and gate: (fired, on the prompt, index in its series). Copies to the host: call it
        after a prefill, not per decode step."""
        self.save_gates()
        return [[(bool(g.fired), bool(g.fired_on_prompt), int(g.fired_at)) for g in (r.gate_state if r else [])]
                for r in self.requests]

    def _init_gates(self) -> None:
        n = len(self.requests)
        fired = torch.zeros(n + 1, self.n_gates, dtype=torch.bool, device=self.device)
        for slot, req in enumerate(self.requests):
            if req is None:
                continue
            if len(req.gate_state) != len(req.gates):
                req.gate_state = [GateSeries.new(g.spec, self.device) for g in req.gates]
            for j, st in enumerate(req.gate_state):
                fired[slot, j] = st.fired
        slot_of_row = torch.tensor([n] + [(r - 1) // ROWS_PER_SLOT for r in range(1, self.n_rows)],
                                   dtype=torch.long, device=self.device)
        self.gate_step = GateStep(fired, slot_of_row, (n, 1))

    def _build(self) -> None:
        layers = set()
        for req in self.requests:
            if req is not None:
                layers |= req.edit_layers() | {r.layer for r in req.reads}
        for layer in sorted(layers):
            self.tables[layer] = self._layer_table(layer)

    def _edits_at(self, layer: int, gate: int | None = None) -> list[tuple[int, LayerEdits]]:
        """(row, edits) at ``layer``: the plain edits, or those of gate ``gate`` (generation rows)."""
        found = []
        for slot, req in enumerate(self.requests):
            if req is None:
                continue
            if gate is None:
                for phase in PHASE_ROWS:
                    e = req.edits[phase].get(layer)
                    if e is not None:
                        found.append((row_of(slot, phase), e))
            elif gate < len(req.gated) and layer in req.gated[gate]:
                found.append((row_of(slot, "generation"), req.gated[gate][layer]))
        return found

    def _layer_table(self, layer: int) -> LayerTable:
        table = LayerTable()
        edits = self._edits_at(layer)
        if edits:
            table.edits = self._edit_table(edits)
        for j in range(self.n_gates):
            gated = self._edits_at(layer, j)
            if gated:
                table.gated.append((j, self._edit_table(gated)))
        for after in (False, True):
            reads = self._reads_at(layer, after)
            if not reads:
                continue
            rt, columns = build_read_table([r for _, r in reads], self.device)
            for slot, r in reads:
                self.read_slots[slot].append(ReadSlot(r.name, layer, after, columns[r.key]))
            group = self._gate_group(layer, after, columns)
            if after:
                table.reads_post, table.gates_post = rt, group
            else:
                table.reads_pre, table.gates_pre = rt, group
        return table

    def _gate_group(self, layer: int, after: bool, columns: dict[tuple[str, ...], int]) -> GateGroup | None:
        members = []
        for slot, req in enumerate(self.requests):
            for j, g in enumerate(req.gates if req is not None else []):
                r = req.reads[g.read]  # type: ignore[union-attr]
                if r.layer == layer and r.after_edits == after:
                    members.append(GateMember(slot, j, columns[r.key], req.gate_state[j]))  # type: ignore[union-attr]
        return GateGroup(members, self.device) if members else None

    def _reads_at(self, layer: int, after: bool) -> list[tuple[int, ResolvedRead]]:
        return [(slot, r) for slot, req in enumerate(self.requests) if req is not None
                for r in req.reads if r.layer == layer and r.after_edits == after]

    def _edit_table(self, edits: list[tuple[int, LayerEdits]]) -> EditTable:
        R, d, dev = self.n_rows, self.d_model, self.device
        table = EditTable()
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
                if e.basis is None:
                    e.basis = orthonormal(torch.stack(e.ablate))
                basis = e.basis
                table.ablate[row, : basis.shape[0]] = basis  # type: ignore[index]
        table.clamps = self._clamp_tables(edits)
        table.edit_rows = edit_rows.to(dev)
        table.add = None if table.add is None else table.add.to(dev)
        table.ablate = None if table.ablate is None else table.ablate.to(dev)
        return table

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
    if not basis:  # nothing left to ablate (callers refuse zero and non-finite directions first)
        return dirs.new_zeros((0, dirs.shape[-1]), dtype=torch.float32)
    return torch.stack(basis).float()
