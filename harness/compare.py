"""Judge named tensors: one tensor's error against the truth, the bound its tolerance allows there, and how
it fails (after assert_close: the largest error, where, and how many elements are past the bound); a
stage's group of tensors against the goldens, every name the backend adds a failure too."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from . import pieces
from .false_alarm import largest
from .tolerances import EXACT, Exact, Tolerance, TruthBound, truth_bound_inputs
from .truth import needs_truth

CHUNK = 1 << 20  # elements an exact comparison takes at once: its temporaries stay ~10 MB for any tensor


ABSENT = "absent from the backend's output"


@dataclass
class TensorResult:
    name: str
    passed: bool
    max_abs: float = 0.0  # largest |actual - truth|
    max_rel: float = 0.0  # largest |actual - truth| / max|truth|
    where: list[int] | None = None  # index of the largest violation (or largest error)
    mismatched: int = 0
    total: int = 0
    # the margin: the largest share of an element's noise budget its error uses, (error - explained) /
    # (bound - explained), where `explained` is the part of the bound its conditioning (the sensitivity) sets;
    # at most 1 passes, exactly where error <= bound
    ratio: float = 0.0
    tolerance: str = ""
    problem: str | None = None  # shape, dtype, non-finite, absent
    expected_at: float | None = None  # the reference's value there
    actual_at: float | None = None
    bound_at: float | None = None
    # the largest held-out ratios of the golden over the judged elements (harness/false_alarm.py); not reported
    heldout: np.ndarray | None = field(default=None, repr=False)
    own_ratio: float | None = field(default=None, repr=False)  # the same ratio of this backend's largest error

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("heldout", "own_ratio")}

    def describe(self) -> str:
        if self.problem:
            return f"{self.name}: {self.problem}"
        return (
            f"{self.name}: {self.mismatched}/{self.total} elements past the bound ({self.tolerance}); margin {self.ratio:.3g}; "
            f"max abs error {self.max_abs:.3g} at {self.where} (expected {self.expected_at:.6g}, got {self.actual_at:.6g}, "
            f"bound there {self.bound_at:.3g})"
        )


def _kind(a: np.ndarray) -> str:
    return (
        "int"
        if np.issubdtype(a.dtype, np.integer)
        else "float"
        if np.issubdtype(a.dtype, np.floating)
        else a.dtype.name
    )


def compare(
    name: str,
    actual,
    expected,
    tol: Tolerance,
    truth=None,
    sensitivity=None,
    stage_rms: float = 0.0,
    mask=None,
    param=None,
    param_dtype: str = "float32",
    spread=None,
) -> TensorResult:
    """`expected` is the reference's golden; `truth` (float64) what errors are measured against, the
    golden itself for exact tolerances. `mask` (broadcast to the shape) selects the judged elements;
    `param` is the parameter a change Δθ belongs to (its rounding, in `param_dtype`, sets Δθ's precision);
    `spread` the reference's noise at each element measured on perturbed inputs (harness/fixtures/spread.py)."""
    if actual is None:
        return TensorResult(name, False, problem=ABSENT, tolerance=tol.describe())
    try:
        actual = np.asarray(actual)
    except Exception as e:  # an object array or a ragged list from a port
        return TensorResult(name, False, problem=f"not an array: {e}", tolerance=tol.describe())
    expected = np.asarray(expected)
    res = TensorResult(name, False, total=int(expected.size), tolerance=tol.describe())
    if actual.shape != expected.shape:
        res.problem = f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
        return res
    if _kind(actual) != _kind(expected) or (
        _kind(actual) == "float" and actual.dtype.itemsize < expected.dtype.itemsize
    ):
        res.problem = f"dtype {actual.dtype}, expected {expected.dtype}"
        return res
    if isinstance(tol, Exact) and truth is None and sensitivity is None:
        return _exact(res, actual, expected, mask)
    center = expected if truth is None else np.asarray(truth)
    a, e, c = actual.astype(np.float64), expected.astype(np.float64), center.astype(np.float64)
    keep = np.ones(a.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), a.shape)
    if not np.isfinite(e[keep]).all():  # goldens are refused up front; this is a port's own rerun
        res.problem = f"{int((~np.isfinite(e[keep])).sum())} non-finite values in what it is compared with"
        res.mismatched = int((~np.isfinite(e[keep])).sum())
        return res
    bad_finite = ~np.isfinite(a) & keep
    if bad_finite.any():
        idx = np.unravel_index(int(np.argmax(bad_finite)), a.shape)
        res.problem = f"{int(bad_finite.sum())} non-finite values (first at {list(map(int, idx))}: {a[idx]})"
        res.mismatched = int(bad_finite.sum())
        return res
    sens = None if sensitivity is None else np.asarray(sensitivity, np.float64)[keep]
    theta = None if param is None else np.asarray(param, np.float64)[keep]
    spread = None if spread is None else np.asarray(spread, np.float64)[keep]
    bound = np.zeros(a.shape)
    if truth is not None and isinstance(tol, TruthBound):
        bound[keep], x, own = tol.bound_and_ratios(
            e[keep], c[keep], sens, stage_rms, theta, param_dtype, spread, actual=a[keep]
        )
        if x is not None:
            res.heldout, res.own_ratio = largest(x), float(own.max(initial=0.0))
    else:
        bound[keep] = tol.bound(e[keep], c[keep], sens, stage_rms, theta, param_dtype, spread)
    diff = np.where(keep, np.abs(a - c), 0.0)
    over = diff > bound
    # The margin: the part of an error its element's conditioning explains (an Adam update flipped where the
    # gradient sits at noise level moves by its whole sensitivity, ±lr) is no sample of the noise and uses
    # none of the bound's noise budget, so a flip reads 0 instead of 0.99 (the verdict is the same).
    explained = np.zeros(a.shape)
    if sens is not None:
        explained[keep] = np.minimum(sens, bound[keep])
    excess, budget = np.maximum(diff - explained, 0.0), bound - explained
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(budget > 0, excess / budget, np.where(excess > 0, np.inf, 0.0))
    res.total = int(keep.sum())
    res.ratio = float(ratios.max()) if ratios.size else 0.0
    res.mismatched = int(over.sum())
    res.max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(c[keep]).max()) if keep.any() else 0.0
    res.max_rel = res.max_abs / scale if scale > 0 else (float("inf") if res.max_abs > 0 else 0.0)
    if diff.size:
        worst = np.argmax(ratios) if res.mismatched else np.argmax(diff)
        idx = np.unravel_index(int(worst), diff.shape)
        res.where = [int(i) for i in idx]
        res.expected_at, res.actual_at, res.bound_at = float(e[idx]), float(a[idx]), float(bound[idx])
    res.passed = res.mismatched == 0
    return res


