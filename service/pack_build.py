"""Build a monitor pack from the project's datasets: a deception probe, a sycophancy CAA vector and a
refusal direction (optionally an SAE), each with its held-out quality numbers.

Every number in the report is computed here, on data the asset was not built from:
- deception probe (Apollo instructed pairs): AUROC and recall at the 1% FPR threshold on held-out
  facts, and on the held-out facts said plainly (true vs false statements);
- sycophancy vector (CAA): pair separation per layer on held-out pairs; the A/B choice rate of the
  sycophantic answer on held-out questions and KL on neutral text for each coefficient;
- refusal direction (Arditi): the refusal log-odds on held-out harmful prompts with the direction
  ablated, on held-out harmless prompts with it added, and KL on neutral text.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from service.pack import MANIFEST, PACK_FORMAT, REPORT

Stage = Callable[[str], Any]  # a context manager factory: with stage("doing x"): ...


@dataclass(frozen=True)
class PackConfig:
    """Sizes of the build. ``quick`` shrinks every set (for tests and smoke runs, not for the report)."""

    depths: list[float] = field(default_factory=lambda: [1 / 6, 1 / 3, 1 / 2, 2 / 3])  # layers tried, by depth
    coefs: list[float] = field(default_factory=lambda: [-32.0, -16.0, -8.0, 0.0, 8.0, 16.0, 32.0])
    refusal_coefs: list[float] = field(default_factory=lambda: [-16.0, -4.0, 0.0, 4.0, 16.0])
    n_facts: int = 200
    n_caa_train: int = 160
    n_refusal_train: int = 64
    n_val: int = 32
    n_neutral: int = 24
    batch_size: int = 8
    seed: int = 0
    sae: bool = True
    sae_depth: float = 1 / 3
    sae_width: int = 4096
    sae_k: int = 32
    sae_tokens: int = 200_000
    sae_batch: int = 1024

    def layers(self, n_layers: int) -> list[int]:
        return sorted({min(n_layers - 1, int(f * n_layers)) for f in self.depths})

    @classmethod
    def quick(cls) -> PackConfig:
        """Tiny sets, one layer: a smoke run (tests), whose numbers mean little."""
        return cls(depths=[1 / 3], coefs=[-4.0, 0.0, 4.0], refusal_coefs=[0.0, 1.0], n_facts=24, n_caa_train=16,
                   n_refusal_train=8, n_val=6, n_neutral=4, sae_width=64, sae_k=8, sae_tokens=4096, sae_batch=256)


def build_pack(lm: Any, out: Path, cfg: PackConfig, stage: Stage) -> dict[str, Any]:
    """Write the pack into ``out`` (created) and return its manifest."""
    from monitors.train.probe import Collector
    from service.cli_common import encoder, pad_id
    from steering.evaluate import NeutralKL
    from steering.refusal import Runner

    out.mkdir(parents=True, exist_ok=True)
    encode = encoder(lm)
    collector = Collector(lm.model, lm.layers, encode, pad_id(lm), batch_size=cfg.batch_size, max_length=None)
    runner = Runner(lm.model, lm.layers, encode, pad_id(lm), batch_size=cfg.batch_size)
    started = time.time()
    neutral = NeutralKL(runner, _neutral(cfg))  # the plain pass, once for every edit measured
    assets, report = [], {}
    with stage("deception probe (instructed pairs)"):
        asset, report["deception"] = _deception(lm, collector, out, cfg)
        assets.append(asset)
    with stage("sycophancy vector (CAA) and its effect"):
        asset, report["sycophancy"] = _sycophancy(lm, collector, runner, neutral, out, cfg)
        assets.append(asset)
    with stage("refusal direction and its effect"):
        asset, report["refusal"] = _refusal(lm, runner, neutral, out, cfg)
        assets.append(asset)
    if cfg.sae:
        with stage(f"TopK SAE on the neutral corpus ({cfg.sae_tokens} tokens)"):
            asset, report["sae"] = _sae(lm, collector, out, cfg)
            assets.append(asset)
    manifest = {"format": PACK_FORMAT, "model": lm.name, "built_seconds": round(time.time() - started, 1),
                "config": cfg.__dict__, "assets": assets, "report": report}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    (out / REPORT).write_text(render_report(manifest))
    return manifest


def _neutral(cfg: PackConfig) -> list[str]:
    from monitors.datasets import CorpusText, load_packaged

    return [c.text for c in load_packaged("neutral_corpus", CorpusText)[-cfg.n_neutral:]]


def _eval(e: Any) -> dict[str, float]:
    return {"auroc": e.auroc, "recall": e.recall, "fpr": e.fpr, "threshold": e.threshold, "n_pos": e.n_pos,
            "n_neg": e.n_neg}


def _deception(lm: Any, collector: Any, out: Path, cfg: PackConfig) -> tuple[dict, dict]:
    from monitors.datasets import Fact, load_packaged
    from monitors.probes import save_probe
    from monitors.train.probe import GENERALISATION, train_instructed_probe

    facts = [(f.fact, f.false) for f in load_packaged("instructed_facts", Fact)[:cfg.n_facts]]
    sweep = train_instructed_probe(collector, facts, cfg.layers(lm.n_layers), seed=cfg.seed, fpr=0.01)
    best = sweep.best
    save_probe(best.reader, out / "deception.safetensors", model=lm.name)
    layers = [{"layer": r.layer, "heldout": _eval(r.heldout), "true_false": _eval(r.extra[GENERALISATION])}
              for r in sweep.results]
    asset = {"name": "deception", "kind": "probe", "file": "deception.safetensors", "layer": best.layer,
             "threshold": best.heldout.threshold}
    return asset, {"facts": len(facts), "layer": best.layer, "calibration": best.calibration, "layers": layers}


def _group_split(items: list, key: Callable[[Any], str], n_val: int, seed: int) -> tuple[list, list]:
    """Held-out items by group (items sharing ``key`` stay on one side)."""
    sizes = Counter(key(x) for x in items)
    groups = sorted(sizes)
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
    held: set[str] = set()
    n_held = 0
    for i in order:
        if n_held >= n_val:
            break
        held.add(groups[i])
        n_held += sizes[groups[i]]
    return [x for x in items if key(x) not in held], [x for x in items if key(x) in held]


def _sycophancy(lm: Any, collector: Any, runner: Any, neutral_kl: Any, out: Path, cfg: PackConfig
                ) -> tuple[dict, dict]:
    from monitors.datasets import ABQuestion, load_packaged
    from steering.caa import ab_texts, caa_vector, last_token_starts
    from steering.evaluate import ab_choice, add_edit, sweep_coefficients
    from steering.vectors import save_vector

    items = load_packaged("sycophancy_ab", ABQuestion)
    other_choice = lambda q: q.question.split("\n\nChoices:")[-1]  # noqa: E731 - debate items share choices
    train, held = _group_split(items, other_choice, cfg.n_val, cfg.seed)
    train = train[:cfg.n_caa_train]
    texts = [ab_texts(q.question, q.answer_matching_behavior, q.answer_not_matching_behavior) for q in train]
    flat = [p for p, _ in texts] + [n for _, n in texts]
    acts = collector.collect(flat, cfg.layers(lm.n_layers), last_token_starts(collector.encode, flat))
    n = len(texts)
    result = caa_vector({k: a[:n] for k, a in acts.acts.items()}, {k: a[n:] for k, a in acts.acts.items()},
                        seed=cfg.seed, model=lm.name, source="sycophancy_ab")
    save_vector(result.vector, out / "sycophancy.safetensors")
    layer = result.best.layer
    v = result.vector.at(layer)
    held_texts = [ab_texts(q.question, q.answer_matching_behavior, q.answer_not_matching_behavior) for q in held]
    flat = [p for p, _ in held_texts] + [n for _, n in held_texts]
    h = collector.collect(flat, [layer], last_token_starts(collector.encode, flat)).acts[layer]
    proj = (h[:len(held)] - h[len(held):]) @ (v / v.norm())
    prompts = [ab_texts(q.question, "(A)", "(B)")[0][:-1] for q in held]  # ends with "("
    letter = _letter_ids(lm)
    match = [letter[q.answer_matching_behavior] for q in held]
    other = [letter[q.answer_not_matching_behavior] for q in held]
    rate = sweep_coefficients(lambda e: ab_choice(runner, prompts, match, other, e),
                              lambda c: add_edit(runner, layer, v, c), cfg.coefs)
    kl = sweep_coefficients(neutral_kl, lambda c: add_edit(runner, layer, v, c), cfg.coefs)
    asset = {"name": "sycophancy", "kind": "vector", "file": "sycophancy.safetensors", "layer": layer}
    return asset, {"pairs": n, "heldout_questions": len(held), "layer": layer, "norm": float(v.norm()),
                   "heldout_pair_accuracy": float((proj > 0).float().mean()),
                   "separation": [s.__dict__ for s in result.sweep],
                   "effect": [{"coef": c, "sycophantic_choice": r, "neutral_kl": k}
                              for (c, r), (_, k) in zip(rate, kl, strict=True)]}


def _letter_ids(lm: Any) -> dict[str, int]:
    ids = {}
    for answer in ("(A)", "(B)"):
        tokens = lm.tokenizer.encode("(" + answer[1], add_special_tokens=False)
        ids[answer] = tokens[-1]
    return ids


def _refusal(lm: Any, runner: Any, neutral_kl: Any, out: Path, cfg: PackConfig) -> tuple[dict, dict]:
    from monitors.datasets import Instruction, load_packaged
    from steering.evaluate import add_edit, refusal_scores, sweep_coefficients
    from steering.refusal import (
        BASE_TEMPLATE,
        REFUSAL_PREFIXES,
        ablating,
        find_refusal_direction,
        refusal_token_ids,
    )
    from steering.vectors import save_vector

    items = load_packaged("instructions", Instruction)
    fmt = {label: [BASE_TEMPLATE.format(instruction=i.instruction) for i in items if i.label == label]
           for label in ("harmful", "harmless")}
    val = {k: v[:cfg.n_val] for k, v in fmt.items()}
    train = {k: v[cfg.n_val:cfg.n_val + cfg.n_refusal_train] for k, v in fmt.items()}
    rid = refusal_token_ids(lambda t: lm.tokenizer.encode(t, add_special_tokens=False), REFUSAL_PREFIXES)
    res = find_refusal_direction(runner, train["harmful"], train["harmless"], val["harmful"], val["harmless"], rid,
                                 layers=cfg.layers(lm.n_layers), model=lm.name, source="instructions")
    save_vector(res.vector, out / "refusal.safetensors")
    r = res.vector.at(res.chosen.layer)
    auroc_val = _direction_auroc(runner, val["harmful"], val["harmless"], r, res.chosen.layer, res.chosen.position)

    def ablate() -> Any:
        return ablating(runner.layers, r)

    induced = sweep_coefficients(lambda e: refusal_scores(runner, val["harmless"], rid, e),
                                 lambda c: add_edit(runner, res.chosen.layer, r, c), cfg.refusal_coefs)
    kl_add = sweep_coefficients(neutral_kl, lambda c: add_edit(runner, res.chosen.layer, r, c), cfg.refusal_coefs)
    asset = {"name": "refusal", "kind": "vector", "file": "refusal.safetensors", "layer": res.chosen.layer}
    return asset, {
        "layer": res.chosen.layer, "position": res.chosen.position, "norm": float(r.norm()),
        "selection": res.selection, "monitor_auroc": auroc_val,
        "baseline_harmful": res.baseline_harmful, "baseline_harmless": res.baseline_harmless,
        "ablated_harmful": res.chosen.ablated_refusal, "ablation_kl_harmless": res.chosen.kl,
        "ablation_kl_neutral": neutral_kl(ablate),
        "candidates": [c.__dict__ for c in res.candidates],
        "effect": [{"coef": c, "harmless_refusal": s, "neutral_kl": k}
                   for (c, s), (_, k) in zip(induced, kl_add, strict=True)]}


def _direction_auroc(runner: Any, harmful: list[str], harmless: list[str], r: torch.Tensor, layer: int,
                     position: int) -> float:
    """How well the projection on r at (layer, position) tells held-out harmful from harmless prompts."""
    from monitors.train.probe import auroc

    n = -position
    proj = [runner.tail_residuals(x, [layer], n)[layer][:, 0] @ (r / r.norm()) for x in (harmful, harmless)]
    return auroc(torch.cat(proj), [True] * len(harmful) + [False] * len(harmless))


def _sae(lm: Any, collector: Any, out: Path, cfg: PackConfig) -> tuple[dict, dict]:
    from monitors.datasets import CorpusText, load_packaged
    from monitors.train.activations import shuffled_epochs
    from monitors.train.sae import SAETrainConfig, train_sae

    layer = min(lm.n_layers - 1, int(cfg.sae_depth * lm.n_layers))
    texts = [c.text for c in load_packaged("neutral_corpus", CorpusText)]
    n_held = max(1, len(texts) // 10)
    held = collector.collect(texts[:n_held], [layer]).acts[layer]
    train = collector.collect(texts[n_held:], [layer]).acts[layer]
    sae_cfg = SAETrainConfig(d_in=lm.d_model, d_sae=cfg.sae_width, arch="topk", k=cfg.sae_k, lr=1e-3,
                             batch_size=cfg.sae_batch, total_tokens=cfg.sae_tokens,
                             dead_tokens=min(cfg.sae_tokens // 4, 50_000), seed=cfg.seed)
    result = train_sae(shuffled_epochs(train, seed=cfg.seed), sae_cfg, heldout=held)
    result.observe_max(train)
    result.save(out / "sae", model_name=lm.name, layer=layer)
    m = result.metrics
    assert m is not None  # set when a held-out set is given
    asset = {"name": "sae", "kind": "sae", "file": "sae", "layer": layer}
    return asset, {"layer": layer, "d_sae": cfg.sae_width, "k": cfg.sae_k, "tokens": result.tokens,
                   "corpus_tokens": int(train.shape[0]), "heldout_tokens": m.n_tokens, "mse": m.mse, "fve": m.fve,
                   "l0": m.l0, "dead_fraction": m.dead_fraction}


def render_report(m: dict[str, Any]) -> str:
    """The manifest's numbers as Markdown tables."""
    d, s, r = m["report"]["deception"], m["report"]["sycophancy"], m["report"]["refusal"]
    lines = [f"# Monitor pack for {m['model']}", "", f"Built in {m['built_seconds']} s.", "",
             "## Deception probe (instructed pairs, Apollo recipe)", "",
             f"{d['facts']} facts; threshold calibrated on {d['calibration']}; served layer {d['layer']}.", "",
             "| layer | AUROC (held-out instructed) | recall @1% FPR | AUROC (plain true/false) | recall (true/false) |",
             "|---:|---:|---:|---:|---:|"]
    for x in d["layers"]:
        h, t = x["heldout"], x["true_false"]
        lines.append(f"| {x['layer']} | {h['auroc']:.3f} | {h['recall']:.2f} | {t['auroc']:.3f} | {t['recall']:.2f} |")
    lines += ["", "## Sycophancy vector (CAA)", "",
              f"{s['pairs']} training pairs, {s['heldout_questions']} held-out questions; layer {s['layer']} "
              f"(|v| = {s['norm']:.1f}); as a monitor, the matching answer projects above the other on "
              f"{s['heldout_pair_accuracy']:.0%} of the held-out questions.", "",
              "Separation per layer (pairs held out inside the training questions):", "",
              "| layer | pair accuracy | effect size |", "|---:|---:|---:|"]
    lines += [f"| {x['layer']} | {x['pair_accuracy']:.2f} | {x['effect_size']:.2f} |" for x in s["separation"]]
    lines += ["", "| coefficient | sycophantic choice rate | KL on neutral text |", "|---:|---:|---:|"]
    lines += [f"| {x['coef']:g} | {x['sycophantic_choice']:.3f} | {x['neutral_kl']:.4f} |" for x in s["effect"]]
    lines += ["", "## Refusal direction", "",
              f"Layer {r['layer']}, position {r['position']} (|r| = {r['norm']:.1f}), chosen by: {r['selection']}. "
              "Refusal score = log-odds of a refusal opening at the first response token. As a monitor, the "
              f"projection on r tells held-out harmful from harmless prompts with AUROC {r['monitor_auroc']:.3f}.", "",
              f"- harmful prompts: {r['baseline_harmful']:.2f} plain, {r['ablated_harmful']:.2f} with r ablated "
              f"at every layer (KL on harmless {r['ablation_kl_harmless']:.4f}, on neutral text "
              f"{r['ablation_kl_neutral']:.4f})", f"- harmless prompts: {r['baseline_harmless']:.2f} plain", "",
              "| coefficient of r added | harmless refusal score | KL on neutral text |", "|---:|---:|---:|"]
    lines += [f"| {x['coef']:g} | {x['harmless_refusal']:.2f} | {x['neutral_kl']:.4f} |" for x in r["effect"]]
    if "sae" in m["report"]:
        a = m["report"]["sae"]
        lines += ["", "## SAE (TopK, neutral corpus)", "",
                  f"Layer {a['layer']}, {a['d_sae']} latents, k = {a['k']}; {a['tokens']} training tokens "
                  f"({a['corpus_tokens']} distinct); on {a['heldout_tokens']} held-out tokens: fraction of "
                  f"variance explained {a['fve']:.3f}, MSE {a['mse']:.4g}, L0 {a['l0']:.1f}, dead latents "
                  f"{a['dead_fraction']:.1%}."]
    return "\n".join(lines) + "\n"
