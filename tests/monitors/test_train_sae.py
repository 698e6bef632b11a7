"""SAE training: planted sparse directions are recovered, resume is exact, the saved directory loads."""

from __future__ import annotations

import json

import pytest
import torch

from monitors.sae import load_sae
from monitors.train.sae import (
    CHECKPOINT_FILE,
    DeadTracker,
    SAETrainConfig,
    StepInfo,
    evaluate_sae,
    geometric_median,
    train_sae,
)
from steering.errors import FailedPrecondition

D_IN, N_DIRS = 32, 24


pytestmark = pytest.mark.usefixtures("single_thread")


def planted(n: int, seed: int) -> torch.Tensor:
    """Tokens made of a few of 24 fixed unit directions (each on with p=0.08, magnitude 0.5-2.5),
    scaled by 5, plus an offset of 3 and a little noise."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(N_DIRS, D_IN, generator=torch.Generator().manual_seed(123))
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    on = torch.rand(n, N_DIRS, generator=g) < 0.08
    mag = torch.rand(n, N_DIRS, generator=g) * 2 + 0.5
    return (on * mag) @ dirs * 5 + 3.0 + 0.01 * torch.randn(n, D_IN, generator=g)


TRAIN, HELD = planted(40_000, 0), planted(4_000, 1)


def chunks(x: torch.Tensor, size: int = 1000) -> list[torch.Tensor]:
    return [x[i:i + size] for i in range(0, x.shape[0], size)]


CONFIGS = {
    "topk": SAETrainConfig(d_in=D_IN, d_sae=64, arch="topk", k=4, lr=3e-3, batch_size=256, total_tokens=40_000,
                           dead_tokens=5_000),
    "relu": SAETrainConfig(d_in=D_IN, d_sae=64, arch="relu", l1=1.0, lr=3e-3, batch_size=256, total_tokens=40_000,
                           dead_tokens=5_000),
}


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_planted_sparse_directions_are_reconstructed(arch, tmp_path):
    r = train_sae(chunks(TRAIN), CONFIGS[arch], heldout=HELD)
    m = r.metrics
    assert m is not None and m.n_tokens == 4_000
    assert m.fve > 0.9
    assert (m.l0 == pytest.approx(4.0, abs=1e-6)) if arch == "topk" else (m.l0 < 12)
    assert r.steps == CONFIGS[arch].total_steps and r.tokens == 40_000 - 40_000 % 256
    if arch == "topk":
        torch.testing.assert_close(r.sae.W_dec.norm(dim=-1), torch.ones(64))

    # the SAELens directory reproduces the trainer's encode and decode on raw inputs
    r.save(tmp_path / "sae", model_name="planted", layer=6)
    sae = load_sae(tmp_path / "sae")
    assert sae.architecture == ("topk" if arch == "topk" else "standard")
    assert sae.hook_layer == 6 and sae.cfg.metadata.model_name == "planted"
    assert sae.cfg.metadata.hook_name == "blocks.6.hook_resid_post"
    torch.testing.assert_close(sae.encode(HELD), r.encode(HELD), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sae.decode(sae.encode(HELD)), r.reconstruct(HELD), atol=1e-3, rtol=1e-4)
    assert sae.feature_max is not None
    torch.testing.assert_close(sae.feature_max, torch.maximum(r.encode(HELD).amax(0), r.encode(TRAIN[r.tokens - 16384:r.tokens]).amax(0)))
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "none" and cfg.get("k") == (4 if arch == "topk" else None)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    cfg = SAETrainConfig(d_in=D_IN, d_sae=64, arch="topk", k=4, lr=3e-3, batch_size=256, total_tokens=6_000,
                         dead_tokens=500, aux_k=8, warmup_steps=5)
    data = chunks(TRAIN[:6_000], 700)  # chunks that do not line up with batches
    straight = train_sae(data, cfg)

    class Interrupt(Exception):
        pass

    def stop_at_17(info: StepInfo) -> None:
        if info.step == 17:
            raise Interrupt

    def reopen(skip: int) -> list[torch.Tensor]:  # a source that seeks, as token_stream does
        return chunks(TRAIN[skip:6_000], 700)

    for n, source in enumerate((data, reopen)):
        ckpt = tmp_path / str(n)
        with pytest.raises(Interrupt):
            train_sae(data, cfg, checkpoint_dir=ckpt, checkpoint_every=5, progress=stop_at_17)
        assert torch.load(ckpt / CHECKPOINT_FILE, weights_only=True)["step"] == 15
        resumed = train_sae(source, cfg, checkpoint_dir=ckpt, checkpoint_every=5, resume=True)
        assert resumed.resumed_from == 15 and resumed.steps == straight.steps
        for a, b in zip(straight.sae.parameters(), resumed.sae.parameters(), strict=True):
            assert torch.equal(a, b)
        assert torch.equal(straight.dead, resumed.dead)


def test_resume_refuses_a_checkpoint_made_with_other_settings(tmp_path):
    cfg = CONFIGS["topk"]
    small = SAETrainConfig(**{**cfg.__dict__, "total_tokens": 2_560})
    train_sae(chunks(TRAIN[:2_560]), small, checkpoint_dir=tmp_path, checkpoint_every=5)
    other = SAETrainConfig(**{**small.__dict__, "k": 5})
    with pytest.raises(FailedPrecondition, match=r"k=4 \(now 5\)"):
        train_sae(chunks(TRAIN[:2_560]), other, checkpoint_dir=tmp_path, resume=True)


def test_dead_tracker_counts_features_silent_for_the_window():
    t = DeadTracker(6, window=300)
    fire = [
        [1, 1, 1, 0, 0, 0],  # batch of 100 tokens
        [0, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 0],
    ]
    for mask in fire:
        t.update(torch.tensor(mask, dtype=torch.bool), 100)
    # tokens since last firing: f0 300, f1 200, f2 100, f3 400, f4 0, f5 400
    assert t.since.tolist() == [300, 200, 100, 400, 0, 400]
    assert t.dead().tolist() == [True, False, False, True, False, True]


def test_dead_features_are_reported_for_features_that_cannot_fire():
    cfg = SAETrainConfig(d_in=D_IN, d_sae=64, arch="relu", l1=1.0, lr=1e-3, batch_size=256, total_tokens=5_120,
                         dead_tokens=1_024, b_dec_init="mean")
    r = train_sae(chunks(TRAIN[:5_120]), cfg)
    with torch.no_grad():  # silence 10 features for good and keep them silent in a few more steps
        r.sae.b_enc[:10] = -1e6
    assert evaluate_sae(r, HELD).heldout_silent_fraction >= 10 / 64
    tracker = DeadTracker(64, 1_024)
    for x in chunks(TRAIN[:4_096], 256):
        tracker.update((r.encode(x) > 0).any(0), x.shape[0])
    assert bool(tracker.dead()[:10].all())


def test_geometric_median_resists_outliers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=g)
    x[:20] += 1000.0
    assert float(geometric_median(x).norm()) < 1.0 < float(x.mean(0).norm())
