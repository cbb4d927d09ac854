"""How likely a correct port is to fail a stage by chance, estimated from the fixture's own samples of noise.

A truth bound (harness/tolerances.py) is `multiple × noise_i + sensitivity_i + floor_i`, where noise_i is the
largest of the golden's own error, the spread of 8 more runs measured when the fixture was built
(harness/fixtures/spread.py) and the tensor's floors. The golden is one more sample of that noise, not used by
the spread: held out, its ratio

    x_i = max(|golden_i - truth_i| - sensitivity_i - floor_i, 0) / (noise_i without the golden's own error)

is what a correct port whose rounding is distributed like the reference's own would score at element i, and
such a port fails the stage where x_i > multiple. Over the N elements a stage judges, the largest x are a
sample of the tail of that distribution. The peaks-over-threshold model of extreme-value theory extrapolates
them to the multiple: a generalized Pareto tail above the `TOP` largest, whose scale comes from their mean
excess and whose shape (how heavy the tail is) is fitted to them and raised to its 95 % upper confidence bound,
or is the model's (`SHAPE`) where too few values lie beyond the floor (`tail_shape`; the fit is reported as
`fitted_shape`: it ranged from below 0 to 0.69 on the bundled fixtures). The stage's false-alarm probability is
at most N × P(x > multiple) (a union bound over elements), and the audit's at most the sum over its stages.

What it assumes, and so what it does not cover: a port's error at each element is distributed as the
reference's own samples are (its kernels round like the reference's, the twin's random rounding or the fast
BLAS's), and the elements' tails are alike enough to be pooled per stage. A port that sums in another order
than any sampled kernel can exceed the golden's tail (docs/tolerances.md measures how far correct ports go);
its margins, not this estimate, are then the evidence. The estimate needs `MIN_ELEMENTS` judged elements;
smaller stages (the loss's three values) are judged but not estimated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TOP = 100  # the largest held-out ratios of a stage kept for the tail fit (at most a tenth of its elements)
MIN_ELEMENTS = 100  # a tenth of the elements at most is taken as the tail: at least 10 of them
MIN_EXCESSES = 50  # fewer: the tail's shape is not fitted (`tail_shape`)
UPPER_95 = 1.645  # the one-sided 95 % normal quantile
# The tail's shape where too few values show it: where every sample of an element's noise is normal, a new
# sample over the largest of n others exceeds t with probability ~ c t^-n (the others must all be below |X| / t),
# a generalized Pareto shape of 1/n. The spread holds n = 8 draws (fixtures/spread.py's DRAWS + TWIN_DRAWS; a
# test holds it), the golden being held out; the tensor's floors only make the tail lighter.
SPREAD_SAMPLES = 8
SHAPE = 1.0 / SPREAD_SAMPLES
TARGET = 1e-6  # the false-alarm probability the needed multiple is stated for
# Below this `own_probability`, a passing backend errs beyond what the reference's noise reaches, and the report says
# the stated chance does not hold for it (the torch twin: at least 1e-2 on every float32 fixture's stages).
OWN_MODELLED = 1e-2


def heldout_ratios(residual_beyond_floor: np.ndarray, noise_without_own: np.ndarray) -> np.ndarray:
    """x_i (module docstring): 0 where the golden is within its floor; infinite where nothing but its own error
    sets the bound (a sample the other samples give no scale for)."""
    over = np.maximum(residual_beyond_floor, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(over > 0, over / noise_without_own, 0.0)


def largest(x: np.ndarray, k: int = TOP + 1) -> np.ndarray:
    """The k largest values of x, largest first (what a stage pools from each tensor)."""
    flat = np.ravel(np.asarray(x, np.float64))
    if flat.size > k:
        flat = np.partition(flat, flat.size - k)[flat.size - k :]
    return np.sort(flat)[::-1]


@dataclass(frozen=True)
class TailFit:
    """A generalized Pareto tail of x above `threshold`, fitted to the `count` largest of `elements` values:
    P(x > t) = count / elements × (1 + shape (t - threshold) / scale)^(-1 / shape) for t above the threshold."""

    elements: int
    count: int
    threshold: float
    scale: float
    shape: float
    largest: float
    fitted_shape: float = math.nan  # what the excesses give (`tail_shape`), for the report

    def exceedance(self, t: float) -> float:
        """P(x > t) for one element (shape 0: the exponential tail, the limit)."""
        if t <= self.threshold:
            return self.count / self.elements
        if not math.isfinite(self.largest):
            return 1.0 / self.elements  # a sample the others give no scale for: at least it exceeds
        if self.scale <= 0.0:
            return 0.0
        z = (t - self.threshold) / self.scale
        survival = math.exp(-z) if self.shape == 0.0 else (1.0 + self.shape * z) ** (-1.0 / self.shape)
        return self.count / self.elements * survival

    def multiple_for(self, probability: float) -> float:
        """The smallest t with elements × P(x > t) ≤ probability: the multiple that false-alarm rate needs."""
        ratio = self.count / probability
        if ratio <= 1.0 or self.scale <= 0.0:
            return self.threshold
        if not math.isfinite(self.largest):
            return math.inf
        if self.shape == 0.0:
            return self.threshold + self.scale * math.log(ratio)
        return self.threshold + self.scale / self.shape * (ratio**self.shape - 1.0)


def fit_tail(top: np.ndarray, elements: int) -> TailFit | None:
    """The tail of `elements` values whose largest are `top` (largest first); None below MIN_ELEMENTS. The
    threshold is the value below the `count` largest (at most TOP, a tenth of the elements, and those above 0);
    the shape is `tail_shape`'s; the scale is the excesses' mean × (1 - shape), a generalized Pareto's mean excess."""
    if elements < MIN_ELEMENTS:
        return None
    top = np.asarray(top, np.float64)
    count = min(TOP, elements // 10, int((top > 0).sum()))
    threshold = float(top[count]) if count < top.size else 0.0
    excess = top[:count] - threshold
    if not np.isfinite(excess).all():
        return TailFit(elements, count, threshold, math.inf, SHAPE, math.inf)
    shape, fitted = tail_shape(excess)
    scale = float(excess.mean()) * (1.0 - shape) if count else 0.0
    return TailFit(elements, count, threshold, scale, shape, float(top[0]), fitted)


def tail_shape(excess: np.ndarray) -> tuple[float, float]:
    """(the shape used, the shape the excesses give). From MIN_EXCESSES excesses on, the shape fitted by
    probability-weighted moments (Hosking & Wallis 1987: a0 = mean y, a1 = mean (1 - p_i) y_(i), p_i = (i - 0.35)
    / n ascending, shape = 2 - a0 / (a0 - 2 a1)) raised to its one-sided 95 % upper confidence bound (their
    asymptotic variance, k = -shape: (1+k)^2 (2+k)^2 (1+k+2k^2) / ((1+2k)(3+2k) n)) and never below 0 (no end of
    the tail is assumed); fewer excesses, or a fit too heavy for that variance (shape ≥ 1/2): the larger of the
    fit and SHAPE."""
    if excess.size < MIN_EXCESSES:
        return SHAPE, math.nan
    y = np.sort(excess)
    p = (np.arange(1, y.size + 1) - 0.35) / y.size
    a0, a1 = float(y.mean()), float(((1.0 - p) * y).mean())
    if a0 <= 0.0 or a0 - 2.0 * a1 <= 0.0:
        return SHAPE, math.nan
    fitted = 2.0 - a0 / (a0 - 2.0 * a1)
    if fitted >= 0.5:
        return max(fitted, SHAPE), fitted
    k = -fitted
    var = (1 + k) ** 2 * (2 + k) ** 2 * (1 + k + 2 * k * k) / ((1 + 2 * k) * (3 + 2 * k) * y.size)
    return max(0.0, fitted + UPPER_95 * math.sqrt(var)), fitted


def stage_false_alarm(top: np.ndarray, elements: int, multiple: float, own: float) -> dict | None:
    """What the audit reports for one stage: its judged elements, the largest held-out ratio, the fitted tail,
    the probability that a port whose noise is the reference's fails it by chance (at most 1), and the multiple
    a false-alarm probability of TARGET would need, against the one used. `own`: the audited backend's largest
    ratio, computed as the golden's; `own_probability` is how likely a sample of the reference's noise reaches it
    somewhere in the stage: small for a correct backend whose rounding the reference's samples do not model (the
    estimate does not hold for it), and for a bug; None where the golden never left its floor."""
    fit = fit_tail(top, elements)
    if fit is None:
        return None
    return {
        "own_largest": own,
        # None where no sample of the reference's noise left its floor: its tail then says nothing
        "own_probability": min(1.0, elements * fit.exceedance(own)) if fit.count else None,
        "elements": elements,
        "largest_heldout": fit.largest,
        "tail": {
            "threshold": fit.threshold,
            "scale": fit.scale,
            "shape": fit.shape,
            "count": fit.count,
            "fitted_shape": None if math.isnan(fit.fitted_shape) else fit.fitted_shape,
        },
        "multiple": multiple,
        "probability": min(1.0, elements * fit.exceedance(multiple)),
        "multiple_needed": fit.multiple_for(TARGET),
    }
