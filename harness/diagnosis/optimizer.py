"""optimizer: the update solved for the convention it implies (scale, bias correction, schedule, decay, eps)."""

from __future__ import annotations

import numpy as np

from mlx_parity.reference.precision import parameter_dtype
from mlx_parity.reference.schedule import lr_at

from ..tolerances import ULP32, UNIT_ROUNDOFF, tolerance
from .core import Diagnosis, close, f64, initial, ratio


def optimizer(result, out, case) -> Diagnosis | None:
    g, t, s = case.golden, out.tensors, case.settings
    deltas = [k for k in g if k.startswith("optimizer.delta.")]
    if not deltas:
        return None
    present = [k for k in deltas if k in t]
    moved = [k for k in present if np.any(t[k])]
    has_state = any(k.startswith("optimizer.m.") and np.any(v) for k, v in t.items())
    # Unmoved parameters are evidence only where the reference's moved: after a warmup from a learning rate of 0
    # its first update is zero too (the isolated schedule check then sees what never reaches the model). No
    # state at all where the reference's moments hold its gradients is a step that never ran, whatever the rate.
    reference_moved = any(np.any(g[k]) for k in present)
    reference_state = any(k.startswith("optimizer.m.") and np.any(v) for k, v in g.items())
    stepped_nowhere = not has_state and reference_state
    if present and not moved and (reference_moved or stepped_nowhere):  # none of the reference's: the set differs
        if not has_state:
            return Diagnosis(
                "no_update",
                "parameters unchanged and no optimizer state: the step returned without updating (a silent fallback)",
                {"step": int(t.get("optimizer.step", -1))},
            )
        return Diagnosis(
            "optimizer_not_connected",
            "the optimizer's moments advanced but the parameters are unchanged: its result never reaches the model",
            {"step": int(t.get("optimizer.step", -1))},
        )
    set_problems = [f for f in result.failures if f.problem and f.problem.startswith(("absent", "not expected"))]
    if any(
        f.name.startswith("optimizer.delta.") for f in set_problems
    ):  # a different set first: clipping's global norm and everything after it span other tensors
        absent = sorted({f.name.split(".", 2)[-1] for f in set_problems if f.problem.startswith("absent")})
        extra = sorted({f.name.split(".", 2)[-1] for f in set_problems if f.problem.startswith("not expected")})
        shared = (
            "agree"
            if len(set_problems) == len(result.failures)
            else "differ too (a global clipping norm over another set moves them)"
        )
        mismatch = Diagnosis(
            "trainable_set_mismatch",
            f"the update covers a different set of parameters: {len(absent)} of the "
            f"reference's tensors absent, {len(extra)} extra; the ones both update {shared}",
            {"absent": absent[:20], "extra": extra[:20]},
        )
        # The update rule is still solved on the tensors both update, from the port's own moments, where they
        # differ: the set changes the gradient reaching them (a global clipping norm), never how m and v make
        # the update. Where they agree there is nothing for another cause to reproduce.
        if len(set_problems) == len(result.failures):
            return [mismatch]
        return [mismatch, *_update(t, g, case, present)]
    # Moments first: they see the gradient the optimizer was given (after clipping and accumulation).
    found = []
    m_keys = [k for k in g if k.startswith("optimizer.m.") and k in t]
    m_ratios = [ratio(t[k], g[k]) for k in m_keys]
    med = [r for r, spread in m_ratios if np.isfinite(r)]
    per_tensor = _per_tensor_clipping(m_keys, m_ratios, g, s)
    if per_tensor:
        found.append(per_tensor)
    elif med:
        r_m = float(np.median(med))
        # uniform: within each tensor and across tensors (clipping tensor by tensor scales each differently)
        uniform = all(spread < 0.02 * abs(r) for r, spread in m_ratios if np.isfinite(r)) and float(
            np.ptp(med)
        ) < 0.02 * abs(r_m)
        if uniform and not close(r_m, 1.0, 0.005):
            n = s.accum_steps
            if n > 1 and close(r_m, float(n)):
                found.append(
                    Diagnosis(
                        "accumulation_scaling",
                        f"moments are {r_m:.3g}× the reference's = accum_steps: micro-batch gradients summed, not averaged",
                        {"moment_ratio": r_m, "accum_steps": n},
                    )
                )
            elif s.clip_norm is not None and close(
                r_m * (_reference_clip_scale(g, m_keys, s.optimizer.betas[0]) or 0.0), 1.0, 0.02
            ):
                found.append(
                    Diagnosis(
                        "clipping_missing",
                        f"moments are a uniform {r_m:.3g}× the reference's, the inverse of the factor its clipping "
                        f"scaled the gradient by: the gradient was not clipped to norm {s.clip_norm}",
                        {
                            "moment_ratio": r_m,
                            "clip_norm": s.clip_norm,
                            "reference_clip_scale": _reference_clip_scale(g, m_keys, s.optimizer.betas[0]),
                        },
                    )
                )
            else:
                found.append(
                    Diagnosis(
                        "gradient_scale",
                        f"moments are a uniform {r_m:.3g}× the reference's: the gradient fed to the optimizer is scaled",
                        {"moment_ratio": r_m},
                    )
                )
        elif not uniform and s.optimizer.weight_decay > 0:
            coupled = _coupled_decay(t, g, case)
            if coupled:
                return [coupled]  # its update has no decoupled decay by construction: one cause, not two
    # Then the update itself, against the update the reference's conventions make of the port's own moments
    # (the goldens, when the port reports none), so a gradient bug above does not read as an update bug.
    found += _update(t, g, case, deltas)
    return found or None


