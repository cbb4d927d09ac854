"""The isolated schedule's N updates replayed in float64 under one changed AdamW convention at a time: decay
missing or coupled into the gradient, another eps or eps under the square root, another learning rate.

A convention is named only where it reproduces the port: the port's Δθ less the change the convention makes
(its replay minus the reference's) passes the stage's own bound at every element. The one-update rules cannot
see these after a warmup from a learning rate of 0, where the first update is zero whatever the convention.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from mlx_parity.reference.precision import parameter_dtype
from mlx_parity.reference.schedule import lr_at

from ..compare import compare_group
from ..tolerances import UNIT_ROUNDOFF, rounding_gamma, tolerance
from .core import Diagnosis, f64, initial, ratio

PREFIX = "isolated.schedule.delta."
FIT_ELEMENTS = 4096  # the elements a fitted eps or learning rate is solved on: those the port moved most apart
EPS_DECADES = (-4.0, 6.0)  # the eps searched, in decades around the configured one
EPS_STEP = 0.01  # in decades: 2.3 % apart, below the 2× an eps must differ by to be named


@dataclass(frozen=True)
class Convention:
    eps: float
    weight_decay: float
    eps_under: bool = False  # m̂ / sqrt(v̂ + eps), not m̂ / (sqrt(v̂) + eps)
    coupled: bool = False  # wd·θ added to the gradient (Adam + L2), none decoupled
    lr_scale: float = 1.0
    grad_scale: float = 1.0  # the gradient AdamW sees, scaled: for Adam the same update as eps / grad_scale


def rates(case) -> list[float]:
    """The schedule's learning rate for each of the stage's N updates."""
    s = case.settings
    return [lr_at(s.optimizer, s.schedule, k) for k in range(s.steps)]


def replay(case, lrs: list[float], grad: np.ndarray, theta: np.ndarray, c: Convention, jitter=0.0) -> np.ndarray:
    """Δθ after N updates (`lrs`: their learning rates) of the same clipped gradient, in float64, under `c`;
    `jitter` is added to the gradient AdamW sees at every update (its rounding, for `_sensitivity`)."""
    o = case.settings.optimizer
    b1, b2 = o.betas
    th, m, v = f64(theta).copy(), np.zeros(np.shape(grad)), np.zeros(np.shape(grad))
    for k, rate in enumerate(lrs, 1):
        lr = c.lr_scale * rate
        g = (c.grad_scale * grad + c.weight_decay * th if c.coupled else c.grad_scale * grad) + jitter
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        mh, vh = (m / (1 - b1**k), v / (1 - b2**k)) if o.bias_correction else (m, v)
        root = np.sqrt(vh + c.eps) if c.eps_under else np.sqrt(vh) + c.eps
        th = th * (1 - lr * (0.0 if c.coupled else c.weight_decay)) - lr * mh / root
    return th - f64(theta)


def explain(case, port: dict[str, np.ndarray], moments: dict[str, np.ndarray] | None = None) -> list[Diagnosis]:
    """The one convention whose replay reproduces the port's N-update Δθ (`port`: by parameter name), replayed
    from the gradient the port's optimizer saw: the reference's, scaled as the port's own first moments of the
    one-update check (`moments`, by golden name) are. Where it reports none, a gradient scale is one more
    candidate, and it reproduces whatever another eps does (Adam's update of s·g with eps is that of g with
    eps/s): then neither is named."""
    s, o = case.settings, case.settings.optimizer
    names = [n for n in port if f"grad.{n}" in case.golden and initial(case, n) is not None]
    expected = {k.removeprefix(PREFIX) for k in case.golden if k.startswith(PREFIX)}
    if not names or set(names) != expected:
        return []  # another set of tensors: the set is the cause, and the stage's rules say so
    if not all(np.isfinite(port[n]).all() for n in names):
        return []  # non-finite values are the failure, said as such: no convention makes them
    reference = clipped({n: f64(case.golden[f"grad.{n}"]) for n in names}, s.clip_norm)
    scales = _moment_scales(case, names, moments or {})
    if scales is False:
        return []  # the port's moments differ by more than a scale: the one-update check's rules say how
    grads = reference if scales is None else {n: reference[n] * scales[n] for n in names}
    thetas = {n: f64(initial(case, n)) for n in names}
    own, lrs = Convention(o.eps, o.weight_decay), rates(case)
    base = {n: replay(case, lrs, reference[n], thetas[n], own) for n in names}
    tol = tolerance("isolated_schedule", s.precision)

    def unexplained(c: Convention) -> float:
        """The port's worst margin under the stage's bound once the change `c` makes is taken out, the bound
        widened by the convention's own sensitivity to its gradient's rounding (coupled decay cancels
        g + wd·θ where the reference's update is well conditioned): within it, it still passes."""
        corrected = {}
        for n in names:
            alt = replay(case, lrs, grads[n], thetas[n], c)
            gap = f64(port[n]) - (alt - base[n]) - f64(case.truth.get(f"truth.{PREFIX}{n}", case.golden[PREFIX + n]))
            slack = _sensitivity(case, lrs, grads[n], thetas[n], c, alt, parameter_dtype(n, s.precision))
            # the gap less the slack, toward the audit's centre: compared as the audit compares, with the bound
            corrected[PREFIX + n] = f64(port[n]) - (alt - base[n]) - np.sign(gap) * np.minimum(np.abs(gap), slack)
        results = compare_group(corrected, PREFIX, case, PREFIX, tol)
        return max((np.inf if r.problem else r.ratio for r in results), default=np.inf)

    if scales is not None and any(x != 1.0 for x in scales.values()) and unexplained(own) <= 1:
        return []  # the scaled gradient explains it all: named where the moments are judged
    candidates = []
    if o.weight_decay > 0:
        candidates += [
            ("weight_decay_missing", "decoupled weight decay not applied", dataclasses.replace(own, weight_decay=0.0)),
            (
                "weight_decay_coupled",
                "weight decay added to the gradient (Adam + L2) instead of decoupled",
                dataclasses.replace(own, coupled=True),
            ),
        ]
    sample = _sample(case, port, names, grads, reference)
    eps = _fitted_eps(case, lrs, sample, own, under=False)
    if eps is not None and abs(np.log10(eps / o.eps)) > 0.3:
        candidates.append(
            ("adam_eps", f"AdamW eps {eps:.2g}, not the configured {o.eps:g}", dataclasses.replace(own, eps=eps))
        )
        if scales is None:
            candidates.append(
                (
                    "gradient_scale",
                    f"the gradient AdamW sees scaled by {o.eps / eps:.3g}",
                    dataclasses.replace(own, grad_scale=o.eps / eps),
                )
            )
    under = _fitted_eps(case, lrs, sample, own, under=True)
    if under is not None:
        candidates.append(
            (
                "adam_eps_placement",
                f"eps under the square root, m̂/sqrt(v̂ + {under:.2g}), where AdamW adds eps = {o.eps:g} after it",
                dataclasses.replace(own, eps=under, eps_under=True),
            )
        )
    k = _fitted_lr_scale(case, lrs, sample, own)
    if k is not None and k != 1.0:
        candidates.append(
            ("learning_rate", f"every learning rate {k:.5g}× the schedule's", dataclasses.replace(own, lr_scale=k))
        )
    scored = [(unexplained(c), code, said, c) for code, said, c in candidates]
    reproducing = [x for x in scored if x[0] <= 1]
    if len(reproducing) != 1:  # none, or several the numbers cannot tell apart: nothing is named
        return []
    left, code, said, c = reproducing[0]
    evidence = {
        "steps": s.steps,
        "reproduced_to": round(float(left), 3),
        "convention": dataclasses.asdict(c),
        "other_conventions": {x[1]: round(float(x[0]), 3) for x in scored if x[1] != code},
    }
    d = Diagnosis(
        code, f"over {s.steps} updates of the same gradient the port's Δθ is the reference's with {said}", evidence
    )
    # it reads the port's whole update: which parameters it loaded and trains set the clipping's global norm and
    # the decay, so where a parameter did not load (a separate head on a tied checkpoint) it follows from that
    d.parameters = [""]
    return [d]


def _sensitivity(case, lrs, grad, theta, c: Convention, at: np.ndarray, dtype: str) -> np.ndarray:
    """How far the convention's Δθ moves when the gradient it makes (g, or g + wd·θ: three roundings) moves by
    its rounding in `dtype`, either way at every update: a correct port of it may be that far from `at`."""
    size = np.abs(grad) + (c.weight_decay * np.abs(f64(theta)) if c.coupled else 0.0)
    step = rounding_gamma(3, UNIT_ROUNDOFF[dtype]) * size
    return np.maximum(*(np.abs(replay(case, lrs, grad, theta, c, jitter=j) - at) for j in (step, -step)))


def _moment_scales(case, names, moments) -> dict[str, float] | None | bool:
    """Per tensor, the port's first moments of the one-update check over the reference's (1.0 where they pass
    that check's bound, or within 0.1 %): None where it reports none, False where one differs by more than a
    uniform scale."""
    key = "isolated.optimizer.m."
    if not all(key + n in moments and key + n in case.golden for n in names):
        return None
    tol = tolerance("isolated_optimizer", case.settings.precision)
    if all(r.passed for r in compare_group({key + n: moments[key + n] for n in names}, key, case, key, tol)):
        return dict.fromkeys(names, 1.0)  # within the one-update check's own bound: the reference's gradient
    scales = {}
    for n in names:
        r, spread = ratio(moments[key + n], case.golden[key + n])
        if not np.isfinite(r) or spread > 0.02 * abs(r):
            return False
        scales[n] = 1.0 if abs(r - 1) <= 1e-3 else r
    return scales


def clipped(grads: dict[str, np.ndarray], clip_norm) -> dict[str, np.ndarray]:
    """The gradients scaled to the global norm `clip_norm` (float64): the same factor at every update."""
    if clip_norm is None:
        return grads
    norm = float(np.sqrt(sum((x * x).sum() for x in grads.values())))
    return {n: x * min(1.0, clip_norm / norm) if norm > 0 else x for n, x in grads.items()}


def _sample(case, port, names, grads, reference):
    """(the gradient the port saw, the reference's, θ, the port's Δθ less the audit's centre) at the FIT_ELEMENTS
    elements furthest apart."""
    parts = []
    for n in names:
        centre = case.truth.get(f"truth.{PREFIX}{n}", case.golden[PREFIX + n])
        gap = (f64(port[n]) - f64(centre)).ravel()
        top = np.argsort(-np.abs(gap))[:FIT_ELEMENTS]
        parts.append((grads[n].ravel()[top], reference[n].ravel()[top], f64(initial(case, n)).ravel()[top], gap[top]))
    g, ref, th, gap = (np.concatenate(x) for x in zip(*parts))
    top = np.argsort(-np.abs(gap))[:FIT_ELEMENTS]
    return g[top], ref[top], th[top], gap[top]


def _fitted_eps(case, lrs: list[float], sample, own: Convention, under: bool) -> float | None:
    """The eps (after or under the square root) whose change best makes the port's gap (least squares)."""
    g, ref, th, gap = sample
    base = replay(case, lrs, ref, th, own)
    lo, hi = EPS_DECADES
    grid = 10 ** (np.log10(own.eps) + np.arange(lo, hi + EPS_STEP, EPS_STEP))
    cost = [
        float(((gap - (replay(case, lrs, g, th, dataclasses.replace(own, eps=e, eps_under=under)) - base)) ** 2).sum())
        for e in grid
    ]
    best = int(np.argmin(cost))
    return float(grid[best]) if np.isfinite(cost[best]) else None


def _fitted_lr_scale(case, lrs: list[float], sample, own: Convention) -> float | None:
    """k with the port's gap ≈ k·Δθ_seen − Δθ_ref (least squares): Δθ is linear in the rates but for the
    decay's θ."""
    g, ref, th, gap = sample
    seen, base = replay(case, lrs, g, th, own), replay(case, lrs, ref, th, own)
    den = float((seen * seen).sum())
    return float(((gap + base) * seen).sum()) / den if den > 0 else None
