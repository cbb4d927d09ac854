"""gradients: absent, zero, or over a different trainable set."""

from __future__ import annotations

import numpy as np

from .core import Diagnosis

def gradients(result, out, case) -> Diagnosis | None:
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