def _own_moments(t, g, deltas) -> bool:
    """Whether the port reported m and v for every updated tensor: the expected update is then made of its own
    numbers alone, so a cause solved from it holds whatever went wrong upstream of the optimizer."""
    return all(
        np.shape(t.get(k.replace(".delta.", f".{moment}.", 1))) == np.shape(g[k]) for k in deltas for moment in "mv"
    )


def _expected_update(t, g, case, deltas, lr=None, eps=None, wd=None, corrected=None, eps_under=False) -> dict:
    """Δθ the contract's AdamW makes of the port's own moments (the goldens' where it reports none) and its own
    loaded θ, in float64; each keyword replaces one convention: the update under a hypothesis."""
    o = case.settings.optimizer
    lr = _lr0(case) if lr is None else lr
    eps = o.eps if eps is None else eps
    wd = o.weight_decay if wd is None else wd
    b1, b2 = o.betas
    corrected = o.bias_correction if corrected is None else corrected
    c1, c2 = (1 - b1, np.sqrt(1 - b2)) if corrected else (1.0, 1.0)
    out = {}
    for k in deltas:
        name = k.removeprefix("optimizer.delta.")
        m, v, p = t.get(f"optimizer.m.{name}"), t.get(f"optimizer.v.{name}"), _theta(t, case, name)
        if m is None or v is None or p is None or np.shape(m) != np.shape(g[k]) or np.shape(v) != np.shape(g[k]):
            out[k] = f64(g[k])
            continue
        vh = np.maximum(f64(v), 0) / c2**2
        root = np.sqrt(vh + eps) if eps_under else np.sqrt(vh) + eps
        out[k] = -lr * (wd * f64(p) + (f64(m) / c1) / root)
    return out


def _theta(t, case, name: str):
    """θ before the update: the port's own loaded value where it reported one, else the checkpoint's."""
    own = t.get(f"weights.{name}")
    ref = initial(case, name)
    return own if own is not None and ref is not None and np.shape(own) == np.shape(ref) else ref


def _correction_roundoff(case, corrected: bool) -> float:
    """The relative error of the first update's bias corrections when 1 - b is computed from a b held in float32
    (0.999 is 0.99900001): every float32 port carries it (√ halves it for b2); none without bias correction."""
    b1, b2 = case.settings.optimizer.betas
    return ULP32 * sum(w * b / (1 - b) for w, b in ((1.0, b1), (0.5, b2)) if b < 1) if corrected else 0.0


