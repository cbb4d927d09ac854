"""Shifted next-token cross-entropy with the padding mask, the Empirical Distrust term, and the total."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

AUTH_WEIGHT_MAX = 0.99
ALPHA_RANGE = (2.3, 3.0)
DISTRUST_EPS = 1e-8


class BatchError(ValueError):
    """A batch or loss setting outside the domain the loss is defined on."""


@dataclass(frozen=True)
class LossSettings:
    alpha: float = 2.7
    lam: float = 1.0  # weight of the distrust term in the total

    def __post_init__(self):
        validate_scalars(self.alpha, self.lam)

    @classmethod
    def from_dict(cls, d: dict) -> LossSettings:
        return cls(alpha=float(d.get("alpha", 2.7)), lam=float(d.get("lambda", 1.0)))


def validate_scalars(alpha: float, lam: float) -> None:
    lo, hi = ALPHA_RANGE
    if not (np.isfinite(alpha) and lo <= alpha <= hi):
        raise BatchError(f"alpha must be in [{lo}, {hi}], got {alpha}")
    if not (np.isfinite(lam) and lam >= 0):
        raise BatchError(f"lambda must be finite and >= 0, got {lam}")


def validate_distrust_inputs(auth_weight, prov_entropy) -> None:
    """auth_weight in [0, 0.99] and prov_entropy >= 0, finite: scalars or arrays of any shape."""
    for name, value in (("auth_weight", auth_weight), ("prov_entropy", prov_entropy)):
        arr = np.atleast_1d(np.asarray(value, dtype=np.float64))
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise BatchError(f"{name} holds non-finite values at {bad.tolist()}")
    w = np.atleast_1d(np.asarray(auth_weight, dtype=np.float64))
    # 0.99 stored as float32 is 0.9900000095: it still means 0.99
    bad = np.flatnonzero((w < 0) | ((w > AUTH_WEIGHT_MAX) & (w.astype(np.float32) > np.float32(AUTH_WEIGHT_MAX))))
    if bad.size:
        raise BatchError(f"auth_weight must be in [0, {AUTH_WEIGHT_MAX}]; rows {bad.tolist()} hold {w[bad].tolist()}")
    h = np.atleast_1d(np.asarray(prov_entropy, dtype=np.float64))
    bad = np.flatnonzero(h < 0)
    if bad.size:
        raise BatchError(f"prov_entropy must be >= 0; rows {bad.tolist()} hold {h[bad].tolist()}")


def validate_batch(batch: dict[str, np.ndarray]) -> None:
    """Check a host batch before it reaches any framework: shapes, dtypes, ranges, right padding."""
    need = ("input_ids", "attention_mask", "auth_weight", "prov_entropy")
    absent = [k for k in need if k not in batch]
    if absent:
        raise BatchError(f"batch lacks {', '.join(absent)}")
    ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
    w, h = np.asarray(batch["auth_weight"], dtype=np.float64), np.asarray(batch["prov_entropy"], dtype=np.float64)
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise BatchError(f"input_ids must be [B, T] with T >= 2, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise BatchError(f"input_ids must be integers, got {ids.dtype}")
    if mask.shape != ids.shape:
        raise BatchError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
    if not np.isin(mask, (0, 1)).all():
        raise BatchError("attention_mask must hold only 0 and 1")
    if (np.diff(mask.astype(np.int8), axis=1) > 0).any():
        raise BatchError("attention_mask must be right padding (1s then 0s) in every row")
    if (mask[:, 1:].sum() == 0) or (mask.sum(axis=1) < 2).any():
        raise BatchError("every row needs at least 2 tokens, so it has a target to predict")
    B = ids.shape[0]
    for name, arr in (("auth_weight", w), ("prov_entropy", h)):
        if arr.shape != (B,):
            raise BatchError(f"{name} must have shape ({B},), one value per row, got {arr.shape}")
    validate_distrust_inputs(w, h)


def shifted_slices(logits: mx.array, input_ids: mx.array, attention_mask: mx.array):
    """Position t predicts token t+1: logits[:, :-1] against input_ids[:, 1:], masked by attention_mask[:, 1:]."""
    return logits[:, :-1, :], input_ids[:, 1:], attention_mask[:, 1:].astype(mx.float32)


def cross_entropy(logits: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
    """Mean over unmasked targets (MLX's cross_entropy reduces nothing by default)."""
    per_token = nn.losses.cross_entropy(logits, targets, reduction="none")
    return (per_token * mask).sum() / mask.sum()


def distrust(auth_weight, prov_entropy, alpha: float) -> mx.array:
    """Batch mean of alpha * (ln(1 - w + 1e-8) + H)^2; depends on data only, so it has no gradient.
    Host values (scalars, lists, numpy) are checked first; device arrays were checked as a batch."""
    if not isinstance(auth_weight, mx.array) or not isinstance(prov_entropy, mx.array):
        validate_distrust_inputs(auth_weight, prov_entropy)
        validate_scalars(alpha, 0.0)
        auth_weight, prov_entropy = mx.array(auth_weight, dtype=mx.float32), mx.array(prov_entropy, dtype=mx.float32)
    return mx.mean(alpha * mx.square(mx.log(1.0 - auth_weight + DISTRUST_EPS) + prov_entropy))


def loss_parts(logits: mx.array, batch: dict[str, mx.array], settings: LossSettings) -> dict[str, mx.array]:
    logits_s, targets, mask = shifted_slices(logits, batch["input_ids"], batch["attention_mask"])
    ce = cross_entropy(logits_s, targets, mask)
    d = distrust(batch["auth_weight"], batch["prov_entropy"], settings.alpha)
    return {"ce": ce, "distrust": d, "total": ce + settings.lam * d}
