"""forward (end to end): where the chain first diverges. Its causes are solved piece by piece, on the
reference's own inputs, in pieces.py; this rule only localises."""

from __future__ import annotations

from .core import Diagnosis


def forward(result, out, case) -> Diagnosis | None:
    order = sorted((k for k in case.golden if k.startswith("forward.hidden.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    order.append("forward.logits")
    judged = {t.name: t for t in result.tensors}
    first = next((judged[n] for n in order if n in judged and not judged[n].passed), None)
    if first is None:
        return None
    layer = first.name.rsplit(".", 1)[1] if "hidden" in first.name else "final norm / lm_head"
    return Diagnosis(
        "forward_divergence",
        f"the forward pass first diverges at {first.name} (layer {layer})",
        {"first_divergent": first.name, "max_abs": first.max_abs, "where": first.where, "mismatched": first.mismatched},
    )