def _unexplained(t, g, case, deltas, **hypothesis) -> float:
    """The largest |Δθ_port − Δθ_hypothesis| over the float32 (or bfloat16) rounding a correct port's update
    carries there (the optimizer tolerance's floors: θ's rounding, the update's own roundings): at most 1 when
    the hypothesis reproduces the port's update at every element."""
    tol = tolerance("optimizer", case.settings.precision)
    expected = _expected_update(t, g, case, deltas, **hypothesis)
    kappa = _correction_roundoff(case, hypothesis.get("corrected", case.settings.optimizer.bias_correction))
    worst = 0.0
    for k in deltas:
        if k not in t or np.shape(t[k]) != np.shape(expected[k]):
            continue
        name = k.removeprefix("optimizer.delta.")
        e, theta = expected[k], _theta(t, case, name)
        theta = None if theta is None else np.maximum(np.abs(f64(theta)), np.abs(f64(theta) + e))
        bound = tol.bound(e, e, param=theta, param_dtype=parameter_dtype(name, case.settings.precision))
        bound = bound + kappa * np.abs(e)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.abs(f64(t[k]) - e) / bound
        worst = max(worst, float(np.nanmax(np.where(bound > 0, q, np.where(q > 0, np.inf, 0.0)), initial=0.0)))
    return worst


def _update(t, g, case, deltas) -> list[Diagnosis]:
    found = _update_rule(t, g, case, deltas)
    if found and _own_moments(t, g, [k for k in deltas if k in t]):
        for d in found:
            d.evidence["from_port_inputs"] = True
    return found


def _update_rule(t, g, case, deltas) -> list[Diagnosis]:
    """The convention under which the port's update is what its own moments make: named only when re-computing
    the update under it reproduces the port's at every element (`_unexplained` at most 1)."""
    s, o = case.settings, case.settings.optimizer
    if _unexplained(t, g, case, deltas) <= 1:
        return []  # the reference's conventions reproduce it: whatever differs came with the moments
    b1, b2 = o.betas
    c = (1 - b1) / np.sqrt(1 - b2)  # uncorrected / corrected at t = 1
    expected = _expected_update(t, g, case, deltas)
    ratios = [ratio(t[k], expected[k])[0] for k in deltas if k in t and np.shape(t[k]) == np.shape(expected[k])]
    ratios = [x for x in ratios if np.isfinite(x)]
    if not ratios:
        return []
    r = float(np.median(ratios))
    evidence = {"update_ratio": round(r, 4), "bias_correction_factor_t1": round(float(c), 4)}
    flipped = not o.bias_correction
    if (
        close(r, c if o.bias_correction else 1 / c)
        and _reproduces(t, g, case, deltas, evidence, corrected=flipped)
        and not _eps_reproduces(t, g, case, deltas)
    ):
        said = (
            f"the update is (1-β1)/√(1-β2) = {c:.3g}× the reference's: bias correction missing"
            if o.bias_correction
            else "the update is √(1-β2)/(1-β1) = %.3g× the reference's: bias correction applied where the reference "
            "has none" % (1 / c)
        )
        return [Diagnosis("bias_correction", said, evidence)]
    lr0, lr1 = lr_at(s.optimizer, s.schedule, 0), lr_at(s.optimizer, s.schedule, 1)
    if (
        lr0 > 0
        and not close(lr1, lr0, 1e-3)
        and close(r, lr1 / lr0, 0.01)
        and _reproduces(t, g, case, deltas, evidence, lr=lr1)
    ):
        return [
            Diagnosis(
                "schedule_off_by_one",
                f"the update is lr(1)/lr(0) = {lr1 / lr0:.3g}× the reference's: the schedule is read one step late",
                evidence | {"lr0": lr0, "lr1": lr1},
            )
        ]
    decay = _decay_missing(t, expected, case)
    if decay and _reproduces(t, g, case, deltas, decay.evidence, wd=0.0):
        return [decay]
    # A fitted learning rate or eps is named only where the bias correction flipped does not reproduce the port
    # as well: at the first update that flip is a scale and an eps change ((1−β1)/√(1−β2) and √(1−β2)), the
    # same update as eps alone where β2 = 1 − (1−β1)²; the N-update check then tells them apart.
    if _unexplained(t, g, case, deltas, corrected=flipped) <= 1:
        return []
    lr = _fitted_lr(t, g, case, deltas)
    if lr is not None and _reproduces(t, g, case, deltas, evidence, lr=lr):  # where lr0 did not (above)
        # the schedule step whose learning rate the port used, where one matches (a step counter read from
        # the micro-batches, say): said only when it reproduces the port's rate
        horizon = (s.steps + 1) * max(1, s.accum_steps)
        at = next((k for k in range(horizon) if close(lr_at(s.optimizer, s.schedule, k), lr, 0.002)), None)
        where = f"; that is the schedule's rate at step {at}, not step 0" if at else ""
        return [
            Diagnosis(
                "learning_rate",
                f"the update is a uniform {lr / lr0:.4g}× the reference's: the port's learning rate for its first "
                f"update is {lr:.4g} where the schedule gives {lr0:.4g}{where}",
                evidence | {"port_lr": lr, "schedule_lr": lr0, "schedule_step_of_port_lr": at},
            )
        ]
    eps = _eps_estimate(t, g, case)
    return [eps] if eps is not None and _reproduces(t, g, case, deltas, eps.evidence, **_eps_hypothesis(eps)) else []


