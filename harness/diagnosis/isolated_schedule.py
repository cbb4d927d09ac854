"""isolated_schedule: N updates with the same given gradients, solved for the conventions that only
show after the first update: the step the bias correction uses and the step the schedule is read at.

With a constant gradient g, Adam's moments are closed-form: m_k = g(1−β1^k), v_k = g²(1−β2^k), so where
|g| ≫ eps every convention's total update is sign(g)·Σ_k lr(k−1+offset)·f(k) with f the correction
factor the convention applies. The port's update over the reference's picks out the pair that produced
it; weight decay (lr·wd·θ per step, a small part) is not modelled, so matches are taken to 0.5 %.
"""

from __future__ import annotations

import numpy as np

from mlx_parity.reference.schedule import lr_at

from . import update_replay
from .core import Diagnosis, f64

CONVENTIONS = {
    "t": "bias correction at the update's own step t",
    "none": "no bias correction",
    "t=1": "bias correction computed for t = 1 at every update",
    "t+1": "bias correction for step t + 1 (the counter read after it grows)",
}


def _factor(bc: str, k: int, b1: float, b2: float) -> float:
    """How much of sign(g) the k-th update (k = 1..N) applies under a bias-correction convention."""
    raw = (1 - b1**k) / np.sqrt(1 - b2**k)  # m_k / sqrt(v_k) for |g| = 1
    step = {"t": k, "t=1": 1, "t+1": k + 1}.get(bc)
    return raw if step is None else raw * np.sqrt(1 - b2**step) / (1 - b1**step)


def _total(case, bc: str, offset: int) -> float:
    s, o = case.settings, case.settings.optimizer
    return sum(lr_at(o, s.schedule, k - 1 + offset) * _factor(bc, k, *o.betas) for k in range(1, s.steps + 1))


def schedule(result, out, case) -> Diagnosis | list[Diagnosis] | None:
    s, g, t = case.settings, case.golden, out.tensors
    names = [k.removeprefix("isolated.schedule.delta.") for k in g if k.startswith("isolated.schedule.delta.")]
    shared = [n for n in names if f"isolated.schedule.delta.{n}" in t and f"grad.{n}" in g]
    if not shared:
        return None
    if not any(np.any(t[f"isolated.schedule.delta.{n}"]) for n in shared):
        if not any(np.any(g[f"isolated.schedule.delta.{n}"]) for n in shared):
            return None
        # Nothing moved where the reference moved: named here too, since the one-update check cannot see it
        # when the first update is zero by design (a warmup from a learning rate of 0).
        step = int(np.asarray(t.get("isolated.schedule.step", 0)))
        if step > 0:
            return Diagnosis(
                "optimizer_not_connected",
                f"the optimizer counted {step} updates but no parameter changed: its result never reaches the model",
                {"step": step, "reference_steps": s.steps},
            )
        return Diagnosis(
            "no_update",
            "no parameter changed and the optimizer never stepped: the updates returned without updating",
            {"step": step, "reference_steps": s.steps},
        )
    port = {n: t[f"isolated.schedule.delta.{n}"] for n in shared}
    moments = {k: v for k, v in t.items() if k.startswith(("isolated.optimizer.m.", "isolated.optimizer.v."))}
    return _closed_form(case, port) or update_replay.explain(case, port, moments) or None


def _closed_form(case, port) -> list[Diagnosis]:
    """The bias-correction step and schedule offset from the ratio of the total updates, where |g| ≫ eps."""
    s, o, g = case.settings, case.settings.optimizer, case.golden
    shared = list(port)
    grads = update_replay.clipped({n: f64(g[f"grad.{n}"]) for n in shared}, s.clip_norm)  # the same every update
    # where Adam's update is sign(g) whatever eps and wherever it enters (after the square root, or under it)
    floor = max(1e4 * o.eps, 1e2 * np.sqrt(o.eps))
    if sum(int((np.abs(x) > floor).sum()) for x in grads.values()) < 20:
        floor = 1e4 * o.eps
    actual, ref = [], []
    for n in shared:
        big = np.abs(grads[n]) > floor
        a, e = f64(port[n]), f64(g[f"isolated.schedule.delta.{n}"])
        if a.shape == e.shape:
            keep = big & (np.abs(e) > 0)
            actual.append(a[keep])
            ref.append(e[keep])
    if not actual or not np.concatenate(actual).size:
        return []
    r = float(np.median(np.concatenate(actual) / np.concatenate(ref)))
    own = ("t" if o.bias_correction else "none", 0)
    base = _total(case, *own)
    fits = sorted((abs(_total(case, bc, off) / base - r), bc, off) for bc in CONVENTIONS for off in (0, 1))
    # an offset that changes no learning rate (a constant schedule) is no claim: read as the reference's
    unseen = all(lr_at(o, s.schedule, k) == lr_at(o, s.schedule, k + 1) for k in range(s.steps))
    # those within 0.5 % of the port's ratio, and within 0.1 % of the best: closer conventions are one update
    close_enough = min(0.005, fits[0][0] / abs(r) + 0.001) * abs(r) if r else 0.0
    matching = list(dict.fromkeys((bc, 0 if unseen else off) for err, bc, off in fits if err <= close_enough))
    if not matching or own in matching or len({off for _, off in matching}) > 1:
        return []  # none, the reference's own, or schedule offsets the totals cannot tell apart
    bc, off = matching[0]
    evidence = {
        "update_ratio": round(r, 5),
        "steps": s.steps,
        "implied_bias_correction": [CONVENTIONS[b] for b, _ in matching],
        "implied_schedule_offset": off,
    }
    found = []
    if bc != own[0]:
        # Conventions with the same totals (no correction and one frozen at t = 1 where (1−β1) = √(1−β2)) are
        # the same update: only that the bias correction differs is said, not which step it uses.
        same = len(matching) > 1 or {bc, own[0]} == {"t", "none"}
        code = "bias_correction" if same else "bias_correction_step"
        found.append(
            Diagnosis(
                code,
                f"over {s.steps} updates of the same gradient the port's update is {r:.4g}× the reference's: "
                f"{' or '.join(CONVENTIONS[b] for b, _ in matching)}, where the reference has {CONVENTIONS[own[0]]}",
                evidence,
            )
        )
    if off:
        found.append(
            Diagnosis(
                "schedule_off_by_one",
                f"over {s.steps} updates the learning rates summed are those of steps 1..{s.steps}, "
                f"not 0..{s.steps - 1}: the schedule is read one step late",
                evidence,
            )
        )
    return found
