"""forward (end to end): where the chain first diverges, and the conventions under which the port's own
layer there reproduces its output (port_layer.py: from the port's input and weights, no isolated request
needed). The isolated forward check proves a piece on the reference's inputs; this explains a port without it."""

from __future__ import annotations

from .core import Diagnosis
from .port_layer import explain_layer


def forward(result, out, case) -> Diagnosis | list[Diagnosis] | None:
    order = sorted((k for k in case.golden if k.startswith("forward.hidden.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    order.append("forward.logits")
    judged = {t.name: t for t in result.tensors}
    first = next((judged[n] for n in order if n in judged and not judged[n].passed), None)
    if first is None:
        return None
    layer = first.name.rsplit(".", 1)[1] if "hidden" in first.name else "final norm / lm_head"
    where = Diagnosis(
        "forward_divergence",
        f"the forward pass first diverges at {first.name} (layer {layer})",
        {"first_divergent": first.name, "max_abs": first.max_abs, "where": first.where, "mismatched": first.mismatched},
    )
    causes = explain_layer(out, case, int(layer)) if layer.isdigit() else None
    return causes or where
