"""The benchmark's rows: random sources (vectors, probe, SAE) and the request specs of each row."""


from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from monitors.probes import make_probe
from monitors.sae import load_sae, save_sae
from steering.registry import Registry
from steering.spec import AblateEdit, AddEdit, ClampEdit, Edit, GateSpec, InterventionSpec, ReadSpec
from steering.vectors import make_vector

PROMPT = ("The printing press changed how ideas spread across Europe. Within fifty years of its invention, "
          "printers in dozens of cities")
MONITOR_LAYER = 6  # the layer of the one-layer rows (clamped to the model's last layer)
SAE_WIDTH = 16384  # Gemma Scope width for Gemma 3 270M
SAE_FEATURES = 16  # features monitored by the "monitoring" row
RUN_TIMEOUT_S = 1800.0

PLAIN = "plain engine"
GENERATE = "transformers generate (reference)"


# ---- what is measured ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    """One row: a batch of requests (one InterventionSpec each) on a plain or hooked engine.

    ``engine`` False means plain ``model.generate`` (batch 1 only), a reference for the loop itself.
    """

    name: str
    specs: tuple[InterventionSpec, ...]
    hooks: bool = True
    engine: bool = True

    @property
    def batch(self) -> int:
        return len(self.specs)


@dataclass(frozen=True)
class Sources:
    """Registry ids of the bench's random vectors, probe and SAE, and where they act."""

    layer: int
    n_layers: int
    vectors: tuple[str, ...] = ("caa.a", "caa.b", "caa.c")
    direction: str = "dir"
    probe: str = "probe"
    sae: str = "sae"
    features: tuple[int, ...] = ()


# ---- sources: random vectors, probe and a SAELens-format SAE ---------------------------------------

def bench_layer(n_layers: int) -> int:
    """The layer of the one-layer rows: 6, or the last layer of a smaller model."""
    return min(MONITOR_LAYER, n_layers - 1)


