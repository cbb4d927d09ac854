"""optimizer: the update solved for the convention it implies (scale, bias correction, schedule, decay, eps)."""

from __future__ import annotations

import numpy as np

from .core import Diagnosis, close, f64, initial, ratio

def optimizer(result, out, case) -> Diagnosis | None:
    g, t, s = case.golden, out.tensors, case.settings
    deltas = [k for k in g if k.startswith("optimizer.delta.")]
    if not deltas:
        return None
    moved = [k for k in deltas if k in t and np.any(t[k])]
    has_state = any(k.startswith("optimizer.m.") and np.any(v) for k, v in t.items())
    if not moved:
        if not has_state:
            return Diagnosis("no_update", "parameters unchanged and no optimizer state: the step returned without updating (a silent fallback)",
                             {"step": int(t.get("optimizer.step", -1))})
        return Diagnosis("optimizer_not_connected", "the optimizer's moments advanced but the parameters are unchanged: its result never reaches the model",
                         {"step": int(t.get("optimizer.step", -1))})
    set_problems = [f for f in result.failures if f.problem and f.problem.startswith(("absent", "not expected"))]
    if any(f.name.startswith("optimizer.delta.") for f in set_problems):  # a different set first: clipping's global norm and everything after it span other tensors
        absent = sorted({f.name.split(".", 2)[-1] for f in set_problems if f.problem.startswith("absent")})
        extra = sorted({f.name.split(".", 2)[-1] for f in set_problems if f.problem.startswith("not expected")})
        shared = "agree" if len(set_problems) == len(result.failures) else "differ too (a global clipping norm over another set moves them)"
        return Diagnosis("trainable_set_mismatch", f"the update covers a different set of parameters: {len(absent)} of the "
                         f"reference's tensors absent, {len(extra)} extra; the ones both update {shared}",
                         {"absent": absent[:20], "extra": extra[:20]})
    # Moments first: they see the gradient the optimizer was given (after clipping and accumulation).
    m_ratios = [ratio(t[k], g[k]) for k in g if k.startswith("optimizer.m.") and k in t]
    med = [r for r, spread in m_ratios if np.isfinite(r)]
    if med:
        r_m = float(np.median(med))
        uniform = all(spread < 0.02 * abs(r) for r, spread in m_ratios if np.isfinite(r))
        if uniform and not close(r_m, 1.0, 0.005):
            n = s.accum_steps
            if n > 1 and close(r_m, float(n)):
                return Diagnosis("accumulation_scaling", f"moments are {r_m:.3g}× the reference's = accum_steps: micro-batch gradients summed, not averaged",
                                 {"moment_ratio": r_m, "accum_steps": n})
            if s.clip_norm is not None and r_m > 1:
                return Diagnosis("clipping_missing", f"moments are a uniform {r_m:.3g}× the reference's: the gradient was not clipped to norm {s.clip_norm}",
                                 {"moment_ratio": r_m, "clip_norm": s.clip_norm})
            return Diagnosis("gradient_scale", f"moments are a uniform {r_m:.3g}× the reference's: the gradient fed to the optimizer is scaled",
                             {"moment_ratio": r_m})
        if not uniform and s.optimizer.weight_decay > 0:
            coupled = _coupled_decay(t, g, case)
            if coupled:
                return coupled
    # Then the update itself.
    o = s.optimizer
    b1, b2 = o.betas
    c = (1 - b1) / np.sqrt(1 - b2)  # uncorrected / corrected at t = 1
    ratios = [ratio(t[k], g[k])[0] for k in deltas if k in t]
    r = float(np.median([x for x in ratios if np.isfinite(x)]))
    evidence = {"update_ratio": round(r, 4), "bias_correction_factor_t1": round(float(c), 4)}
    if o.bias_correction and close(r, c):
        return Diagnosis("bias_correction", "the update is (1-β1)/√(1-β2) = %.3g× the reference's: bias correction missing" % c, evidence)
    if not o.bias_correction and close(r, 1 / c):
        return Diagnosis("bias_correction", "the update is √(1-β2)/(1-β1) = %.3g× the reference's: bias correction applied where the reference has none" % (1 / c), evidence)
    from ..torch_twin import lr_at

    lr0, lr1 = lr_at(s, 0), lr_at(s, 1)
    if lr0 > 0 and not close(lr1, lr0, 1e-3) and close(r, lr1 / lr0, 0.01):
        return Diagnosis("schedule_off_by_one", f"the update is lr(1)/lr(0) = {lr1 / lr0:.3g}× the reference's: the schedule is read one step late",
                         evidence | {"lr0": lr0, "lr1": lr1})
    decay = _decay_missing(t, g, case)
    if decay:
        return decay
    if not close(r, 1.0, 0.002):
        spread = float(np.ptp([x for x in ratios if np.isfinite(x)]))
        if spread < 0.01 * abs(r):
            return Diagnosis("learning_rate", f"the update is a uniform {r:.4g}× the reference's: the learning rate differs", evidence)
    eps = _eps_estimate(t, g, case)
    if eps:
        return eps
    return None



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


