"""gradients: absent, zero, over a different trainable set, or the right values in the wrong place."""

from __future__ import annotations

import numpy as np

from .core import Diagnosis, f64


def gradients(result, out, case) -> Diagnosis | None:
    exp = {k for k in case.golden if k.startswith("grad.")}
    act = {k for k, v in out.tensors.items() if k.startswith("grad.")}
    if not act:
        return Diagnosis(
            "no_gradients",
            "no gradients at all: a forward-only step (or a loss returned without gradients)",
            {"expected_tensors": len(exp)},
        )
    if all(not np.any(out.tensors[k]) for k in act):
        return Diagnosis(
            "zero_gradients",
            "every gradient is exactly zero: no backward pass ran (forward only), or the loss is not connected to the parameters",
            {"tensors": len(act)},
        )
    if act != exp:
        missing, extra = sorted(exp - act), sorted(act - exp)
        return Diagnosis(
            "trainable_set_mismatch",
            f"the port trains a different set: {len(missing)} reference tensors absent, {len(extra)} extra",
            {
                "absent": [m.removeprefix("grad.") for m in missing[:8]],
                "extra": [e.removeprefix("grad.") for e in extra[:8]],
            },
        )
    return _misplaced(result, out, case)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(
        np.abs(a - b).max(initial=0.0) <= 1e-4 * max(float(np.abs(b).max(initial=0.0)), 1e-30)
    )


def _misplaced(result, out, case) -> Diagnosis | None:
    """Failing gradients whose values are right but sit elsewhere: transposed, reordered, or another key's."""
    failing = [t.name for t in result.failures if t.name in case.golden]
    transposed, reordered, swapped = [], [], {}
    golden = {k: f64(v) for k, v in case.golden.items() if k.startswith("grad.")}
    for name in failing:
        a, e = f64(out.tensors[name]), golden[name]
        if e.ndim == 2 and a.size == e.size and _same(a.reshape(e.T.shape), e.T):
            transposed.append(name.removeprefix("grad."))
        elif a.size == e.size and _same(np.sort(a.ravel()), np.sort(e.ravel())):
            reordered.append(name.removeprefix("grad."))
        else:
            other = next((k for k, v in golden.items() if k != name and v.shape == a.shape and _same(a, v)), None)
            if other:
                swapped[name.removeprefix("grad.")] = other.removeprefix("grad.")
    if transposed:
        return Diagnosis(
            "gradient_layout",
            f"{', '.join(transposed[:4])}: the gradient is the reference's transposed ([in, out] for a weight stored [out, in], or its buffer reshaped)",
            {"transposed": transposed},
        )
    if reordered:
        return Diagnosis(
            "gradient_layout",
            f"{', '.join(reordered[:4])}: the reference's gradient values in another order (a reshape where a transpose belongs, or axes permuted)",
            {"reordered": reordered},
        )
    if swapped:
        return Diagnosis("gradient_names", "gradients reported under another parameter's name", {"holds": swapped})
    return None