def random_sae_dir(root: Path, d_in: int, d_sae: int, layer: int, *, model: str = "", seed: int = 0) -> Path:
    """Write a random-weight JumpReLU SAE in SAELens format under ``root``; returns its directory."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "W_enc": torch.randn(d_in, d_sae, generator=g) / math.sqrt(d_in),
        "W_dec": torch.randn(d_sae, d_in, generator=g) / math.sqrt(d_in),
        "b_enc": torch.zeros(d_sae),
        "threshold": torch.full((d_sae,), 0.1),
        "b_dec": torch.zeros(d_in),
    }
    cfg = {"architecture": "jumprelu", "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "metadata": {"model_name": model, "hook_name": f"blocks.{layer}.hook_resid_post"}}
    out = root / "sae"
    save_sae(tensors, cfg, out)
    return out


def register_sources(registry: Registry, n_layers: int, d_model: int, workdir: Path, *,
                     d_sae: int = SAE_WIDTH, device: torch.device | str = "cpu", model: str = "",
                     seed: int = 0) -> Sources:
    """Register random CAA vectors (every layer), an ablation direction, a probe and an SAE."""
    layer = bench_layer(n_layers)
    g = torch.Generator().manual_seed(seed)
    src = Sources(layer, n_layers, features=_spread(d_sae, SAE_FEATURES))

    def unit() -> torch.Tensor:
        v = torch.randn(d_model, generator=g)
        return v / v.norm()

    for name in src.vectors:
        registry.add_vector(name, make_vector({i: unit() for i in range(n_layers)}, method="random"))
    registry.add_vector(src.direction, make_vector({layer: unit()}, method="random"))
    registry.add_probe(src.probe, make_probe(unit(), 0.0, layer=layer, name="bench-probe"))
    sae_dir = random_sae_dir(workdir, d_model, d_sae, layer, model=model, seed=seed + 1)
    registry.add_sae(src.sae, load_sae(sae_dir, device=device))
    return src


def _spread(d_sae: int, n: int) -> tuple[int, ...]:
    """``n`` feature indices spread over 0..d_sae-1 (fewer when the SAE is narrower)."""
    step = max(d_sae // n, 1)
    return tuple(range(0, d_sae, step))[:n]


# ---- interventions ---------------------------------------------------------------------------------

def monitor_spec(src: Sources, features: Sequence[int] | None = None, *, probe: bool = True) -> InterventionSpec:
    """One linear probe plus SAE feature readings at the bench layer."""
    feats = src.features if features is None else features
    reads = [ReadSpec(name="probe", kind="probe", source=src.probe, layer=src.layer)] if probe else []
    reads += [ReadSpec(name=f"sae.{f}", kind="sae_feature", source=src.sae, feature=f) for f in feats]
    return InterventionSpec(reads=reads)


def caa_spec(src: Sources, coef: float = 4.0, layers: list[int] | None = None, vector: int = 0) -> InterventionSpec:
    """Contrastive activation addition; ``layers`` None = one layer (the bench layer)."""
    return InterventionSpec(edits=[_add(src, vector, coef, layers or [src.layer])])


def conditional_spec(src: Sources, coef: float = 4.0, threshold: float = 0.5) -> InterventionSpec:
    """CAA at the bench layer switched on by an EMA rule over the probe (conditional steering)."""
    read = ReadSpec(name="probe", kind="probe", source=src.probe, layer=src.layer)
    gate = GateSpec(name="g", reading="probe", threshold=threshold, aggregation="ema", alpha=0.3, scope="both")
    edit = _add(src, 0, coef, [src.layer]).model_copy(update={"when": "g", "phase": "generation"})
    return InterventionSpec(edits=[edit], reads=[read], gates=[gate])


def caa_ablate_all_spec(src: Sources, coef: float = 4.0) -> InterventionSpec:
    """CAA and directional ablation, both on every layer."""
    every = list(range(src.n_layers))
    return InterventionSpec(edits=[_add(src, 0, coef, every), AblateEdit(vector=src.direction, layers="all")])


def _add(src: Sources, vector: int, coef: float, layers: list[int]) -> AddEdit:
    return AddEdit(vector=src.vectors[vector % len(src.vectors)], coef=coef,
                   layers=sorted({layer % src.n_layers for layer in layers}))


def mixed_specs(src: Sources, n: int) -> list[InterventionSpec]:
    """``n`` different configurations: plain, CAA (various vectors/coefs/layers), ablation, probe and
    SAE monitoring, an SAE clamp, conditional CAA, and combinations. Beyond 16 the mix repeats with
    other coefficients, and each repeat r >= 1 also adds ``0.5 r`` times a vector at layer L + r, so
    that all ``n`` configurations are distinct (the plain and monitor-only ones included)."""
    specs = []
    for i in range(n):
        r, k = divmod(i, 16)
        scale = 1.0 + 0.25 * r
        if k == CONDITIONAL_ROW:
            spec = conditional_spec(src, 4.0 * scale)
            edits, reads, gates = list(spec.edits), list(spec.reads), list(spec.gates)
        else:
            (edits, reads), gates = _mixed(src, k, scale), []
        if r:
            edits = [*edits, _add(src, r, 0.5 * r, [src.layer + r])]
        specs.append(InterventionSpec(edits=edits, reads=reads, gates=gates))
    return specs


CONDITIONAL_ROW = 11  # the mixed batch's conditional-steering configuration


def _mixed(src: Sources, k: int, scale: float) -> tuple[list[Edit], list[ReadSpec]]:
    """The k-th configuration of the mixed batch (k in 0..15)."""
    L, last = src.layer, src.n_layers - 1
    probe = [ReadSpec(name="probe", kind="probe", source=src.probe, layer=L)]
    probe_after = [ReadSpec(name="probe", kind="probe", source=src.probe, layer=L, after_edits=True)]
    sae_reads = list(monitor_spec(src, probe=False).reads)
    ablate_all = AblateEdit(vector=src.direction, layers="all")
    table: list[tuple[list[Edit], list[ReadSpec]]] = [
        ([], []),                                                               # plain
        ([_add(src, 0, 4.0 * scale, [L])], []),                                 # CAA at L
        ([_add(src, 1, -2.0 * scale, [L + 2])], []),                            # other vector, layer, sign
        ([_add(src, 2, 1.0 * scale, list(range(src.n_layers)))], []),          # CAA on every layer
        ([ablate_all], []),                                                     # ablation everywhere
        ([AblateEdit(vector=src.direction, layers=sorted({L, (L + 1) % (last + 1)}))], []),
        ([], probe),                                                            # probe only
        ([], sae_reads),                                                        # 16 SAE features
        ([], probe + sae_reads),                                                # the monitoring row
        ([_add(src, 0, 4.0 * scale, list(range(src.n_layers))), ablate_all], []),  # CAA + ablation
        ([_add(src, 1, 3.0 * scale, [L])], probe_after),                        # steer and watch it
        ([], []),                                                               # conditional (mixed_specs)
        ([ClampEdit(sae=src.sae, feature=src.features[0], value=5.0 * scale)], probe),  # SAE clamp
        ([_add(src, 2, 2.0 * scale, [L + 4])],
         [ReadSpec(name="dir", kind="direction", source=src.direction, layer=(L + 4) % (last + 1),
                   metric="cosine")]),                                          # direction monitor
        ([_add(src, 0, -1.0 * scale, [max(L - 2, 0), L, L + 2])], sae_reads[:4]),
        ([AblateEdit(vector=src.direction, layers=[L]), _add(src, 1, 2.0 * scale, [L + 1])], []),
    ]
    return table[k]


def scenarios(src: Sources, batch: int, *, generate_reference: bool = True) -> list[Scenario]:
    """The rows of the table, in display order."""
    empty = InterventionSpec()
    rows = [
        Scenario(PLAIN, (empty,), hooks=False),
        Scenario("hooks installed, idle", (empty,)),
        Scenario(f"monitoring: probe + {len(src.features)} SAE features @L{src.layer}", (monitor_spec(src),)),
        Scenario(f"CAA @L{src.layer}", (caa_spec(src),)),
        Scenario(f"CAA + ablation, all {src.n_layers} layers", (caa_ablate_all_spec(src),)),
        Scenario(f"conditional CAA @L{src.layer} (EMA rule on a probe)", (conditional_spec(src),)),
    ]
    if generate_reference:
        rows.append(Scenario(GENERATE, (empty,), hooks=False, engine=False))
    rows += [
        Scenario(PLAIN, (empty,) * batch, hooks=False),
        Scenario(f"{batch} different configurations", tuple(mixed_specs(src, batch))),
    ]
    return rows
