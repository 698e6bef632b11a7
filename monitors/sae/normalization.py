"""Input normalisation of SAELens SAEs, its inverse on reconstructions, and on deltas.

Modes (SAELens ``SAE._setup_activation_normalization`` and the trainer's ``ActivationScaler``):

* ``none``: identity.
* ``expected_average_only_in``: ``x * s`` with one dataset-wide constant ``s = sqrt(d_in) / E||x||``.
  SAELens folds ``s`` into the weights when training ends (``fold_activation_norm_scaling_factor``)
  and its inference SAE then applies identity; so does this module unless a factor is given
  (``norm_scaling_factor`` in cfg.json or ``activation_scaler.json`` beside it).
* ``constant_norm_rescale``: ``x * sqrt(d_in) / ||x||`` per token; reconstructions are divided back.
* ``layer_norm``: ``(x - mean) / (std + 1e-5)`` per token with the unbiased std; reconstructions are
  mapped back with ``y * std + mean`` exactly as SAELens does (no eps there).

``delta_to_input`` maps a change ``d`` made in normalised space to input space *holding this token's
statistics fixed*: ``d / scale``. For the two linear modes this is the exact inverse, so
``normalize(x + delta_to_input(d)) == normalize(x) + d``. For ``constant_norm_rescale`` the result
is exactly ``(x_n + d) * sqrt(d_in) / ||x_n + d||`` (same direction as ``x_n + d``); for
``layer_norm`` it is exactly the layer norm of ``x_n + d`` (with eps scaled by ``1/(std+eps)``).
Both agree with ``x_n + d`` to first order when ``d`` is orthogonal to ``x_n`` (and, for
``layer_norm``, to the all-ones vector).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from steering.errors import invalid

LN_EPS = 1e-5
_MIN_NORM = 1e-30  # a zero vector would give inf/NaN under constant_norm_rescale


@dataclass(frozen=True, eq=False)
class NormState:
    """Per-call statistics of :meth:`Normalizer.normalize` for ``rows`` tokens.

    ``x_norm = (x - shift) * scale``; ``shift`` is [T, 1] (layer_norm) or None (0), ``scale`` is
    [T, 1], 0-dim (expected_average_only_in) or None (1); ``std`` is [T, 1] for layer_norm only.
    """

    mode: str
    rows: int
    shift: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    std: torch.Tensor | None = None


class Normalizer:
    """The normalisation of one SAE: ``mode`` over vectors of width ``d_in``."""

    def __init__(self, mode: str, d_in: int, factor: float = 1.0) -> None:
        self.mode = mode
        self.d_in = d_in
        self.factor = float(factor)

    @property
    def needs_state(self) -> bool:
        """True when undoing the normalisation needs per-token statistics."""
        return self.mode in ("constant_norm_rescale", "layer_norm")

    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, NormState]:
        """x [T, d_in] float32 -> (x_norm [T, d_in] float32, state)."""
        rows = x.shape[0]
        if self.mode == "constant_norm_rescale":
            scale = math.sqrt(self.d_in) / x.norm(dim=-1, keepdim=True).clamp_min(_MIN_NORM)
            return x * scale, NormState(self.mode, rows, scale=scale)
        if self.mode == "layer_norm":
            mean = x.mean(dim=-1, keepdim=True)
            centred = x - mean
            std = centred.std(dim=-1, keepdim=True)
            scale = 1.0 / (std + LN_EPS)
            return centred * scale, NormState(self.mode, rows, shift=mean, scale=scale, std=std)
        if self.mode == "expected_average_only_in" and self.factor != 1.0:
            scale = torch.tensor(self.factor, dtype=x.dtype, device=x.device)
            return x * scale, NormState(self.mode, rows, scale=scale)
        return x, NormState(self.mode, rows)

    def undo(self, y: torch.Tensor, state: NormState | None) -> torch.Tensor:
        """Map a reconstruction y [T, d_in] from normalised space back to input space."""
        if state is None:
            if self.needs_state:
                raise invalid("state", f"required to undo normalize_activations {self.mode!r}; pass the NormState from normalize()")
            return y / self.factor if self.factor != 1.0 and self.mode != "none" else y
        self.check_state(state, y.shape[0])
        if state.std is not None and state.shift is not None:
            return y * state.std + state.shift
        return y / state.scale if state.scale is not None else y

    def delta_to_input(self, delta: torch.Tensor, state: NormState) -> torch.Tensor:
        """Map a change delta [T, d_in] made in normalised space to input space (statistics fixed)."""
        self.check_state(state, delta.shape[0])
        return delta / state.scale if state.scale is not None else delta

    def check_state(self, state: NormState, rows: int) -> None:
        """Refuse a state from another mode or another batch size."""
        if not isinstance(state, NormState) or state.mode != self.mode:
            got = state.mode if isinstance(state, NormState) else type(state).__name__
            raise invalid("state", f"comes from {got!r}; this SAE normalizes with {self.mode!r}")
        if state.rows != rows:
            raise invalid("state", f"covers {state.rows} token(s) but the tensor has {rows}; they must match")
