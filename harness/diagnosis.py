"""Why a stage fails: rules that name the likely cause and show the numbers behind it.

Each rule looks at one failing stage's outputs next to the goldens (and, where a cause can be
tested, recomputes the reference under that cause and checks that it reproduces the port's numbers).
A failure no rule explains still gets a localisation: the stage, tensor, layer, element and size.
Every rule is exercised by a mutant in `harness/mutants.py` (`parity selftest`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np

from .tolerances import HYPOTHESIS_RTOL


@dataclass
class Diagnosis:
    code: str  # stable identifier, e.g. "labels_not_shifted"
    summary: str  # one sentence for people
    evidence: dict = field(default_factory=dict)  # the numbers behind it

    def to_dict(self) -> dict:
        return asdict(self)


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _lse(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


def _ce(logits: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> float:
    picked = np.take_along_axis(logits, targets[..., None].astype(np.int64), -1)[..., 0]
    return float(((_lse(logits) - picked) * mask).sum() / mask.sum())


def _ratio(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """Median and spread of actual / expected over the elements that carry most of expected."""
    a, e = _f64(actual).ravel(), _f64(expected).ravel()
    keep = np.abs(e) >= np.quantile(np.abs(e), 0.5)
    keep &= np.abs(e) > 0
    if not keep.any():
        return float("nan"), float("nan")
    r = a[keep] / e[keep]
    return float(np.median(r)), float(np.quantile(r, 0.9) - np.quantile(r, 0.1))


def _matches(actual, explained) -> bool:
    """A hypothesis reproduces the port's number (or tensor) to within HYPOTHESIS_RTOL of its scale."""
    if actual is None:
        return False
    a, e = _f64(actual), _f64(explained)
    if a.shape != e.shape or not np.isfinite(a).all():
        return False
    scale = float(np.abs(e).max()) if e.size else 0.0
    return bool(np.abs(a - e).max(initial=0.0) <= HYPOTHESIS_RTOL * scale + 1e-7)


def _close(x: float, y: float, rel: float = 0.03) -> bool:
    return bool(np.isfinite(x) and abs(x - y) <= rel * abs(y))


def _common_affix(names: list[str]) -> str:
    if len(names) < 2:
        return ""
    prefix = names[0]
    for n in names[1:]:
        while not n.startswith(prefix):
            prefix = prefix[:-1]
    return prefix


