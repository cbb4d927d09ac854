"""The float64 truth a verdict rests on: the torch twin run in float64 on a case's inputs.

For every float tensor of the goldens it stores the truth as its offset from the golden,
`offset.<name>` = truth - golden in float32 (the offset is the reference's own rounding error, so
float32 keeps it to 7 digits at half the size of float64 truth). For the optimizer and
trajectory outputs it also stores `sens.<name>`: how far the float64 update moves when every gradient
moves by the gradient stage's own bound (run once with +bound, once with -bound, the larger change
kept). That is the conditioning of each element: an Adam update whose gradient is at noise level (or
analytically zero) moves by up to lr, one with a large gradient hardly at all. A port whose gradients
pass may therefore differ there by that much, and no more (harness/tolerances.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .stages import PREFIX, READ_ONLY, StageOutput
from .tolerances import stage_rms, tolerance

TRUTH_FILE = "truth.safetensors"
TRUTH_STAGES = (
    "forward",
    "loss",
    "gradients",
    "optimizer",
    "trajectory",
    "isolated_forward",
    "isolated_loss",
    "isolated_optimizer",
    "isolated_schedule",
)
SENSITIVE_STAGES = ("optimizer", "trajectory", "isolated_optimizer", "isolated_schedule")
MULTI_UPDATE_STAGES = ("trajectory",)  # several updates, each from gradients the backend computed itself
RANDOM_DRAWS = 2  # random-sign gradient errors the trajectory is run with (each also negated)
JUDGED_PREFIXES = ("forward.", "loss.", "grad.", "optimizer.", "trajectory.", "isolated.")


def needs_truth(name: str, golden: np.ndarray) -> bool:
    """Computed float tensors are judged against the truth; integers and the shifted slices are exact."""
    return name.startswith(JUDGED_PREFIXES) and np.issubdtype(golden.dtype, np.floating)


def _floats(outputs: dict[str, StageOutput], golden: dict) -> dict[str, np.ndarray]:
    return {
        k: np.asarray(v, np.float64)
        for o in outputs.values()
        for k, v in o.tensors.items()
        if k in golden and needs_truth(k, golden[k])
    }


def _run(backend, case, stages) -> dict[str, StageOutput]:
    outputs = backend.run(case, stages)
    errors = {s: o.error for s, o in outputs.items() if o.error}
    if errors:
        raise RuntimeError(f"{case.name}: the float64 twin failed: {errors}")
    return outputs


def gradient_bounds(case, golden: dict, truth: dict) -> dict[str, np.ndarray]:
    """The gradient stage's bound per element, by parameter name: the gradient error a port may make.
    Structural zeros (exactly 0 in the reference and the truth: an embedding row no token of the batch
    uses) are exact in every port, so they are not perturbed."""
    tol = tolerance("gradients", case.settings.precision)
    names = [k for k in golden if k.startswith("grad.")]
    rms = stage_rms((golden[k], truth[k], None) for k in names)
    return {
        k.removeprefix("grad."): np.where(
            (golden[k] == 0) & (truth[k] == 0), 0.0, tol.bound(golden[k], truth[k], None, rms)
        )
        for k in names
    }


def sensitivities(case, golden: dict, truth: dict, bounds: dict[str, np.ndarray], stages) -> dict[str, np.ndarray]:
    """How far each update output of `stages` moves when every gradient moves by `bounds`: the float64 twin run
    with +bounds and with -bounds added to every update's gradient, the largest change kept. Runs of several
    updates from the backend's own gradients (the trajectory) are also run with errors that change from one
    update to the next, as a port's do: the sign alternating between updates, and a random sign per element
    and update (seeded, and its negative). An element whose gradients keep one size and sign moves only then
    (Adam's m/sqrt(v) is ±1 whatever offset they share), and at scale the first update of every element
    whose gradient sits at noise level may flip, which changes every later gradient (SmolLM2-135M with LoRA on
    all 30 layers: MLX on OpenBLAS ran 1 % from the truth in its second update's gradients, with 4.5e-7 in the
    first, and failed its own reference-BLAS goldens' trajectory under the common offsets alone)."""
    import torch

    from .backends.torch_backend import TorchBackend

    minus = _scaled(bounds, -1.0)
    runs = [([bounds], stages), ([minus], stages)]
    several = [s for s in stages if s in MULTI_UPDATE_STAGES]
    if several and case.settings.steps > 1:
        n = case.settings.steps
        rng = np.random.default_rng([int(case.info.get("seed", 0)), 7])
        runs += [([bounds, minus], several), ([minus, bounds], several)]
        for _ in range(RANDOM_DRAWS):
            random = [
                {k: np.where(rng.random(bounds[k].shape) < 0.5, -bounds[k], bounds[k]) for k in sorted(bounds)}
                for _ in range(n)
            ]
            runs += [(random, several), ([_scaled(r, -1.0) for r in random], several)]
    sens: dict[str, np.ndarray] = {}
    for offsets, run_stages in runs:
        for k, v in _floats(_run(TorchBackend(torch.float64, offsets), case, run_stages), golden).items():
            if k in truth:
                sens[k] = np.maximum(sens.get(k, 0.0), np.abs(v - truth[k]))
    return sens


def _scaled(offset: dict[str, np.ndarray], factor: float) -> dict[str, np.ndarray]:
    return {k: factor * v for k, v in offset.items()}


def build_truth(case, golden: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`offset.*` and `sens.*` tensors for a case whose goldens the MLX reference has just produced."""
    import torch

    from .backends.torch_backend import TorchBackend

    # Stage by stage (the read-only ones share a load, as in one run), each output kept as its float32 offset and
    # in float64 only where the bounds and sensitivities need it: a real model's forward pieces in float64 are
    # otherwise held twice over.
    groups = [[s for s in TRUTH_STAGES if s in READ_ONLY]] + [[s] for s in TRUTH_STAGES if s not in READ_ONLY]
    offsets, truth = {}, {}
    for group in groups:
        for k, v in _floats(_run(TorchBackend(torch.float64), case, group), golden).items():
            offsets[f"offset.{k}"] = (v - golden[k].astype(np.float64)).astype(np.float32)
            if k.startswith(("grad.", *(PREFIX[s] for s in SENSITIVE_STAGES))):
                truth[k] = v
    missing = sorted(k for k, v in golden.items() if needs_truth(k, v) and f"offset.{k}" not in offsets)
    if missing:
        raise RuntimeError(f"{case.name}: the float64 twin produced no {missing[0]}")
    sens = sensitivities(case, golden, truth, gradient_bounds(case, golden, truth), SENSITIVE_STAGES)
    if case.settings.precision == "bfloat16":
        _flippable_trajectories(sens, truth, case.settings.steps)
    return offsets | {f"sens.{k}": v.astype(np.float32) for k, v in sens.items()}


def _flippable_trajectories(sens: dict[str, np.ndarray], truth: dict[str, np.ndarray], steps: int) -> None:
    """bfloat16 training: an element whose first update the gradient's bound can cancel or flip (its optimizer
    sensitivity reaches the update's own size) follows its gradient's noise at every later update too, and a
    flipped update changes the next gradients, which no fixed perturbation of the truth reproduces (on
    SmolLM2's first 4 layers, full training at lr 1e-3, the correct torch twin ended two flips away from the
    truth where the ±bound runs reached one). Such an element may end anywhere in its whole range: 2·N times
    its first update."""
    for k in [k for k in sens if k.startswith("trajectory.delta.")]:
        first = "optimizer.delta." + k.removeprefix("trajectory.delta.")
        if first in truth and first in sens:
            u = np.abs(truth[first])
            sens[k] = np.where(sens[first] >= u, np.maximum(sens[k], 2 * steps * u), sens[k])


class Truth(Mapping):
    """`truth.<name>` (float64, golden + offset, made when read and not kept: a real model's truth would
    double the goldens' memory in float64) and `sens.<name>`, from a stored truth file."""

    def __init__(self, stored: dict[str, np.ndarray], golden: dict[str, np.ndarray]):
        self._offset = {
            f"truth.{k.removeprefix('offset.')}": v
            for k, v in stored.items()
            if k.startswith("offset.") and k.removeprefix("offset.") in golden
        }
        self._sens = {k: v for k, v in stored.items() if k.startswith("sens.")}
        self._golden = golden

    def __getitem__(self, key: str) -> np.ndarray:
        if key in self._sens:
            return self._sens[key]
        return self._golden[key.removeprefix("truth.")].astype(np.float64) + self._offset[key]

    def __iter__(self):
        return iter([*self._offset, *self._sens])

    def __len__(self) -> int:
        return len(self._offset) + len(self._sens)

    def __or__(self, other: Mapping) -> dict:
        return dict(self) | dict(other)