def _decay_missing(t, g, case) -> Diagnosis | None:
    """Δθ_port − Δθ_ref = +lr·wd·θ: the decoupled decay term is missing."""
    lr, wd = _lr0(case), case.settings.optimizer.weight_decay
    k_fit = _fit_to_parameters(t, g, "optimizer.delta.", case) if wd else None
    if k_fit is not None and close(k_fit, lr * wd, 0.05):
        return Diagnosis("weight_decay_missing", f"Δθ differs from the reference by {k_fit:.3g}·θ = +lr·wd·θ: decoupled weight decay not applied",
                         {"fitted": k_fit, "lr_times_wd": lr * wd})
    return None


def _coupled_decay(t, g, case) -> Diagnosis | None:
    """m_port − m_ref = (1−β1)·wd·θ: weight decay added to the gradient (Adam + L2)."""
    b1, wd = case.settings.optimizer.betas[0], case.settings.optimizer.weight_decay
    k_fit = _fit_to_parameters(t, g, "optimizer.m.", case)
    if k_fit is not None and close(k_fit, (1 - b1) * wd, 0.05):
        return Diagnosis("weight_decay_coupled", "m differs by (1−β1)·wd·θ: weight decay was added to the gradient (L2) instead of decoupled",
                         {"fitted": k_fit, "expected_coupled": (1 - b1) * wd})
    return None


def _lr0(case) -> float:
    from ..torch_twin import lr_at

    return lr_at(case.settings, 0)


def _eps_estimate(t, g, case) -> Diagnosis | None:
    """Solve Δθ = −lr·wd·θ − lr·m̂/(√v̂ + eps) for eps, element by element; report it if it is not the configured one."""
    s, o = case.settings, case.settings.optimizer
    lr = _lr0(case)
    b1, b2 = o.betas
    c1, c2 = (1 - b1, np.sqrt(1 - b2)) if o.bias_correction else (1.0, 1.0)
    estimates = []
    for k in (k for k in g if k.startswith("optimizer.delta.") and k in t):
        name = k.removeprefix("optimizer.delta.")
        p = initial(case, name)
        m, v = g.get(f"optimizer.m.{name}"), g.get(f"optimizer.v.{name}")
        if p is None or m is None or v is None:
            continue
        adam = -(f64(t[k]) + lr * o.weight_decay * f64(p)) / lr  # = m̂ / (√v̂ + eps)
        mh, vh = f64(m) / c1, np.sqrt(f64(v)) / c2
        ok = (np.abs(adam) > 1e-3) & (vh > 0)
        estimates.append((mh[ok] / adam[ok] - vh[ok]))
    if not estimates:
        return None
    est = float(np.median(np.concatenate(estimates)))
    if est > 0 and abs(np.log10(est) - np.log10(o.eps)) > 0.3:
        return Diagnosis("adam_eps", f"the update implies AdamW eps ≈ {est:.2g}, not the configured {o.eps:g}", {"estimated_eps": est, "configured_eps": o.eps})
    return None