# --- weight_mapping ------------------------------------------------------------------------------
def _weights(result, out, case) -> Diagnosis | None:
    report = out.meta.get("load_report") or {}
    missing, unexpected = report.get("missing") or [], report.get("unexpected") or []
    if missing and unexpected:
        for pre in {u.split(".", 1)[0] + "." for u in unexpected if "." in u}:
            if all(u.startswith(pre) for u in unexpected) and {u[len(pre):] for u in unexpected} & set(missing):
                return Diagnosis("key_mapping", f"checkpoint keys carry a {pre!r} prefix the loader does not strip (or adds)",
                                 {"prefix": pre, "missing": missing[:5], "unexpected": unexpected[:5]})
        return Diagnosis("key_mapping", f"{len(missing)} parameters unfilled and {len(unexpected)} checkpoint keys unused",
                         {"missing": missing[:10], "unexpected": unexpected[:10]})
    expected = case.initial_weights
    actual = {k: v for k, v in out.tensors.items() if k.startswith("weights.")}
    extra = sorted(set(actual) - set(expected))
    if "weights.lm_head.weight" in extra and case.settings and _tied(case):
        return Diagnosis("tied_embeddings_ignored", "the config ties lm_head to embed_tokens, but the port has a separate lm_head.weight",
                         {"extra": extra, "tie_word_embeddings": True})
    wrong = [t.name for t in result.tensors if not t.passed and t.name in expected and t.name in actual]
    if not wrong and (extra or [t for t in result.tensors if t.problem]):
        return Diagnosis("key_mapping", "the port's parameter names differ from the checkpoint's",
                         {"extra": extra[:10], "absent": [t.name for t in result.tensors if t.problem and "absent" in t.problem][:10]})
    if not wrong:
        return None
    by_value = {}
    for name in wrong:
        match = next((k for k, v in expected.items() if k != name and v.shape == actual[name].shape and np.array_equal(v, actual[name])), None)
        if match:
            by_value[name.removeprefix("weights.")] = match.removeprefix("weights.")
    if by_value:
        return Diagnosis("key_mapping", "parameters hold another key's checkpoint tensor (a rename or swap in the key map)",
                         {"holds": by_value})
    stats = {}
    for name in [w for w in wrong if np.size(actual[w]) and np.size(expected[w])][:8]:
        a, e = _f64(actual[name]), _f64(expected[name])
        corr = float(np.corrcoef(a.ravel(), e.ravel())[0, 1]) if a.size > 1 and a.std() > 0 and e.std() > 0 else 0.0
        stats[name.removeprefix("weights.")] = {"mean": round(float(a.mean()), 5), "std": round(float(a.std()), 5),
                                                "checkpoint_std": round(float(e.std()), 5), "correlation_with_checkpoint": round(corr, 3)}
    share = len(wrong) / max(1, len(expected))
    names = [w.removeprefix("weights.") for w in wrong]
    if share > 0.5:
        return Diagnosis("weights_not_loaded", f"{len(wrong)} of {len(expected)} parameters equal no checkpoint tensor: "
                         "the model keeps its initialisation (weights never loaded)", {"share_not_loaded": round(share, 3), "examples": stats})
    pattern = _common_affix(names)
    return Diagnosis("key_mapping", f"{', '.join(names[:4])}: {'equals' if len(names) == 1 else 'equal'} no checkpoint tensor, initialisation statistics kept: "
                     "their keys never mapped" + (f" (common to all: {pattern!r})" if pattern else ""),
                     {"not_loaded": names, "examples": stats})


def _tied(case) -> bool:
    import json

    return bool(json.loads((case.checkpoint / "config.json").read_text()).get("tie_word_embeddings", False))


