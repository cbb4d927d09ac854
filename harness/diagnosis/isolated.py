"""End-to-end rules applied to isolated checks: the same causes, solved on the reference's inputs."""

from __future__ import annotations

from copy import copy


class _IsolatedView:
    """A case seen by an end-to-end rule: the isolated check's goldens and truth under the end-to-end names."""

    def __init__(self, case, prefix: str):
        self._case, self._prefix = case, prefix
        self.golden = case.golden | {
            k.removeprefix("isolated."): v for k, v in case.golden.items() if k.startswith(prefix)
        }
        self.truth = case.truth | {
            k.replace("isolated.", "", 1): v
            for k, v in case.truth.items()
            if "isolated." + prefix.removeprefix("isolated.") in k
        }

    def __getattr__(self, name):
        return getattr(self._case, name)


# Optimizer causes read from ratios of the update or from its structure: a weight that did not load moves
# them only through the weight-decay term (lr·wd·θ, a small part of an Adam step), so they stand on their own.
WEIGHT_FREE = {
    "no_update",
    "optimizer_not_connected",
    "trainable_set_mismatch",
    "accumulation_scaling",
    "clipping_missing",
    "clipping_per_tensor",
    "gradient_scale",
    "bias_correction",
    "bias_correction_step",
    "schedule_off_by_one",
    "learning_rate",
    "labels_not_shifted",
    "padding_counted",
    "distrust_alpha",
    "distrust_lambda",
    "distrust_term",
}


def isolated(rule, prefix: str):
    """Run an end-to-end stage's rule on an isolated check: the same causes, solved on the reference's inputs.
    Each cause says what it reads: nothing of the port's weights, or all of them ("")."""

    def run(result, out, case):
        renamed = copy(result)
        renamed.tensors = [copy(t) for t in result.tensors]
        for t in renamed.tensors:
            t.name = t.name.removeprefix("isolated.")
        view_out = type(out)({k.removeprefix("isolated."): v for k, v in out.tensors.items()}, out.meta, out.error)
        found = rule(renamed, view_out, _IsolatedView(case, prefix))
        for d in found if isinstance(found, list) else [found] if found else []:
            d.parameters = [] if d.code in WEIGHT_FREE else [""]
            if (
                d.code == "trainable_set_mismatch"
            ):  # follows from the loading when the odd tensors are ones that did not load
                d.parameters = list(d.evidence.get("absent", [])) + list(d.evidence.get("extra", []))
        return found

    return run
