"""The port's forward run again on probe batches, when its failing forward has no cause the weights explain:
inputs built so that the port's own outputs show whether it is causal, keeps batch rows apart and sees token
order (harness/diagnosis/forward_probes.py judges them). Any backend answers the forward stage on any batch,
so this needs neither the port's weights nor its isolated requests."""

from __future__ import annotations

from .diagnosis import Diagnosis
from .diagnosis.forward_probes import findings, probe_batches, random_call


class ProbeCase:
    """`case` with another batch: what a backend computes a probe on (its checkpoint, settings and adapters)."""

    def __init__(self, case, batch: dict):
        self._case, self.batch = case, batch

    def __getattr__(self, name):
        return getattr(self._case, name)


def probe_forward(backend, case) -> list[Diagnosis]:
    """Causes the port's own forward shows on the probe batches; [] when it says nothing clear."""
    batches = probe_batches(case)
    if batches is None:
        return []
    outs = {}
    for name, batch in batches.items():
        out = backend.run(ProbeCase(case, batch), ["forward"]).get("forward")
        if out is None or out.error or out.unsupported or "forward.logits" not in out.tensors:
            return []  # no usable forward on a probe batch: nothing is concluded
        outs[name] = out
        if name == "same" and random_call(outs) is not None:
            return []  # identical rows of one call differ: the call itself is random
    return findings(outs)