# --- forward -------------------------------------------------------------------------------------
def _forward(result, out, case) -> Diagnosis | None:
    order = sorted((k for k in case.golden if k.startswith("forward.hidden.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    order.append("forward.logits")
    judged = {t.name: t for t in result.tensors}
    first = next((judged[n] for n in order if n in judged and not judged[n].passed), None)
    if first is None:
        return None
    layer = first.name.rsplit(".", 1)[1] if "hidden" in first.name else "final norm / lm_head"
    evidence = {"first_divergent": first.name, "max_abs": first.max_abs, "where": first.where, "mismatched": first.mismatched}
    for code, summary, mutant in FORWARD_HYPOTHESES:  # a known cause that reproduces the port's numbers
        produced = _mutant_output(mutant, case, "forward")
        if produced is not None and all(_matches(out.tensors.get(k), v) for k, v in produced.items() if k in case.golden):
            return Diagnosis(code, summary + f"; first divergence at {first.name}", evidence | {"reproduced_by": mutant})
    return Diagnosis("forward_divergence", f"the forward pass first diverges at {first.name} (layer {layer})", evidence)


FORWARD_HYPOTHESES = [
    ("rmsnorm_eps", "RMSNorm eps is not the config's rms_norm_eps (1e-5 reproduces the port)", "rmsnorm_eps_hardcoded"),
    ("gqa_head_mapping", "grouped-query kv heads are shared in the wrong order (tiled, not repeated)", "gqa_tiled_heads"),
    ("lora_scale", "the LoRA scale differs (1.0 reproduces the port)", "lora_scale_ignored"),
    ("rope_convention", "RoPE rotates interleaved pairs (traditional) where the checkpoint expects rotated halves", "rope_traditional"),
]

_MUTANT_CACHE: dict = {}


def _mutant_output(name: str, case, stage: str) -> dict | None:
    """A reference variant's outputs for one stage: the test of a hypothesis, computed once."""
    key = (name, str(case.path), stage)
    if key not in _MUTANT_CACHE:
        from .mutants import MUTANTS, MutantBackend

        try:
            _MUTANT_CACHE[key] = MutantBackend(MUTANTS[name]).run(case, (stage,))[stage].tensors
        except Exception:  # a hypothesis that cannot be built for this case is simply not a match
            _MUTANT_CACHE[key] = None
    return _MUTANT_CACHE[key]


# --- shifted_slices and loss -----------------------------------------------------------------------
def _shifted(result, out, case) -> Diagnosis | None:
    ids, mask = case.batch["input_ids"], case.batch["attention_mask"]
    targets = out.tensors.get("shifted.targets")
    if targets is not None and targets.shape == ids.shape and np.array_equal(targets, ids):
        return Diagnosis("labels_not_shifted", "targets are the input tokens themselves, not the next tokens: each position predicts its own token",
                         {"targets_shape": list(targets.shape), "expected_shape": [ids.shape[0], ids.shape[1] - 1]})
    if targets is not None and targets.shape == (ids.shape[0], ids.shape[1] - 1) and np.array_equal(targets, ids[:, :-1]):
        return Diagnosis("labels_not_shifted", "targets are input_ids[:, :-1]: each position predicts its own token", {})
    m = out.tensors.get("shifted.mask")
    if m is not None and m.shape == (ids.shape[0], ids.shape[1] - 1) and m.sum() > mask[:, 1:].sum():
        return Diagnosis("padding_counted", "the target mask covers padding positions", {"masked_targets": int(m.sum()), "expected": int(mask[:, 1:].sum())})
    return None


def _loss(result, out, case) -> Diagnosis | None:
    ce = out.tensors.get("loss.ce")
    if ce is None or np.shape(ce) != ():
        return None
    ce, g = float(ce), case.golden
    logits, ids, mask = _f64(g["forward.logits"]), case.batch["input_ids"], case.batch["attention_mask"].astype(np.float64)
    candidates = {
        "labels_not_shifted": ("the cross-entropy equals the unshifted one (each position predicting its own token)", _ce(logits, ids, mask)),
        "padding_counted": ("the cross-entropy equals the one that counts padding tokens", _ce(logits[:, :-1], ids[:, 1:], np.ones_like(mask[:, 1:]))),
    }
    for code, (summary, value) in candidates.items():
        if _matches(ce, value):
            return Diagnosis(code, summary, {"port_ce": ce, "reference_ce": float(g["loss.ce"]), "explained_ce": value})
    d, gd = out.tensors.get("loss.distrust"), float(g["loss.distrust"])
    lo = case.settings.loss
    if d is not None and np.shape(d) == () and not _matches(d, gd):
        # distrust is proportional to alpha: solve for the alpha the port's number implies
        alpha = lo.alpha * float(d) / gd if gd else float("nan")
        evidence = {"port": float(d), "reference": gd, "implied_alpha": alpha, "configured_alpha": lo.alpha}
        if np.isfinite(alpha) and 2.0 <= alpha <= 3.5:
            return Diagnosis("distrust_alpha", f"the distrust term implies alpha = {alpha:.4g}, not the configured {lo.alpha:g}", evidence)
        return Diagnosis("distrust_term", "the Empirical Distrust term differs and no alpha explains it (the 1e-8 inside the log, "
                         "or a sum where the batch mean belongs)", evidence)
    judged = {t.name: t for t in result.tensors}
    total = out.tensors.get("loss.total")
    ce_ok = "loss.ce" in judged and judged["loss.ce"].passed
    if ce_ok and d is not None and total is not None and np.shape(total) == () and float(d) != 0 and not judged.get("loss.total", judged["loss.ce"]).passed:
        lam = (float(total) - ce) / float(d)  # total = ce + lambda * distrust, solved from the port's own numbers
        return Diagnosis("distrust_lambda", f"the loss implies lambda = {lam:.4g} (total = ce + lambda * distrust), not the configured {lo.lam:g}",
                         {"implied_lambda": lam, "configured_lambda": lo.lam, "port_total": float(total), "port_ce": ce, "port_distrust": float(d)})
    return None


# --- gradients -----------------------------------------------------------------------------------
def _gradients(result, out, case) -> Diagnosis | None:
    exp = {k for k in case.golden if k.startswith("grad.")}
    act = {k for k, v in out.tensors.items() if k.startswith("grad.")}
    if not act:
        return Diagnosis("no_gradients", "no gradients at all: a forward-only step (or a loss returned without gradients)", {"expected_tensors": len(exp)})
    if all(not np.any(out.tensors[k]) for k in act):
        return Diagnosis("zero_gradients", "every gradient is exactly zero: no backward pass ran (forward only), or the loss is not connected to the parameters", {"tensors": len(act)})
    if act != exp:
        missing, extra = sorted(exp - act), sorted(act - exp)
        return Diagnosis("trainable_set_mismatch", f"the port trains a different set: {len(missing)} reference tensors absent, {len(extra)} extra",
                         {"absent": [m.removeprefix("grad.") for m in missing[:8]], "extra": [e.removeprefix("grad.") for e in extra[:8]]})
    return None


# --- optimizer -----------------------------------------------------------------------------------
def _optimizer(result, out, case) -> Diagnosis | None:
    g, t, s = case.golden, out.tensors, case.settings
    deltas = [k for k in g if k.startswith("optimizer.delta.")]
    if not deltas:
        return None
    set_problems = [f for f in result.failures if f.problem and f.problem.startswith(("absent", "not expected"))]
    if set_problems and len(set_problems) == len(result.failures):  # every difference is a tensor too few or too many
        absent = sorted({f.name.split(".", 2)[-1] for f in set_problems if f.problem.startswith("absent")})
        extra = sorted({f.name.split(".", 2)[-1] for f in set_problems if f.problem.startswith("not expected")})
        return Diagnosis("trainable_set_mismatch", f"the update covers a different set of parameters: {len(absent)} of the "
                         f"reference's tensors absent, {len(extra)} extra; the ones both update agree",
                         {"absent": absent[:20], "extra": extra[:20]})
    moved = [k for k in deltas if k in t and np.any(t[k])]
    has_state = any(k.startswith("optimizer.m.") and np.any(v) for k, v in t.items())
    if not moved:
        if not has_state:
            return Diagnosis("no_update", "parameters unchanged and no optimizer state: the step returned without updating (a silent fallback)",
                             {"step": int(t.get("optimizer.step", -1))})
        return Diagnosis("optimizer_not_connected", "the optimizer's moments advanced but the parameters are unchanged: its result never reaches the model",
                         {"step": int(t.get("optimizer.step", -1))})
    # Moments first: they see the gradient the optimizer was given (after clipping and accumulation).
    m_ratios = [_ratio(t[k], g[k]) for k in g if k.startswith("optimizer.m.") and k in t]
    med = [r for r, spread in m_ratios if np.isfinite(r)]
    if med:
        r_m = float(np.median(med))
        uniform = all(spread < 0.02 * abs(r) for r, spread in m_ratios if np.isfinite(r))
        if uniform and not _close(r_m, 1.0, 0.005):
            n = s.accum_steps
            if n > 1 and _close(r_m, float(n)):
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
    ratios = [_ratio(t[k], g[k])[0] for k in deltas if k in t]
    r = float(np.median([x for x in ratios if np.isfinite(x)]))
    evidence = {"update_ratio": round(r, 4), "bias_correction_factor_t1": round(float(c), 4)}
    if o.bias_correction and _close(r, c):
        return Diagnosis("bias_correction", "the update is (1-β1)/√(1-β2) = %.3g× the reference's: bias correction missing" % c, evidence)
    if not o.bias_correction and _close(r, 1 / c):
        return Diagnosis("bias_correction", "the update is √(1-β2)/(1-β1) = %.3g× the reference's: bias correction applied where the reference has none" % (1 / c), evidence)
    from .torch_twin import lr_at

    lr0, lr1 = lr_at(s, 0), lr_at(s, 1)
    if lr0 > 0 and not _close(lr1, lr0, 1e-3) and _close(r, lr1 / lr0, 0.01):
        return Diagnosis("schedule_off_by_one", f"the update is lr(1)/lr(0) = {lr1 / lr0:.3g}× the reference's: the schedule is read one step late",
                         evidence | {"lr0": lr0, "lr1": lr1})
    decay = _decay_missing(t, g, case)
    if decay:
        return decay
    if not _close(r, 1.0, 0.002):
        spread = float(np.ptp([x for x in ratios if np.isfinite(x)]))
        if spread < 0.01 * abs(r):
            return Diagnosis("learning_rate", f"the update is a uniform {r:.4g}× the reference's: the learning rate differs", evidence)
    eps = _eps_estimate(t, g, case)
    if eps:
        return eps
    return None


def _initial(case, name: str) -> np.ndarray | None:
    return case.initial_weights.get(f"weights.{name}")


def _fit_to_parameters(t, g, prefix: str, case) -> float | None:
    """Least-squares k in (port − reference) = k·θ over the `prefix` tensors (θ: the loaded weights)."""
    num = den = 0.0
    for k in (k for k in g if k.startswith(prefix) and k in t):
        p = _initial(case, k.removeprefix(prefix))
        if p is None:
            continue
        resid = _f64(t[k]) - _f64(g[k])
        num += float((resid * p).sum())
        den += float((p * p).sum())
    return num / den if den else None


def _decay_missing(t, g, case) -> Diagnosis | None:
    """Δθ_port − Δθ_ref = +lr·wd·θ: the decoupled decay term is missing."""
    lr, wd = _lr0(case), case.settings.optimizer.weight_decay
    k_fit = _fit_to_parameters(t, g, "optimizer.delta.", case) if wd else None
    if k_fit is not None and _close(k_fit, lr * wd, 0.05):
        return Diagnosis("weight_decay_missing", f"Δθ differs from the reference by {k_fit:.3g}·θ = +lr·wd·θ: decoupled weight decay not applied",
                         {"fitted": k_fit, "lr_times_wd": lr * wd})
    return None


def _coupled_decay(t, g, case) -> Diagnosis | None:
    """m_port − m_ref = (1−β1)·wd·θ: weight decay added to the gradient (Adam + L2)."""
    b1, wd = case.settings.optimizer.betas[0], case.settings.optimizer.weight_decay
    k_fit = _fit_to_parameters(t, g, "optimizer.m.", case)
    if k_fit is not None and _close(k_fit, (1 - b1) * wd, 0.05):
        return Diagnosis("weight_decay_coupled", "m differs by (1−β1)·wd·θ: weight decay was added to the gradient (L2) instead of decoupled",
                         {"fitted": k_fit, "expected_coupled": (1 - b1) * wd})
    return None


def _lr0(case) -> float:
    from .torch_twin import lr_at

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
        p = _initial(case, name)
        m, v = g.get(f"optimizer.m.{name}"), g.get(f"optimizer.v.{name}")
        if p is None or m is None or v is None:
            continue
        adam = -(_f64(t[k]) + lr * o.weight_decay * _f64(p)) / lr  # = m̂ / (√v̂ + eps)
        mh, vh = _f64(m) / c1, np.sqrt(_f64(v)) / c2
        ok = (np.abs(adam) > 1e-3) & (vh > 0)
        estimates.append((mh[ok] / adam[ok] - vh[ok]))
    if not estimates:
        return None
    est = float(np.median(np.concatenate(estimates)))
    if est > 0 and abs(np.log10(est) - np.log10(o.eps)) > 0.3:
        return Diagnosis("adam_eps", f"the update implies AdamW eps ≈ {est:.2g}, not the configured {o.eps:g}", {"estimated_eps": est, "configured_eps": o.eps})
    return None


# --- trajectory and checkpoint -------------------------------------------------------------------
def _trajectory(result, out, case) -> Diagnosis | None:
    loss = out.tensors.get("trajectory.loss")
    if loss is None:
        return None
    ref = case.golden["trajectory.loss"]
    off = [i for i, (a, b) in enumerate(zip(np.ravel(loss), ref)) if not _matches(float(a), float(b))]
    evidence = {"loss_port": [float(x) for x in loss], "loss_reference": [float(x) for x in ref]}
    if off:
        step = off[0] + 1
        return Diagnosis("trajectory_divergence", f"losses agree up to update {step - 1} and diverge from update {step}: "
                         "a difference that appears only after the first update (bias-correction step, schedule, state carried between steps)",
                         evidence | {"first_divergent_update": step})
    return Diagnosis("trajectory_divergence", "losses agree but the parameters drift apart over the updates", evidence)


def _checkpoint(result, out, case) -> Diagnosis | None:
    own = [t for t in result.tensors if "(resumed vs own" in t.name and not t.passed]
    if not own:
        return None
    k = case.settings.checkpoint_at
    resumed, straight = out.tensors.get("checkpoint.loss"), out.tensors.get("checkpoint.uninterrupted.loss")
    evidence = {"checkpoint_at": k}
    if resumed is not None and straight is not None:
        diff = [i + 1 for i, (a, b) in enumerate(zip(resumed, straight)) if a != b]
        evidence["first_different_update"] = diff[0] if diff else None
    return Diagnosis("resume_state_lost", f"the resumed run differs from the same backend's uninterrupted run after the checkpoint at update {k}: "
                     "optimizer state (m, v, step) or parameters not restored exactly", evidence)


class _IsolatedView:
    """A case seen by an end-to-end rule: the isolated check's goldens and truth under the end-to-end names."""

    def __init__(self, case, prefix: str):
        self._case, self._prefix = case, prefix
        self.golden = case.golden | {k.removeprefix("isolated."): v for k, v in case.golden.items() if k.startswith(prefix)}
        self.truth = case.truth | {k.replace("isolated.", "", 1): v for k, v in case.truth.items() if "isolated." + prefix.removeprefix("isolated.") in k}

    def __getattr__(self, name):
        return getattr(self._case, name)


def _isolated(rule, prefix: str):
    """Run an end-to-end stage's rule on an isolated check: the same causes, solved on the reference's inputs."""
    def run(result, out, case):
        from copy import copy

        renamed = copy(result)
        renamed.tensors = [copy(t) for t in result.tensors]
        for t in renamed.tensors:
            t.name = t.name.removeprefix("isolated.")
        view_out = type(out)({k.removeprefix("isolated."): v for k, v in out.tensors.items()}, out.meta, out.error)
        return rule(renamed, view_out, _IsolatedView(case, prefix))
    return run


RULES = {"weight_mapping": _weights, "forward": _forward, "shifted_slices": _shifted, "loss": _loss,
         "gradients": _gradients, "optimizer": _optimizer, "trajectory": _trajectory, "checkpoint": _checkpoint,
         "isolated_loss": _isolated(_loss, "isolated.loss."), "isolated_optimizer": _isolated(_optimizer, "isolated.optimizer.")}


def localise(result) -> Diagnosis:
    """No rule matched: say where and how large."""
    w = result.worst()
    if w is None:
        return Diagnosis("error", result.message or "the stage failed", {})
    if w.problem:
        return Diagnosis("unexplained", f"{w.name}: {w.problem}", {"tensor": w.name})
    layer = re.search(r"layers\.(\d+)\.", w.name)
    return Diagnosis("unexplained", f"no known cause matched; largest error in {w.name}"
                     + (f" (layer {layer.group(1)})" if layer else ""),
                     {"tensor": w.name, "max_abs": w.max_abs, "max_rel": w.max_rel, "where": w.where, "mismatched": w.mismatched, "of": w.total})


def diagnose(result, out, case) -> Diagnosis:
    if out.error:
        return Diagnosis("stage_error", out.error.splitlines()[0][:300], {"error": out.error[-2000:]})
    rule = RULES.get(result.name)
    found = rule(result, out, case) if rule else None
    return found or localise(result)
