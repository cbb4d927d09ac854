"""Why a stage fails: one module per stage, named after it, each rule solving the convention a port got
wrong from its own numbers (never by re-running a known mutation), every code in `codes.CODES`. Each stage
names its rule in the stage registry (harness/stages/); this package never imports the stages.

A rule returns a Diagnosis, a list of them (the isolated forward check can find several independent
causes at once), or None; a failure no rule explains still gets a localisation (`localise`).
"""

from __future__ import annotations

import re

from .codes import CODES
from .core import Diagnosis

__all__ = ["CODES", "Diagnosis", "diagnose", "localise"]


def localise(result) -> Diagnosis:
    """No rule matched: say where and how large."""
    w = result.worst()
    if w is None:
        return Diagnosis("error", result.message or "the stage failed", {})
    if w.problem:
        return Diagnosis("unexplained", f"{w.name}: {w.problem}", {"tensor": w.name})
    layer = re.search(r"layers?\.(\d+)\.", w.name)
    return Diagnosis(
        "unexplained",
        f"no known cause matched; largest error in {w.name}" + (f" (layer {layer.group(1)})" if layer else ""),
        {
            "tensor": w.name,
            "max_abs": w.max_abs,
            "max_rel": w.max_rel,
            "where": w.where,
            "mismatched": w.mismatched,
            "of": w.total,
        },
    )


def diagnose(result, out, case, rule) -> list[Diagnosis]:
    """Every distinct cause this stage's failure shows (at least one: a localisation); `rule` is the stage's."""
    if out.error:
        return [Diagnosis("stage_error", out.error.splitlines()[0][:300], {"error": out.error[-2000:]})]
    if out.unsupported:  # the port's own word that it does not do this: no rule reads outputs it never gave
        return [Diagnosis("error", result.message, {})]
    found = rule(result, out, case) if rule else None
    found = [d for d in (found if isinstance(found, list) else [found]) if d is not None]
    return found or [localise(result)]
