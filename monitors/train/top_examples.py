"""Top-activating contexts of SAE features over a corpus, for reading what a feature responds to.

While activations stream by, :class:`TopTracker` keeps per feature the ``top`` best (activation, text,
token position), at most one per text (the text's maximum; this holds when each text's rows arrive in
one batch, as :func:`monitors.train.activations.iter_activations` yields them). Only positive
activations count, so a feature that never fires has no examples. The bookkeeping is a few tensor ops
per batch, so tracking every feature of a 4k-feature SAE is cheap.

:func:`render` turns the kept positions into snippets: a window of tokens either side, decoded, with the
maximum token marked as ``«token»``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from monitors.sae import SAE, validate_features
from monitors.train.activations import Encode, TokenActivations
from steering.errors import invalid

Decode = Callable[[list[int]], str]
LEFT, RIGHT = "«", "»"


class TopTracker:
    """Best ``top`` (score, text index, position) per tracked feature, updated batch by batch."""

    def __init__(self, n_features: int, top: int) -> None:
        if top < 1:
            raise invalid("top", f"must be >= 1, got {top}")
        self.top = top
        self.scores = torch.full((top, n_features), float("-inf"))
        self.text = torch.full((top, n_features), -1, dtype=torch.long)
        self.position = torch.full((top, n_features), -1, dtype=torch.long)

    def update(self, f: torch.Tensor, text_index: torch.Tensor, position: torch.Tensor) -> None:
        """f [N, F] activations of the tracked features for N token rows."""
        n, n_feat = f.shape
        if n == 0:
            return
        texts, seg = torch.unique(text_index, return_inverse=True)
        idx = seg[:, None].expand(n, n_feat)
        f = f.float().masked_fill(f <= 0, float("-inf"))
        best = torch.full((texts.numel(), n_feat), float("-inf")).scatter_reduce(0, idx, f, "amax")
        rows = torch.where(f == best[seg], torch.arange(n)[:, None].expand(n, n_feat), n)
        arg = torch.full((texts.numel(), n_feat), n).scatter_reduce(0, idx, rows, "amin").clamp_max(n - 1)
        scores = torch.cat([self.scores, best])
        text = torch.cat([self.text, texts[:, None].expand_as(best)])
        pos = torch.cat([self.position, position[arg]])
        self.scores, order = scores.topk(self.top, dim=0)
        self.text, self.position = text.gather(0, order), pos.gather(0, order)

    def entries(self, column: int) -> list[tuple[float, int, int]]:
        """(activation, text index, position) of one tracked feature, best first; positives only."""
        out = []
        for s, t, p in zip(self.scores[:, column].tolist(), self.text[:, column].tolist(),
                           self.position[:, column].tolist(), strict=True):
            if s > float("-inf"):
                out.append((float(s), int(t), int(p)))
        return sorted(out, key=lambda e: -e[0])

    def feature_peaks(self) -> torch.Tensor:
        """Largest activation seen per tracked feature [F] (0 where it never fired)."""
        return self.scores.max(0).values.clamp_min(0.0)


def track(sae: SAE, batches: Iterable[TokenActivations], layer: int, *, features: Sequence[int] | None = None,
          top: int = 5, field: str = "features") -> tuple[list[int], TopTracker]:
    """Stream ``batches`` through the SAE; track ``features`` (None: all). Returns (features, tracker)."""
    feats = list(range(sae.d_sae)) if features is None else [int(i) for i in features]
    idx = validate_features(sae, feats, field) if features is not None else None
    tracker = TopTracker(len(feats), top)
    for b in batches:
        x = b.acts[layer].to(sae.device)
        with torch.no_grad():
            f = sae.encode(x) if idx is None else sae.encode_features(x, idx)
        tracker.update(f.cpu(), b.text_index, b.position)
    return feats, tracker


@dataclass(frozen=True)
class Example:
    activation: float
    text_id: int | str
    position: int
    token: str
    snippet: str


@dataclass(frozen=True)
class FeatureExamples:
    """One feature's top contexts; ``max_activation`` is the SAE's recorded max (None without one)."""

    feature: int
    max_activation: float | None
    examples: list[Example]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def render(features: Sequence[int], tracker: TopTracker, texts: Sequence[str], encode: Encode, decode: Decode, *,
           window: int = 8, text_ids: Sequence[int | str] | None = None,
           feature_max: torch.Tensor | None = None, columns: Sequence[int] | None = None) -> list[FeatureExamples]:
    """Snippets for ``features`` (``columns[i]`` is feature i's column in the tracker; default 0..)."""
    if window < 0:
        raise invalid("window", f"must be >= 0, got {window}")
    cache: dict[int, list[int]] = {}
    out = []
    for n, feature in enumerate(features):
        examples = []
        for score, ti, pos in tracker.entries(columns[n] if columns is not None else n):
            ids = cache.setdefault(ti, encode(texts[ti]))
            token, snippet = _snippet(ids, pos, window, decode)
            examples.append(Example(round(score, 6), text_ids[ti] if text_ids is not None else ti, pos, token, snippet))
        fmax = float(feature_max[feature]) if feature_max is not None else None
        out.append(FeatureExamples(feature, fmax, examples))
    return out


def _snippet(ids: list[int], pos: int, window: int, decode: Decode) -> tuple[str, str]:
    """(token, window with the token marked). Decoding growing prefixes keeps the spacing a
    SentencePiece decoder drops at the start of a piece list."""
    lo, hi = max(0, pos - window), min(len(ids), pos + window + 1)
    left, upto, whole = decode(ids[lo:pos]), decode(ids[lo:pos + 1]), decode(ids[lo:hi])
    if upto.startswith(left) and whole.startswith(upto):
        token, right = upto[len(left):], whole[len(upto):]
    else:
        token, right = decode(ids[pos:pos + 1]), decode(ids[pos + 1:hi])
    return token, left + LEFT + token + RIGHT + right


def strongest(tracker: TopTracker, count: int) -> list[int]:
    """Tracker columns of the ``count`` features with the largest activation seen (fired ones only)."""
    peaks = tracker.feature_peaks()
    order = torch.argsort(peaks, descending=True, stable=True)
    return [int(i) for i in order[:count] if peaks[i] > 0]
