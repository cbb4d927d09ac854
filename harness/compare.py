"""Compare one named tensor with its expected value, and say how it differs (after assert_close)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .tolerances import Tolerance


@dataclass
class TensorResult:
    name: str
    passed: bool
    max_abs: float = 0.0
    max_rel: float = 0.0
    where: list[int] | None = None  # index of the largest violation (or largest difference)
    mismatched: int = 0
    total: int = 0
    ratio: float = 0.0  # largest |Δ| / bound over the elements: below 1 passes, the noise margin
    tolerance: str = ""
    problem: str | None = None  # shape, dtype, non-finite, absent
    expected_at: float | None = None
    actual_at: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.problem:
            return f"{self.name}: {self.problem}"
        return (
            f"{self.name}: {self.mismatched}/{self.total} elements outside {self.tolerance}; "
            f"max abs diff {self.max_abs:.3g}, max rel diff {self.max_rel:.3g} at {self.where} "
            f"(expected {self.expected_at:.6g}, got {self.actual_at:.6g})"
        )


def compare(name: str, actual, expected: np.ndarray, tol: Tolerance) -> TensorResult:
    if actual is None:
        return TensorResult(name, False, problem="absent from the backend's output", tolerance=tol.describe())
    actual, expected = np.asarray(actual), np.asarray(expected)
    res = TensorResult(name, False, total=int(expected.size), tolerance=tol.describe())
    if actual.shape != expected.shape:
        res.problem = f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
        return res
    if np.issubdtype(expected.dtype, np.integer) != np.issubdtype(actual.dtype, np.integer):
        res.problem = f"dtype {actual.dtype}, expected {expected.dtype}"
        return res
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    bad_finite = ~np.isfinite(a) & np.isfinite(e)
    if bad_finite.any():
        idx = np.unravel_index(int(np.argmax(bad_finite)), a.shape)
        res.problem = f"{int(bad_finite.sum())} non-finite values (first at {list(map(int, idx))}: {a[idx]})"
        res.mismatched = int(bad_finite.sum())
        return res
    diff = np.abs(a - e)
    scale = np.abs(e) if tol.scale == "elementwise" else np.full_like(e, np.abs(e).max() if e.size else 0.0)
    bound = tol.atol + tol.rtol * scale
    over = diff > bound
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(bound > 0, diff / bound, np.where(diff > 0, np.inf, 0.0))
    if tol.outlier_fraction and ratios.size:  # the bound must hold for all but the allowed outliers
        keep = ratios.size - int(tol.outlier_fraction * ratios.size)
        res.ratio = float(np.partition(ratios.ravel(), keep - 1)[keep - 1])
    else:
        res.ratio = float(ratios.max()) if ratios.size else 0.0
    res.mismatched = int(over.sum())
    res.max_abs = float(diff.max()) if diff.size else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(scale > 0, diff / scale, np.where(diff > 0, np.inf, 0.0))
    res.max_rel = float(rel.max()) if rel.size else 0.0
    if diff.size:
        worst = np.argmax(np.where(over, diff - bound, -np.inf)) if res.mismatched else np.argmax(diff)
        idx = np.unravel_index(int(worst), diff.shape)
        res.where = [int(i) for i in idx]
        res.expected_at, res.actual_at = float(e[idx]), float(a[idx])
    res.passed = res.mismatched <= tol.outlier_fraction * res.total
    return res