def _exact(res: TensorResult, actual: np.ndarray, expected: np.ndarray, mask) -> TensorResult:
    """Bit-for-bit equality (the bound is zero everywhere), judged in chunks without float64 copies of the
    whole tensor: a real model's weights are compared this way, so its embedding costs no gigabytes."""
    A, E = actual.reshape(-1), expected.reshape(-1)
    K = None if mask is None else np.broadcast_to(np.asarray(mask, bool), actual.shape).reshape(-1)
    total = mismatched = bad_e = bad_a = 0
    max_abs, scale, first_bad, worst = -1.0, 0.0, None, 0
    for i in range(0, A.size, CHUNK):
        a, e = A[i : i + CHUNK], E[i : i + CHUNK]
        keep = np.ones(a.shape, bool) if K is None else K[i : i + CHUNK]
        bad_e += int((~np.isfinite(e) & keep).sum()) if e.dtype.kind == "f" else 0
        nonfinite = (~np.isfinite(a) & keep) if a.dtype.kind == "f" else np.zeros(a.shape, bool)
        if nonfinite.any() and first_bad is None:
            first_bad = i + int(np.argmax(nonfinite))
        bad_a += int(nonfinite.sum())
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.where(keep, np.abs(a.astype(np.float64) - e.astype(np.float64)), 0.0)
        diff[~np.isfinite(diff)] = 0.0  # reported as non-finite above
        total, mismatched = total + int(keep.sum()), mismatched + int((diff > 0).sum())
        j = int(np.argmax(diff)) if diff.size else 0
        if diff.size and diff[j] > max_abs:
            max_abs, worst = float(diff[j]), i + j
        if keep.any():
            scale = max(scale, float(np.abs(e[keep].astype(np.float64)).max()))
    if bad_e:
        res.problem, res.mismatched = f"{bad_e} non-finite values in what it is compared with", bad_e
        return res
    if bad_a:
        idx = np.unravel_index(first_bad, actual.shape)
        res.problem, res.mismatched = (
            f"{bad_a} non-finite values (first at {list(map(int, idx))}: {A[first_bad]})",
            bad_a,
        )
        return res
    max_abs = max(max_abs, 0.0)
    res.total, res.mismatched, res.max_abs = total, mismatched, max_abs
    res.ratio = float("inf") if mismatched else 0.0
    res.max_rel = max_abs / scale if scale > 0 else (float("inf") if max_abs > 0 else 0.0)
    if A.size:
        idx = np.unravel_index(worst, actual.shape)
        res.where = [int(k) for k in idx]
        res.expected_at, res.actual_at, res.bound_at = float(E[worst]), float(A[worst]), 0.0
    res.passed = mismatched == 0
    return res


def compare_group(
    actual: dict,
    a_prefix: str,
    case,
    e_prefix: str,
    tol: Tolerance,
    expected: dict | None = None,
    mask_for=lambda name: True,
) -> list[TensorResult]:
    """Compare every expected `e_prefix*` tensor with `a_prefix*`; names the backend adds are failures too.
    Expected values are the case's goldens (judged against its truth) unless `expected` is given."""
    golden, truth = (case.golden, case.truth) if expected is None else (expected, {})
    exp = {k[len(e_prefix) :]: v for k, v in golden.items() if k.startswith(e_prefix)}
    act = {k[len(a_prefix) :]: v for k, v in actual.items() if k.startswith(a_prefix)}
    inputs = truth_bound_inputs(
        golden, truth, e_prefix, list(exp), case.settings.precision, case.settings.steps, case.initial_weights, mask_for
    )
    results = []
    for k, e in sorted(exp.items()):
        full = e_prefix + k
        if not isinstance(tol, TruthBound) or not needs_truth(full, e):
            exact = EXACT if isinstance(tol, TruthBound) else tol
            results.append(compare(a_prefix + k, act.get(k), e, exact, mask=mask_for(full)))
        else:
            results.append(compare(a_prefix + k, act.get(k), e, tol, mask=mask_for(full), **inputs[k]))
    for k in sorted(set(act) - set(exp)):
        results.append(
            TensorResult(
                a_prefix + k, False, problem="not expected: the reference has no such tensor", tolerance=tol.describe()
            )
        )
    return results


def forward_mask(case):
    """Forward outputs are judged at real tokens only: what a port computes at padded positions never
    reaches the loss (HF-style attention masking changes it and trains identically)."""
    attention = case.batch["attention_mask"]
    mask = attention.astype(bool)[..., None]

    def where(name: str):
        if name.startswith(pieces.PREFIX):
            return pieces.real_tokens(name, attention)
        return mask if name.startswith("forward.") else True

    return where
