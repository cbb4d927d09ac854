"""What every rule shares: the Diagnosis record and the numeric tests a hypothesis is checked with."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ..tolerances import HYPOTHESIS_RTOL
from .codes import CODES


@dataclass
class Diagnosis:
    code: str  # stable identifier from codes.CODES, e.g. "labels_not_shifted"
    summary: str  # one sentence for people
    evidence: dict = field(default_factory=dict)  # the numbers behind it
    pieces: list = field(default_factory=list)  # the smallest pieces it was isolated to (isolated forward)
    parameters: list = field(default_factory=list)  # parameter names those pieces read

    def __post_init__(self):
        if self.code not in CODES:
            raise ValueError(f"diagnosis code {self.code!r} is not in harness/diagnosis/codes.py")

    def to_dict(self) -> dict:
        return asdict(self)


def f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def lse(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


def cross_entropy(logits: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> float:
    picked = np.take_along_axis(logits, targets[..., None].astype(np.int64), -1)[..., 0]
    return float(((lse(logits) - picked) * mask).sum() / mask.sum())


def ratio(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """Median and spread of actual / expected over the elements that carry most of expected."""
    a, e = f64(actual).ravel(), f64(expected).ravel()
    keep = np.abs(e) >= np.quantile(np.abs(e), 0.5)
    keep &= np.abs(e) > 0
    if not keep.any():
        return float("nan"), float("nan")
    r = a[keep] / e[keep]
    return float(np.median(r)), float(np.quantile(r, 0.9) - np.quantile(r, 0.1))


def matches(actual, explained) -> bool:
    """A hypothesis reproduces the port's number (or tensor) to within HYPOTHESIS_RTOL of its scale."""
    if actual is None:
        return False
    a, e = f64(actual), f64(explained)
    if a.shape != e.shape or not np.isfinite(a).all():
        return False
    scale = float(np.abs(e).max()) if e.size else 0.0
    return bool(np.abs(a - e).max(initial=0.0) <= HYPOTHESIS_RTOL * scale + 1e-7)


def close(x: float, y: float, rel: float = 0.03) -> bool:
    return bool(np.isfinite(x) and abs(x - y) <= rel * abs(y))


def common_affix(names: list[str]) -> str:
    if len(names) < 2:
        return ""
    prefix = names[0]
    for n in names[1:]:
        while not n.startswith(prefix):
            prefix = prefix[:-1]
    return prefix


def initial(case, name: str) -> np.ndarray | None:
    return case.initial_weights.get(f"weights.{name}")


# The MLP activations a port may use in place of the model's: the convention solvers try each.
ACTIVATIONS = {
    "silu": lambda g: g / (1 + np.exp(-g)),
    "gelu": lambda g: 0.5 * g * (1 + np.vectorize(math.erf)(g / math.sqrt(2))),
    "gelu_tanh": lambda g: 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3))),
    "relu": lambda g: np.maximum(g, 0),
}


def rms_norm(x: np.ndarray, w, eps: float) -> np.ndarray:
    """RMSNorm over the last axis, times `w` (1.0 for none)."""
    return w * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def pairs(x: np.ndarray, halves: bool) -> tuple[np.ndarray, np.ndarray]:
    """RoPE's pairs of the last axis: halves (i, i + D/2, rotate_half) or interleaved (2i, 2i + 1)."""
    D = x.shape[-1]
    return (x[..., : D // 2], x[..., D // 2 :]) if halves else (x[..., 0::2], x[..., 1::2])


def rotated(x: np.ndarray, halves: bool, angle: np.ndarray) -> np.ndarray:
    """x's pairs (halves or interleaved) rotated by `angle` (broadcast to [..., D/2])."""
    (x1, x2), c, s = pairs(x, halves), np.cos(angle), np.sin(angle)
    y1, y2 = x1 * c - x2 * s, x1 * s + x2 * c
    if halves:
        return np.concatenate([y1, y2], -1)
    return np.stack([y1, y2], -1).reshape(x.shape)