def _eps_hypothesis(eps: Diagnosis) -> dict:
    if eps.code == "adam_eps_placement":
        return {"eps": eps.evidence["eps_under_sqrt"], "eps_under": True}
    return {"eps": eps.evidence["estimated_eps"]}


def _eps_reproduces(t, g, case, deltas) -> bool:
    """Whether an eps solved from the update reproduces it: then a bias correction flipped, the same update with
    another eps where (1−β1) = √(1−β2), cannot be told from it at the first update."""
    eps = _eps_estimate(t, g, case)
    return eps is not None and _unexplained(t, g, case, deltas, **_eps_hypothesis(eps)) <= 1


def _reproduces(t, g, case, deltas, evidence: dict, **hypothesis) -> bool:
    """Whether the update under `hypothesis` reproduces the port's; the residual goes into the evidence."""
    left = _unexplained(t, g, case, deltas, **hypothesis)
    evidence["reproduced_to"] = round(left, 3)  # of the rounding a correct update carries: at most 1
    return left <= 1


def _fitted_lr(t, g, case, deltas) -> float | None:
    """The learning rate that best makes the port's update of its own moments (least squares)."""
    unit = _expected_update(t, g, case, deltas, lr=1.0)  # −(wd·θ + m̂/(√v̂ + eps))
    num = den = 0.0
    for k in deltas:
        if k in t and np.shape(t[k]) == np.shape(unit[k]):
            num += float(np.sum(f64(t[k]) * unit[k]))
            den += float(np.sum(unit[k] ** 2))
    return num / den if den > 0 else None


def _fit_to_parameters(t, g, prefix: str, case) -> float | None:
    """Least-squares k in (port − reference) = k·θ over the `prefix` tensors (θ: the loaded weights)."""
    num = den = 0.0
    for k in (k for k in g if k.startswith(prefix) and k in t):
        p = initial(case, k.removeprefix(prefix))
        if p is None:
            continue
        resid = f64(t[k]) - f64(g[k])
        num += float((resid * p).sum())
        den += float((p * p).sum())
    return num / den if den else None


