"""Sparse autoencoder training on streamed residual activations, saved in the SAELens format.

Architectures:

* ``topk`` (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): ``f = ReLU(TopK(W_enc^T
  (x - b_dec) + b_enc))``; loss = MSE (squared error summed over dimensions, mean over tokens); decoder
  rows kept at unit norm (renormalised after each step, the gradient's component along each row removed
  first); optional AuxK loss: the residual ``x - x_hat`` reconstructed from the ``aux_k`` largest
  pre-activations of the dead features, normalised by the residual's energy, weight ``aux_coef`` (1/32).
* ``relu`` (Anthropic, "Circuits Updates - April 2024"; SAELens "standard" with
  ``scale_sparsity_penalty_by_decoder_norm``): ``f = ReLU(W_enc^T (x - b_dec) + b_enc)``, loss =
  MSE + lambda * sum_i f_i ||W_dec[i]|| (mean over tokens); decoder norms are free; lambda ramps up
  linearly over the first ``l1_warmup`` fraction of steps; gradient norm clipped to 1.

Both: W_dec rows random directions scaled to ``init_norm``, W_enc = W_dec^T, b_enc = 0, b_dec = the
geometric median (or mean) of the first batch; Adam (0.9, 0.999); optional linear lr warm-up and a
linear decay to zero over the last ``decay`` fraction. With ``normalize`` the inputs are scaled by one
constant so E||x|| = sqrt(d_in) (Anthropic's dataset normalisation); the constant is folded into the
saved weights, so the SAELens directory reads raw residuals (``normalize_activations: none``).

Dead features: a feature is dead when it has not fired in the last ``dead_tokens`` training tokens
(tracked per batch: a feature firing anywhere in a batch resets its counter).

Resume: every ``checkpoint_every`` steps the weights, Adam state, step, tokens seen, dead-feature
counters, the normalisation constant and the RNG state are written atomically to ``checkpoint_dir``.
``resume=True`` loads it and continues the stream after the tokens already seen, so for the same data
order the final weights equal an uninterrupted run's.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from monitors.sae import save_sae
from steering.errors import FailedPrecondition, invalid

Arch = Literal["topk", "relu"]
DataSource = Callable[[int], Iterable[torch.Tensor]] | Iterable[torch.Tensor]
TrainProgress = Callable[["StepInfo"], None]
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class SAETrainConfig:
    """Hyper-parameters. ``total_tokens`` sets the step count (``total_tokens // batch_size``)."""

    d_in: int
    d_sae: int
    arch: Arch = "topk"
    k: int = 32
    l1: float = 5.0
    l1_warmup: float = 0.05
    lr: float = 4e-4
    warmup_steps: int = 0
    decay: float = 0.2
    batch_size: int = 4096
    total_tokens: int = 4_000_000
    aux_k: int | None = None  # topk only; None: d_in // 2, 0: no AuxK
    aux_coef: float = 1 / 32
    dead_tokens: int = 1_000_000
    b_dec_init: Literal["median", "mean", "zeros"] = "median"
    init_norm: float = 1.0
    normalize: bool = True
    grad_clip: float | None = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in ("topk", "relu"):
            raise invalid("arch", f"{self.arch!r} not allowed; use topk or relu")
        for name in ("d_in", "d_sae", "batch_size", "total_tokens", "dead_tokens"):
            if getattr(self, name) < 1:
                raise invalid(name, f"must be >= 1, got {getattr(self, name)}")
        if self.arch == "topk" and not 1 <= self.k <= self.d_sae:
            raise invalid("k", f"{self.k} is out of range; allowed 1..d_sae={self.d_sae}")
        if self.lr <= 0 or self.l1 < 0 or not 0 <= self.decay <= 1 or not 0 <= self.l1_warmup <= 1:
            raise invalid("lr", "need lr > 0, l1 >= 0, 0 <= decay <= 1 and 0 <= l1_warmup <= 1")
        if self.b_dec_init not in ("median", "mean", "zeros"):
            raise invalid("b_dec_init", f"{self.b_dec_init!r} not allowed; use median, mean or zeros")

    @property
    def total_steps(self) -> int:
        return max(1, self.total_tokens // self.batch_size)

    @property
    def aux_k_used(self) -> int:
        if self.arch != "topk":
            return 0
        return self.d_in // 2 if self.aux_k is None else self.aux_k


class TrainableSAE(nn.Module):
    """The trained parameters, in SAELens shapes, acting on normalised inputs."""

    def __init__(self, cfg: SAETrainConfig, generator: torch.Generator) -> None:
        super().__init__()
        dec = torch.randn(cfg.d_sae, cfg.d_in, generator=generator)
        dec = dec / dec.norm(dim=-1, keepdim=True) * cfg.init_norm
        self.W_dec = nn.Parameter(dec)
        self.W_enc = nn.Parameter(dec.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.arch, self.k = cfg.arch, cfg.k

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d_in] -> pre-activations [T, d_sae]."""
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        if self.arch == "relu":
            return torch.relu(h)
        values, idx = torch.topk(h, self.k, dim=-1, sorted=False)
        return torch.zeros_like(h).scatter(-1, idx, torch.relu(values))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec


@dataclass(frozen=True)
class StepInfo:
    """Passed to the progress callback after each step (training-batch numbers, normalised space)."""

    step: int
    total_steps: int
    tokens: int
    loss: float
    mse: float
    l0: float
    dead: int


@dataclass(frozen=True)
class SAEMetrics:
    """Held-out quality. mse: mean squared error per element (input units); fve: 1 - SSE/SST around the
    held-out mean; l0: mean active features per token; dead_fraction: features that did not fire in the
    last ``dead_tokens`` training tokens; heldout_silent_fraction: features that never fire on held-out."""

    n_tokens: int
    mse: float
    fve: float
    l0: float
    dead_fraction: float
    heldout_silent_fraction: float


@dataclass
class SAETrainResult:
    """The trained SAE (training space), its normalisation constant and its run summary."""

    cfg: SAETrainConfig
    sae: TrainableSAE
    scale: float
    steps: int
    tokens: int
    dead: torch.Tensor
    feature_max: torch.Tensor
    metrics: SAEMetrics | None = None
    resumed_from: int | None = None
    history: list[StepInfo] = field(default_factory=list)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Raw residuals [T, d_in] -> feature activations [T, d_sae] (what the saved SAE computes)."""
        with torch.no_grad():
            return self.sae.encode(self._in(x))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.sae.decode(self.sae.encode(self._in(x))) / self.scale

    def observe_max(self, x: torch.Tensor, *, chunk: int = 8192) -> None:
        """Raise ``feature_max`` to the activations of rows x [T, d_in] (e.g. all training tokens)."""
        for lo in range(0, x.shape[0], chunk):
            self.feature_max = torch.maximum(self.feature_max, self.encode(x[lo:lo + chunk]).amax(0))

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.sae.W_dec.device, torch.float32) * self.scale

    def export(self, *, model_name: str = "", layer: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """SAELens tensors (normalisation folded in) and cfg.json content."""
        s = self.scale
        p = self.sae
        tensors = {"W_enc": (p.W_enc * s).detach().cpu(), "b_enc": p.b_enc.detach().cpu().clone(),
                   "W_dec": (p.W_dec / s).detach().cpu(), "b_dec": (p.b_dec / s).detach().cpu()}
        meta: dict[str, Any] = {"model_name": model_name or None,
                                "steerwatch_training": {**asdict(self.cfg), "steps": self.steps, "tokens": self.tokens}}
        if layer is not None:
            meta.update(hook_name=f"blocks.{layer}.hook_resid_post", hook_layer=layer)
        cfg: dict[str, Any] = {"architecture": "topk" if self.cfg.arch == "topk" else "standard",
                               "d_in": self.cfg.d_in, "d_sae": self.cfg.d_sae, "dtype": "float32",
                               "apply_b_dec_to_input": True, "normalize_activations": "none",
                               "metadata": {k: v for k, v in meta.items() if v is not None}}
        if self.cfg.arch == "topk":
            cfg["k"] = self.cfg.k
        return tensors, cfg

    def save(self, path: str | Path, *, model_name: str = "", layer: int | None = None) -> None:
        """Write the SAELens directory with feature_stats.safetensors (max_activation)."""
        tensors, cfg = self.export(model_name=model_name, layer=layer)
        save_sae(tensors, cfg, path, feature_max=self.feature_max.cpu())


class DeadTracker:
    """Tokens since each feature last fired (batch granularity)."""

    def __init__(self, d_sae: int, window: int) -> None:
        self.since = torch.zeros(d_sae, dtype=torch.long)
        self.window = window

    def update(self, fired: torch.Tensor, n_tokens: int) -> None:
        """``fired`` [d_sae] bool: the feature was active on some token of this batch of ``n_tokens``."""
        self.since += n_tokens
        self.since[fired] = 0

    def dead(self) -> torch.Tensor:
        """[d_sae] bool: no firing within the last ``window`` tokens."""
        return self.since >= self.window


# ---- training ------------------------------------------------------------------------------------
def train_sae(data: DataSource, cfg: SAETrainConfig, *, checkpoint_dir: str | Path | None = None,
              checkpoint_every: int = 0, resume: bool = False, heldout: torch.Tensor | None = None,
              progress: TrainProgress | None = None, stats_tokens: int = 16384,
              device: str | torch.device = "cpu") -> SAETrainResult:
    """Train on token rows from ``data`` (an iterable of [n, d_in] tensors, or a callable that opens
    the stream skipping its first n rows, which lets a resume skip work). Stops after
    ``cfg.total_steps`` batches or when the stream ends. ``resume`` continues from the checkpoint in
    ``checkpoint_dir`` when there is one (and starts afresh when there is none). ``feature_max`` is taken with the final weights
    over the last ``stats_tokens`` training rows and the held-out rows; metrics over ``heldout``."""
    ckpt = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    if resume and ckpt is None:
        raise invalid("resume", "needs a checkpoint directory")
    gen = torch.Generator().manual_seed(cfg.seed)
    sae = TrainableSAE(cfg, gen).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    tracker = DeadTracker(cfg.d_sae, cfg.dead_tokens)
    step, tokens, scale, resumed = 0, 0, 0.0, None
    if resume and ckpt is not None and ckpt.is_file():
        step, tokens, scale = _load_checkpoint(ckpt, cfg, sae, opt, tracker, gen, device)
        resumed = step
    tail: list[torch.Tensor] = []
    history: list[StepInfo] = []
    for x in _batches(data, cfg.batch_size, tokens, cfg.d_in) if step < cfg.total_steps else ():
        x = x.to(device)
        if step == 0:
            scale = _init_from_batch(sae, x, cfg)
        loss, mse, l0 = _step(sae, opt, tracker, x * scale, cfg, step)
        step, tokens = step + 1, tokens + x.shape[0]
        info = StepInfo(step, cfg.total_steps, tokens, loss, mse, l0, dead=int(tracker.dead().sum()))
        history.append(info)
        tail = _keep_tail(tail, x, stats_tokens)
        if ckpt is not None and checkpoint_every > 0 and step % checkpoint_every == 0:
            _save_checkpoint(ckpt, cfg, sae, opt, tracker, gen, step, tokens, scale)
        if progress is not None:
            progress(info)
        if step >= cfg.total_steps:
            break  # before asking a streamed source for another batch
    if step == 0:
        raise invalid("data", "gave no activations to train on")
    if ckpt is not None and checkpoint_every > 0 and step % checkpoint_every:
        _save_checkpoint(ckpt, cfg, sae, opt, tracker, gen, step, tokens, scale)
    result = SAETrainResult(cfg, sae, scale, step, tokens, tracker.dead(), torch.zeros(cfg.d_sae, device=device),
                            resumed_from=resumed, history=history)
    stats = [t for t in (*tail, heldout) if t is not None and t.numel()]
    if stats:
        result.feature_max = torch.cat([result.encode(t).amax(0, keepdim=True) for t in stats]).amax(0)
    if heldout is not None:
        result.metrics = evaluate_sae(result, heldout)
    return result


def _batches(data: DataSource, batch_size: int, skip: int, d_in: int) -> Iterator[torch.Tensor]:
    """Re-chunk the stream into [batch_size, d_in] batches (the last may be shorter), after ``skip`` rows."""
    stream: Iterable[torch.Tensor]
    if callable(data):
        stream, to_drop = data(skip), 0
    else:
        stream, to_drop = data, skip
    buf: list[torch.Tensor] = []
    have = 0
    for chunk in stream:
        if chunk.ndim != 2 or chunk.shape[1] != d_in:
            raise invalid("data", f"chunk of shape {list(chunk.shape)}; expected [n, d_in={d_in}]")
        chunk = chunk.detach().float()
        if to_drop:
            cut = min(to_drop, chunk.shape[0])
            chunk, to_drop = chunk[cut:], to_drop - cut
        buf.append(chunk)
        have += chunk.shape[0]
        while have >= batch_size:
            flat = torch.cat(buf)
            yield flat[:batch_size]
            buf, have = [flat[batch_size:]], have - batch_size
    if have:
        yield torch.cat(buf)


def _init_from_batch(sae: TrainableSAE, x: torch.Tensor, cfg: SAETrainConfig) -> float:
    """Normalisation constant and b_dec from the first batch."""
    scale = math.sqrt(cfg.d_in) / float(x.norm(dim=-1).mean().clamp_min(1e-12)) if cfg.normalize else 1.0
    xs = x * scale
    with torch.no_grad():
        if cfg.b_dec_init == "mean":
            sae.b_dec.copy_(xs.mean(0))
        elif cfg.b_dec_init == "median":
            sae.b_dec.copy_(geometric_median(xs))
    return scale


def geometric_median(x: torch.Tensor, iters: int = 30) -> torch.Tensor:
    """Weiszfeld iterations from the mean: the point minimising the summed distance to the rows of x."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=-1).clamp_min(1e-8)
        y = (w[:, None] * x).sum(0) / w.sum()
    return y


def _lr_factor(cfg: SAETrainConfig, step: int) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    decay_steps = int(cfg.decay * cfg.total_steps)
    start = cfg.total_steps - decay_steps
    fall = 1.0 if step < start or decay_steps == 0 else max(0.0, (cfg.total_steps - step) / decay_steps)
    return warm * fall


def _step(sae: TrainableSAE, opt: torch.optim.Optimizer, tracker: DeadTracker, x: torch.Tensor,
          cfg: SAETrainConfig, step: int) -> tuple[float, float, float]:
    """One Adam step on a normalised batch; returns (loss, mse, l0)."""
    for group in opt.param_groups:
        group["lr"] = cfg.lr * _lr_factor(cfg, step)
    with torch.enable_grad():
        h = sae.pre(x)
        f = sae.activate(h)
        x_hat = sae.decode(f)
        err = x - x_hat
        mse = err.pow(2).sum(-1).mean()
        loss = mse
        if cfg.arch == "relu":
            ramp = min(1.0, (step + 1) / max(1.0, cfg.l1_warmup * cfg.total_steps))
            loss = loss + cfg.l1 * ramp * (f * sae.W_dec.norm(dim=-1)).sum(-1).mean()
        dead = tracker.dead()
        n_dead = int(dead.sum())
        if cfg.aux_k_used and n_dead:
            loss = loss + cfg.aux_coef * _aux_loss(sae, h, dead, err.detach(), min(cfg.aux_k_used, n_dead))
        opt.zero_grad()
        loss.backward()
    if cfg.arch == "topk":
        _remove_parallel_grad(sae)
    if cfg.grad_clip:
        nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
    opt.step()
    if cfg.arch == "topk":
        with torch.no_grad():
            sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    fired = (f > 0).detach()
    tracker.update(fired.any(0).cpu(), x.shape[0])
    return float(loss.detach()), float(mse.detach()), float(fired.sum(-1).float().mean())


def _aux_loss(sae: TrainableSAE, h: torch.Tensor, dead: torch.Tensor, residual: torch.Tensor, k: int) -> torch.Tensor:
    """AuxK: reconstruct the residual from the k largest dead pre-activations (normalised MSE)."""
    masked = h.masked_fill(~dead, float("-inf"))
    values, idx = torch.topk(masked, k, dim=-1, sorted=False)
    f_aux = torch.zeros_like(h).scatter(-1, idx, torch.relu(values))
    e_hat = f_aux @ sae.W_dec
    return (e_hat - residual).pow(2).sum(-1).mean() / residual.pow(2).sum(-1).mean().clamp_min(1e-12)


def _remove_parallel_grad(sae: TrainableSAE) -> None:
    """Drop the gradient component along each (unit) decoder row, as the norm constraint removes it."""
    g = sae.W_dec.grad
    if g is None:
        return
    w = sae.W_dec.detach()
    g.sub_((g * w).sum(-1, keepdim=True) * w)


def _keep_tail(tail: list[torch.Tensor], x: torch.Tensor, limit: int) -> list[torch.Tensor]:
    tail = [*tail, x]
    while len(tail) > 1 and sum(t.shape[0] for t in tail[1:]) >= limit:
        tail = tail[1:]
    return tail


# ---- evaluation ----------------------------------------------------------------------------------
def evaluate_sae(result: SAETrainResult, x: torch.Tensor, *, chunk: int = 8192) -> SAEMetrics:
    """Reconstruction quality on raw held-out rows x [T, d_in] (see :class:`SAEMetrics`)."""
    if x.ndim != 2 or x.shape[0] == 0:
        raise invalid("heldout", f"shape {list(x.shape)}; expected a non-empty [T, d_in]")
    x = x.to(result.sae.W_dec.device, torch.float32)
    mean = x.mean(0)
    sse = sst = l0 = 0.0
    fired = torch.zeros(result.cfg.d_sae, dtype=torch.bool)
    for lo in range(0, x.shape[0], chunk):
        xb = x[lo:lo + chunk]
        with torch.no_grad():
            f = result.sae.encode(xb * result.scale)
            x_hat = result.sae.decode(f) / result.scale
        f = f.cpu()
        sse += float((xb - x_hat).double().pow(2).sum())
        sst += float((xb - mean).double().pow(2).sum())
        l0 += float((f > 0).sum())
        fired |= (f > 0).any(0)
    n = x.shape[0]
    return SAEMetrics(n, sse / x.numel(), 1 - sse / max(sst, 1e-30), l0 / n,
                      float(result.dead.float().mean()), float((~fired).float().mean()))


# ---- checkpoints ---------------------------------------------------------------------------------
def _save_checkpoint(path: Path, cfg: SAETrainConfig, sae: TrainableSAE, opt: torch.optim.Optimizer,
                     tracker: DeadTracker, gen: torch.Generator, step: int, tokens: int, scale: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"config": asdict(cfg), "sae": sae.state_dict(), "optimizer": opt.state_dict(), "step": step,
             "tokens": tokens, "scale": scale, "since": tracker.since, "rng": gen.get_state(),
             "torch_rng": torch.get_rng_state()}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, cfg: SAETrainConfig, sae: TrainableSAE, opt: torch.optim.Optimizer,
                     tracker: DeadTracker, gen: torch.Generator,
                     device: str | torch.device) -> tuple[int, int, float]:
    try:
        state = torch.load(path, weights_only=True, map_location=device)
    except Exception as exc:  # torch raises several types for corrupt pickles
        raise FailedPrecondition(f"checkpoint: {path} cannot be read ({exc})", field="checkpoint") from None
    saved = state.get("config", {})
    diff = sorted(k for k, v in asdict(cfg).items() if saved.get(k) != v)
    if diff:
        shown = ", ".join(f"{k}={saved.get(k)!r} (now {getattr(cfg, k)!r})" for k in diff)
        raise FailedPrecondition(f"checkpoint: {path} was made with other settings: {shown}; "
                                 "resume with the same settings or drop --resume", field="checkpoint")
    sae.load_state_dict(state["sae"])
    opt.load_state_dict(state["optimizer"])
    tracker.since = state["since"].cpu().clone()
    gen.set_state(state["rng"].cpu())
    torch.set_rng_state(state["torch_rng"].cpu())
    return int(state["step"]), int(state["tokens"]), float(state["scale"])