def _reference_clip_scale(g, m_keys, b1: float) -> float | None:
    """The factor the reference's clipping scaled its gradients by, read from its own first moments
    (m = (1-β1)·clipped g after one update): the norm it divided by is the one it computed, in its own
    precision (a bfloat16 sum of squares runs well below the float64 norm)."""
    ratios = []
    for k in m_keys:
        grad = f64(g.get("grad." + k.removeprefix("optimizer.m."), np.zeros(0)))
        if grad.shape != np.shape(g[k]):
            continue
        nz = grad != 0
        if nz.any():
            ratios.append(float(np.median(f64(g[k])[nz] / ((1 - b1) * grad[nz]))))
    return float(np.median(ratios)) if ratios else None


def _per_tensor_clipping(m_keys, m_ratios, g, s) -> Diagnosis | None:
    """Each tensor's moment ratio equals min(1, c/‖g_i‖) / min(1, c/‖g‖): clipped tensor by tensor."""
    if s.clip_norm is None or not m_keys:
        return None
    grads = {k: f64(g.get("grad." + k.removeprefix("optimizer.m."), np.zeros(0))) for k in m_keys}
    total = float(np.sqrt(sum((x * x).sum() for x in grads.values())))
    if total == 0 or any(x.size == 0 for x in grads.values()):
        return None
    c = s.clip_norm
    expected = [min(1.0, c / max(float(np.linalg.norm(x)), 1e-30)) / min(1.0, c / total) for x in grads.values()]
    if len(set(np.round(expected, 3))) < 2:
        return None  # indistinguishable from a uniform scale here
    if all(
        np.isfinite(r) and spread < 0.02 * abs(r) and close(r, e, 0.01) for (r, spread), e in zip(m_ratios, expected)
    ):
        return Diagnosis(
            "clipping_per_tensor",
            f"each tensor's moments are min(1, {c}/‖g_i‖) / min(1, {c}/‖g‖) × the reference's: "
            "every gradient tensor clipped on its own, not by the global norm",
            {
                "global_norm": total,
                "clip_norm": c,
                "ratios": {
                    k.removeprefix("optimizer.m."): round(r, 4) for k, (r, _) in list(zip(m_keys, m_ratios))[:6]
                },
            },
        )
    return None


def _decay_missing(t, g, case) -> Diagnosis | None:
    """Δθ_port − Δθ_ref = +lr·wd·θ: the decoupled decay term is missing. Not sought where the decay is below the
    parameters' rounding (bfloat16 weights: 1 − lr·wd rounds to 1, in the reference too), where any fit is noise."""
    lr, wd = _lr0(case), case.settings.optimizer.weight_decay
    units = {
        UNIT_ROUNDOFF[parameter_dtype(k.removeprefix("optimizer.delta."), case.settings.precision)]
        for k in g
        if k.startswith("optimizer.delta.")
    }
    if units and lr * wd < min(units):
        return None
    k_fit = _fit_to_parameters(t, g, "optimizer.delta.", case) if wd else None
    if k_fit is not None and close(k_fit, lr * wd, 0.05):
        return Diagnosis(
            "weight_decay_missing",
            f"Δθ differs from the reference by {k_fit:.3g}·θ = +lr·wd·θ: decoupled weight decay not applied",
            {"fitted": k_fit, "lr_times_wd": lr * wd},
        )
    return None


def _coupled_decay(t, g, case) -> Diagnosis | None:
    """m_port − m_ref = (1−β1)·wd·θ: weight decay added to the gradient (Adam + L2)."""
    b1, wd = case.settings.optimizer.betas[0], case.settings.optimizer.weight_decay
    k_fit = _fit_to_parameters(t, g, "optimizer.m.", case)
    if k_fit is not None and close(k_fit, (1 - b1) * wd, 0.05):
        return Diagnosis(
            "weight_decay_coupled",
            "m differs by (1−β1)·wd·θ: weight decay was added to the gradient (L2) instead of decoupled",
            {"fitted": k_fit, "expected_coupled": (1 - b1) * wd},
        )
    return None


def _lr0(case) -> float:
    return lr_at(case.settings.optimizer, case.settings.schedule, 0)


def _eps_estimate(t, g, case) -> Diagnosis | None:
    """Solve Δθ = −lr·wd·θ − lr·m̂/(√v̂ + eps) for eps, element by element; report it if it is not the configured one."""
    o = case.settings.optimizer
    lr = _lr0(case)
    b1, b2 = o.betas
    c1, c2 = (1 - b1, np.sqrt(1 - b2)) if o.bias_correction else (1.0, 1.0)
    estimates, inside, weights, weights_under = [], [], [], []
    kappa = _correction_roundoff(case, o.bias_correction)
    for k in (k for k in g if k.startswith("optimizer.delta.") and k in t):
        name = k.removeprefix("optimizer.delta.")
        p = initial(case, name)
        # the port's own moments where it reports them: the eps is solved from its update and its state
        m, v = (
            t.get(f"optimizer.m.{name}", g.get(f"optimizer.m.{name}")),
            t.get(f"optimizer.v.{name}", g.get(f"optimizer.v.{name}")),
        )
        if p is None or m is None or v is None:
            continue
        if np.shape(m) != np.shape(p) or np.shape(v) != np.shape(p) or np.shape(t[k]) != np.shape(p):
            continue
        adam = -(f64(t[k]) + lr * o.weight_decay * f64(p)) / lr  # = m̂ / (√v̂ + eps)
        mh, vh = f64(m) / c1, np.sqrt(np.maximum(f64(v), 0)) / c2
        with np.errstate(divide="ignore", invalid="ignore"):
            # Δθ is a float32 difference of parameters: its rounding, carried into m̂/adam, must leave eps resolvable
            sigma = np.abs(mh / adam**2) * (2.0**-23 * (np.abs(f64(p)) + np.abs(f64(t[k]))) / lr)
            ok = (np.abs(adam) > 1e-3) & (vh > 0) & (sigma < 0.2 * o.eps)
            # and the port's own float32 update (a few roundings of m̂/adam) and bias corrections (of v̂)
            sigma = np.sqrt(sigma**2 + (8 * ULP32 * np.abs(mh / adam)) ** 2 + (kappa * vh) ** 2)
        estimates.append(mh[ok] / adam[ok] - vh[ok])  # eps after the square root (AdamW)
        inside.append((mh[ok] / adam[ok]) ** 2 - vh[ok] ** 2)  # eps under it: m̂ / sqrt(v̂ + eps)
        weights.append(1.0 / sigma[ok] ** 2)  # each element's resolution of eps: the estimate is their weighted mean
        weights_under.append(1.0 / (2 * np.abs(mh[ok] / adam[ok]) * sigma[ok]) ** 2)
    after, under, w, wu = (np.concatenate(x) if x else np.zeros(0) for x in (estimates, inside, weights, weights_under))
    if after.size < 10:
        return None  # no element where eps is resolvable above float32 rounding
    est = float(np.sum(w * after) / np.sum(w))
    # The right placement gives the same eps at every element; the wrong one drifts with v̂.
    sig = np.abs(after) > 0.1 * max(abs(est), o.eps)
    if sig.sum() >= 10:
        spread = {
            name: float(np.subtract(*np.quantile(x[sig], [0.75, 0.25])) / abs(np.median(x[sig])))
            for name, x in (("after", after), ("under", under))
        }
        eps_under = float(np.sum(wu * under) / np.sum(wu))
        if spread["under"] < 0.2 < spread["after"] and eps_under > 0:
            return Diagnosis(
                "adam_eps_placement",
                f"the update implies eps under the square root, m̂/sqrt(v̂ + {eps_under:.2g}): "
                f"AdamW adds eps = {o.eps:g} after it",
                {"eps_under_sqrt": eps_under, "relative_spread": spread, "configured_eps": o.eps},
            )
    if est > 0 and abs(np.log10(est) - np.log10(o.eps)) > 0.3:
        return Diagnosis(
            "adam_eps",
            f"the update implies AdamW eps ≈ {est:.2g}, not the configured {o.eps:g}",
            {"estimated_eps": est, "configured_eps": o.eps},
        )
    return None
