"""Every tolerance of the harness, per dtype and stage, with the noise it covers and the bug it catches.

Every bound kind and the inputs of each tensor's bound (`truth_bound_inputs`) are kept here and nowhere else:

* `Exact`: weights after loading, the shifted targets and mask, the step counter and a resumed run
  against the same backend's uninterrupted one. Copies and integer data: any changed bit is a bug.
* `TruthBound`: every computed float tensor is judged against a float64 truth (the torch twin run in
  float64 on the same inputs, `harness/truth.py`), the way `torch._dynamo.utils.same(fp64_ref=...)`
  judges compiled code. The reference's own float32 error against that truth measures what honest
  float32 arithmetic costs *on this model at this element*; a port may err by a stated multiple of it:

      e_i     = max(|R_i - T_i| - sensitivity_i, 0)   (the error its conditioning does not explain)
      noise_i = max(|R_i - T_i|, spread_i, pooled, pooled / rms(T) * |T_i|[, rms over the stage])
      bound_i = multiple * noise_i + sensitivity_i + floor_ulps * ulp32 * max(max|T|, |theta_i|)

  R the reference's golden, T the truth, pooled = max(rms(e), rms(spread) / SPREAD_PER_SAMPLE) over the
  tensor (one sample's rms of the noise: below), spread_i the largest error
  beyond the sensitivity of the reference re-run on inputs moved by an ulp and of the float64 twin run with
  drawn float32 rounding errors in every operation (`spread.*`, measured when the fixture was built:
  harness/fixtures/spread.py, random_rounding.py), so an element where the golden's one sample of the noise
  happened to land near the truth, or where another summation order errs more than the reference's BLAS, is
  still bounded by the noise measured there. The spread's part of `pooled` is one sample's rms of that noise
  over the tensor: an element's spread is the largest of only 8 samples, which all land far below its noise
  often enough that some of a million elements do, and the pool cannot. The bound grows with
  depth, width and activation outliers by itself. `sensitivity_i` covers ill-conditioned elements (an
  Adam update where |g| is at noise level, an analytically zero gradient): it is how far the truth's
  update moves when the gradient moves by the gradient stage's own bound, measured in float64 by the
  truth builder, so such elements are judged by their own conditioning and no outlier quota exists.
  theta_i, for a parameter change (Δθ = θ_after - θ_before), is the larger of |θ_before| and |θ_after| times the number of
  updates: a float32 Δθ is a difference of rounded parameters, each update rounding θ again, so its
  precision is that of θ, whatever the size of Δθ; Δθ's floor also counts the update's own roundings in θ's
  dtype, gamma(UPDATE_ROUNDINGS) * |T_i| (negligible in float32, 6.6 % of the update in bfloat16).

On a GPU (harness/device.py measures the mode in effect; docs/gpu.md says why, with the measured margins):

* `PrecisionBound`: TF32 rounds each matmul operand to 10 mantissa bits (unit roundoff 2^-11 instead of
  float32's 2^-24). With `--tf32` every computed float32 stage's bound is the stored float32 bound's noise and
  ulp floor (`TruthBound`) multiplied by the ratio of the unit roundoffs, 2^13, plus each element's
  sensitivity, which `precision_case` (harness/fixtures/truth.py) re-measures, when the case is prepared, for the optimizer and trajectory updates at
  TF32-sized gradient errors (they flip Adam updates whose gradient is near zero); every stage's
  tolerance says so. Exact stages (weights, shifted slices, the step counter) stay exact. A bfloat16
  stage keeps its bfloat16 bound (`precision_factor`: TF32 rounds less than bfloat16 storage).
* `RunToRunBound`: GPU reductions are not bit-deterministic, so a resumed run cannot be held to bit
  identity with the uninterrupted one. On a nondeterministic device the checkpoint stage runs the
  uninterrupted trajectory twice; the resumed run must stay within `RUN_TO_RUN_MULTIPLE` × the larger
  of that spread, the stage's relative spread × the tensor's scale and 8 ulp of that scale, plus each
  element's update sensitivity (a repeat can happen to be bit-identical while the resume is not).
  On the CPU, and for backends the harness does not run itself, the resume stays bit-exact. A resume
  that loses AdamW's moments or step moves well-conditioned parameters by about the learning rate,
  orders of magnitude past that bound.

Noise: the largest margin (error / bound) measured for correct backends (torch twin in float32, MLX
under OpenBLAS, mlx-rs) over the bundled fixtures (`parity calibrate`) and over seeded random
configurations of a real checkpoint (`parity calibrate --checkpoint DIR`; docs/tolerances.md).
Smallest bug: the smallest injected change `tests/test_tolerances.py` shows the bound still fails.
False alarms: how likely a correct port is to fail a stage by chance, from the golden held out against the spread
(`TruthBound.bound_and_ratios`), is estimated in harness/false_alarm.py and stated by every audit.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from mlx_parity.reference.precision import parameter_dtype

from . import pieces
from .device import DeviceError
from .false_alarm import SPREAD_SAMPLES, heldout_ratios

ULP32 = 2.0**-24  # unit roundoff of float32
UNIT_ROUNDOFF = {"float32": ULP32, "bfloat16": 2.0**-8}
# Unit roundoff of a float32 matmul's operands in each matmul precision mode.
MATMUL_ROUNDOFF = {"float32": ULP32, "tf32": 2.0**-11}
RUN_TO_RUN_MULTIPLE = 8.0
# Roundings on the path from a gradient to an AdamW update in the parameter's dtype, as the contract writes it
# (docs/training-step.md), each at most one unit roundoff of the update to first order: the clip scale's product
# (1); m: two constants, two products, the sum (5); v: the square, two constants, two products, the sum (6),
# halved by the square root (3); the square root, 1/sqrt(1 - b2^t), their product, + eps (4); lr, lr/(1 - b1^t),
# its product with m, the division (4). A correct port computes the same update with its own roundings, so
# Δθ may be off by gamma(UPDATE_ROUNDINGS) = k·u/(1 - k·u) of itself: 6.6 % in bfloat16, 1e-6 in float32.
UPDATE_ROUNDINGS = 17


def rms_of_largest(k: int) -> float:
    """sqrt(E[M^2]) for M the largest |Z| of k standard normal samples (1.86 for 8): how much larger than one
    sample of a noise the largest of k samples of it runs, in rms."""
    x = np.linspace(0.0, 12.0, 12001)
    below = np.vectorize(math.erf)(x / math.sqrt(2.0)) ** k  # P(M <= x)
    return math.sqrt(float(np.trapezoid(2.0 * x * (1.0 - below), x)))


# The spread of an element is the largest of SPREAD_SAMPLES samples of its noise; pooled over a tensor and divided
# by this, it is the rms of one sample, comparable with the golden's own error.
SPREAD_PER_SAMPLE = rms_of_largest(SPREAD_SAMPLES)


def rounding_gamma(k: int, unit_roundoff: float) -> float:
    """Higham's gamma_k: the largest relative error of k roundings in a row at unit roundoff u."""
    return k * unit_roundoff / (1.0 - k * unit_roundoff)


@dataclass(frozen=True)
class Exact:
    noise: str = "none: copies and integer data"
    catches: str = "any change of any bit"

    def describe(self) -> str:
        return "exact"

    def bound(self, reference, *unused, **named) -> np.ndarray:
        """Zero everywhere, whatever the truth and noise (TruthBound.bound's other arguments)."""
        return np.zeros(np.shape(reference))


@dataclass(frozen=True)
class TruthBound:
    multiple: float  # how many times the reference's own float32 error a port may make
    floor_ulps: float  # float32 ulps of the tensor's largest truth value, always allowed
    stage_floor: bool = False  # also allow the reference's rms error over the whole stage
    # Δθ of a bfloat16 parameter: per update, one bfloat16 spacing of θ (2 unit roundoffs), the neighbouring
    # value a correct port rounds θ + Δ to where the reference's θ + Δ sits near a rounding boundary
    bf16_param_ulps: float = 2.0
    dtype: str = "float32"  # the training precision whose reference error the bound is a multiple of
    noise: str = ""  # measured noise it covers
    catches: str = ""  # smallest real bug it still fails

    def describe(self) -> str:
        return f"{self.multiple:g}× the reference's {self.dtype} error vs the float64 truth + {self.floor_ulps:g} ulp"

    def parts(self, reference, truth, sensitivity, stage_rms, param, param_dtype, spread):
        """(the reference's own error, the sensitivity, the noise without that error, the floor) per element:
        the bound is `multiple × max(error, noise) + sensitivity + floor`."""
        r, t = np.asarray(reference, np.float64), np.asarray(truth, np.float64)
        sens = np.zeros(t.shape) if sensitivity is None else np.asarray(sensitivity, np.float64)
        err = np.abs(r - t)
        # The tensor's floors come from the error beyond what each element's conditioning explains:
        # ill-conditioned elements are covered by their sensitivity and must not raise the others' bound.
        residual = np.maximum(err - sens, 0.0)
        # One sample's rms of the noise over the tensor: the golden's, and where the noise was measured again (re-runs
        # and random-rounding draws: fixtures/spread.py), the spread's. An element's spread is the largest of a few
        # samples, which can all land far below its noise (the ratio of two samples of one noise is heavy-tailed);
        # pooled over the tensor it cannot, so it floors every element, in absolute and in relative terms.
        pooled = float(np.sqrt(np.mean(residual**2)))
        if spread is not None:
            spread = np.asarray(spread, np.float64)
            pooled = max(pooled, float(np.sqrt(np.mean(spread**2))) / SPREAD_PER_SAMPLE)
        rms_t = float(np.sqrt(np.mean(t**2)))
        rel = pooled / rms_t if rms_t > 0 else 0.0
        others = np.maximum(pooled, rel * np.abs(t))
        if spread is not None:
            others = np.maximum(others, spread)
        if self.stage_floor:
            others = np.maximum(others, stage_rms)
        floor = self.floor_ulps * ULP32 * float(np.abs(t).max())
        if param is not None:  # Δθ: θ's own rounding and the update's, in θ's dtype
            theta = np.abs(np.asarray(param, np.float64))
            u = UNIT_ROUNDOFF[param_dtype]
            ulps = self.floor_ulps if param_dtype == "float32" else self.bf16_param_ulps
            floor = np.maximum(floor, ulps * u * theta + rounding_gamma(UPDATE_ROUNDINGS, u) * np.abs(t))
        return err, sens, others, floor

    def bound(
        self,
        reference,
        truth,
        sensitivity=None,
        stage_rms: float = 0.0,
        param=None,
        param_dtype="float32",
        spread=None,
    ) -> np.ndarray:
        return self.bound_and_ratios(reference, truth, sensitivity, stage_rms, param, param_dtype, spread)[0]

    def bound_and_ratios(
        self,
        reference,
        truth,
        sensitivity=None,
        stage_rms=0.0,
        param=None,
        param_dtype="float32",
        spread=None,
        actual=None,
    ):
        """(the bound, the golden held out as one more sample of the noise: harness/false_alarm.py's x, and the
        same ratio of `actual`'s error, None without it), per element, from one computation of their parts."""
        if np.size(truth) == 0:
            zero = np.zeros(np.shape(truth))
            return zero, zero, None if actual is None else zero
        err, sens, others, floor = self.parts(reference, truth, sensitivity, stage_rms, param, param_dtype, spread)
        bound = self.multiple * np.maximum(err, others) + sens + floor
        own = None
        if actual is not None:
            own_err = np.abs(np.asarray(actual, np.float64) - np.asarray(truth, np.float64))
            own = heldout_ratios(own_err - sens - floor, others)
        return bound, heldout_ratios(err - sens - floor, others), own


def stage_rms(pairs) -> float:
    """The reference's rms error against the truth over every element of a stage: `pairs` of
    (reference, truth, mask or None[, sensitivity or None]), the mask selecting the judged elements; with a
    sensitivity, the error beyond it (what the element's conditioning does not explain, as in `bound`)."""
    sq, n = 0.0, 0
    for reference, truth, mask, *sens in pairs:
        err = np.abs(np.asarray(reference, np.float64) - np.asarray(truth, np.float64))
        if sens and sens[0] is not None:
            err = np.maximum(err - np.asarray(sens[0], np.float64), 0.0)
        if mask is not None:
            err = err[np.broadcast_to(np.asarray(mask, bool), err.shape)]
        sq, n = sq + float((err**2).sum()), n + err.size
    return float(np.sqrt(sq / n)) if n else 0.0


def truth_bound_inputs(golden, truth, prefix: str, names, precision: str, steps: int, initial_weights, mask_for):
    """The inputs of each tensor's truth bound beyond its golden, `prefix + name` for `name` in `names` (those
    judged against the truth): {name: keyword arguments of `compare` / `TruthBound.bound`}.

    The stage's floor: the reference's rms error over the stage, and for the forward's pieces per kind
    (every layer's `output`, every layer's `q` is one computation, and a whole layer rounds far more than one
    softmax: each kind's noise is at least its own rms over the layers). In bfloat16 the other stages' floor
    is taken per role (every Δθ, every m, the losses): one bfloat16 loss error would otherwise floor every
    float32 adapter's update. A parameter change Δθ also gets θ (the larger of before and after, times the
    updates it spans: each update rounds θ again) and θ's dtype."""
    judged = [k for k in names if f"truth.{prefix}{k}" in truth]
    rms = stage_rms((golden[prefix + k], truth[f"truth.{prefix}{k}"], mask_for(prefix + k)) for k in judged)
    by_role = prefix != pieces.PREFIX and precision != "float32"
    kind = pieces.piece_of if prefix == pieces.PREFIX else (lambda k: k.split(".", 1)[0]) if by_role else (lambda k: "")
    kind_rms = {
        g: max(
            0.0 if by_role else rms,
            stage_rms(
                (
                    golden[prefix + k],
                    truth[f"truth.{prefix}{k}"],
                    mask_for(prefix + k),
                    truth.get(f"sens.{prefix}{k}"),
                )
                for k in judged
                if kind(k) == g
            ),
        )
        for g in {kind(k) for k in judged}
    }
    params = initial_weights if truth and any(".delta." in prefix + k for k in names) else {}
    # Δθ over N updates carries the rounding of θ at every update (decay, then the step)
    updates = steps if prefix.startswith(("trajectory.", "isolated.schedule.")) else 1
    inputs = {}
    for k in names:
        full = prefix + k
        if f"truth.{full}" not in truth:
            continue
        t = truth[f"truth.{full}"]
        pname = full.split(".delta.", 1)[-1]
        theta = params.get("weights." + pname) if ".delta." in full else None
        if theta is not None:  # θ before and after: the larger sets the precision Δθ can have
            theta = updates * np.maximum(np.abs(theta), np.abs(theta + t))
        inputs[k] = {
            "truth": t,
            "sensitivity": truth.get(f"sens.{full}"),
            "spread": truth.get(f"spread.{full}"),
            "stage_rms": kind_rms.get(kind(k), rms),
            "param": theta,
            "param_dtype": parameter_dtype(pname, precision),
        }
    return inputs


Tolerance = Exact | TruthBound
EXACT = Exact()

# (dtype, stage) -> tolerance: the training precision (settings' `precision`) and the stage.
TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("float32", "weight_mapping"): EXACT,
    ("float32", "shifted_slices"): EXACT,
    ("float32", "forward"): TruthBound(
        multiple=4.0,
        floor_ulps=8.0,
        stage_floor=True,
        noise="torch twin 0.46, transformers 0.46, MLX (OpenBLAS) and mlx-rs 0.37 of the bound over 10 fixtures; SmolLM2-135M: torch 0.46, transformers 0.35",
        catches="logits scaled by 1 + 2e-6; RMSNorm eps 1e-6 where the config says 1e-5; GQA heads tiled; LoRA scale ignored",
    ),
    ("float32", "loss"): TruthBound(
        multiple=4.0,
        floor_ulps=8.0,
        stage_floor=True,
        noise="torch twin 0.19, MLX (OpenBLAS) and mlx-rs 0.13 of the bound; SmolLM2-135M: torch 0.01",
        catches="the cross-entropy 3e-6 off (relative; 2e-6 before the spread took the twin's random-rounding draws, whose model of a vocabulary-wide sum errs more than the reference's), the total and the distrust term 2e-6; one padding token of 56 counted in the cross-entropy",
    ),
    (
        "float32",
        "gradients",
    ): TruthBound(  # 8×: two correct float32 backward passes differ by up to 6.2× the reference's own error
        multiple=8.0,
        floor_ulps=8.0,
        stage_floor=True,
        noise="torch twin 0.25, MLX (OpenBLAS) and mlx-rs 0.23 of the bound; SmolLM2-135M (30 layers, LoRA on the last 4): torch 0.02; "
        "SmolLM2's first 4 layers with LoRA on all of them (`parity fixtures create`): torch 0.78, mlx-rs 0.46, where a 4× bound "
        "failed the correct twin at 1.56 (4 elements of lora_b's gradient, a real model's ill-conditioned sums)",
        catches="any gradient tensor 2e-5 off on 265 of the bundled fixtures' 282 (1e-4 for the analytically zero k_proj bias); "
        "absent or extra tensors (a trainable-set mismatch)",
    ),
    ("float32", "optimizer"): TruthBound(
        multiple=4.0,
        floor_ulps=8.0,
        noise="torch twin 0.32, MLX (OpenBLAS) and mlx-rs 0.28 of the bound; SmolLM2-135M: torch 0.22; no outlier quota (ill-conditioned elements carry their sensitivity)",
        catches="learning rate 0.1 % high (on SmolLM2 too); AdamW eps 1e-7 instead of 1e-8; any update tensor 5e-4 off (1e-2 for parameters near 1 under a 2e-4 warmup lr, where Δθ is a few ulp of θ); clipping, accumulation or weight decay wrong (via m, v)",
    ),
    ("float32", "trajectory"): TruthBound(  # 8×: N updates compound float32 noise through the parameters
        multiple=8.0,
        floor_ulps=8.0,
        noise="torch twin 0.54, MLX (OpenBLAS) and mlx-rs 0.41 of the bound after 4-8 updates; SmolLM2-135M: torch 0.03; "
        "SmolLM2-135M with LoRA on all 30 layers: MLX and mlx-rs on OpenBLAS against reference-BLAS goldens 0.85, torch 0.24",
        catches="any trajectory tensor 1e-3 off; one missed update of four; bias correction frozen at t = 1",
    ),
    ("float32", "checkpoint"): TruthBound(
        multiple=8.0,
        floor_ulps=8.0,
        noise="as trajectory: the resumed run is judged against the trajectory's truth",
        catches="as trajectory; AdamW moments and step lost on resume (also caught exactly by the self-consistency check)",
    ),
}

# bfloat16 training: the same rule and multiples, so each bound is the reference's own bfloat16 error times
# the multiple (Δθ of a bfloat16 parameter floored at one bfloat16 spacing of θ per update: `bf16_param_ulps`).
# Multiples measured at real scale: on SmolLM2-135M's first 4 layers trained in bfloat16 (LoRA on all, and full)
# the correct torch twin reached 2.5× the float32 multiples' bounds (forward: a whole layer's output at a massive
# activation dimension, 4 % off where the reference happened to be near the truth; gradients and trajectories
# 2.7× the 8× bound): two correct bfloat16 implementations differ by far more than the reference's own error at
# an element. The multiples are 4× those of float32 there; a bound from each element's conditioning is not built.
_BF16_MULTIPLE = {
    "forward": 16.0,
    "loss": 4.0,
    "gradients": 32.0,
    "optimizer": 4.0,
    "trajectory": 32.0,
    "checkpoint": 32.0,
}
_BF16_EVIDENCE = {  # stage: (measured noise, smallest bug caught), on bf16_lora and bf16_full, and SmolLM2's first 4 layers
    "forward": (
        "torch twin (bfloat16) 0.17, transformers (bfloat16) 0.22 of the bound; SmolLM2 4 layers: torch 0.63 (a layer's "
        "output, isolated), transformers 0.30",
        "logits 10 % off (a bfloat16 ulp is 0.4-0.8 %); GQA heads tiled, RoPE pairing and position, GELU for SiLU, the causal "
        "mask, the LoRA scale; a float32 port on a float32 checkpoint fails weight_mapping first",
    ),
    "loss": (
        "torch twin 0.08 (the loss is float32 on bfloat16 logits); SmolLM2 4 layers: 0.30",
        "any loss part 5e-4 off (relative); padding counted in the cross-entropy (49× the bound on bf16_lora)",
    ),
    "gradients": (
        "torch twin 0.12; SmolLM2 4 layers (full training): 0.66",
        "a gradient tensor 20 % off (float32 LoRA adapters) to 50 % (bfloat16 weights); a trainable-set mismatch",
    ),
    "optimizer": (
        "torch twin 1.00 and 0.97 (first Adam updates ±lr whose gradient sits at bfloat16 noise, flipped within their own "
        "sensitivity); SmolLM2 4 layers: 1.00 and 0.96 the same way, isolated 0.91; 30 random SmolLM2 configurations: torch "
        "1.00 (a flip), isolated 1.10 before Δθ's floor counted the update's own bfloat16 roundings (UPDATE_ROUNDINGS), 0.59 after",
        "float32 LoRA adapters: any update 5e-5 off, learning rate 0.1 % high (37× the bound), weight decay missing or coupled, "
        "bias correction flipped; bfloat16 weights: an update 10 % off, a disconnected optimizer, bias correction flipped, "
        "clipping missing (via m and v); not an update 8 % off (two correct bfloat16 updates may differ by 6.6 % of "
        "themselves) nor a learning rate 1 % high",
    ),
    "trajectory": (
        "torch twin 0.40 (bf16_lora), 0.21 (bf16_full) after 4 updates; SmolLM2 4 layers: 0.78 (LoRA), 0.73 (full)",
        "a trajectory tensor 10 % off (float32 adapters of a bfloat16 model, whose bfloat16 gradients may move 4 "
        "updates by 7 %; 2e-2 before the sensitivities took the judged gradient bound) or 20 % (bfloat16 weights: "
        "each update may carry 6.6 % of its own roundings); bias correction frozen",
    ),
    "checkpoint": (
        "as trajectory",
        "as trajectory; AdamW moments and step lost on resume (also exact self-consistency)",
    ),
}
TOLERANCES[("bfloat16", "weight_mapping")] = EXACT  # the checkpoint rounded to bfloat16: one correct value per weight
TOLERANCES[("bfloat16", "shifted_slices")] = EXACT
for _stage, (_noise, _catches) in _BF16_EVIDENCE.items():
    TOLERANCES[("bfloat16", _stage)] = dataclasses.replace(
        TOLERANCES[("float32", _stage)],
        multiple=_BF16_MULTIPLE[_stage],
        stage_floor=True,
        dtype="bfloat16",
        noise=_noise,
        catches=_catches,
    )

# The isolated checks judge one piece on the reference's own inputs, with that piece's bound.
for _dtype in ("float32", "bfloat16"):
    TOLERANCES[(_dtype, "isolated_forward")] = TOLERANCES[(_dtype, "forward")]
    TOLERANCES[(_dtype, "isolated_loss")] = TOLERANCES[(_dtype, "loss")]
    TOLERANCES[(_dtype, "isolated_optimizer")] = TOLERANCES[(_dtype, "optimizer")]
    TOLERANCES[(_dtype, "isolated_schedule")] = TOLERANCES[(_dtype, "trajectory")]

# A resumed run must equal the same backend's uninterrupted run bit for bit.
RESUME_SELF_CONSISTENCY = EXACT

# How close a diagnosis hypothesis must come to the port's number to be named as its cause: a relative
# match, not a verdict (verdicts use the bounds above).
HYPOTHESIS_RTOL = 1e-5


def tolerance(stage: str, dtype: str = "float32") -> Tolerance:
    try:
        return TOLERANCES[(dtype, stage)]
    except KeyError:
        raise KeyError(f"no tolerance for stage {stage!r} in {dtype}: measure one before comparing") from None


# --- a GPU: TF32 matmuls, and nondeterministic reductions ----------------------------------------------


@dataclass(frozen=True)
class PrecisionBound(TruthBound):
    """A float32 stage's `TruthBound` scaled by the matmul precision's unit roundoff over float32's."""

    factor: float = 1.0
    mode: str = "float32"

    def describe(self) -> str:
        return (
            f"{self.mode}: ({self.multiple:g}× the reference's float32 error vs the float64 truth + {self.floor_ulps:g} ulp)"
            f" × {self.factor:g}, the {self.mode}/float32 unit-roundoff ratio, + each update's sensitivity to a {self.mode} gradient error"
        )

    def bound(self, reference, truth, sensitivity=None, *parts, **named) -> np.ndarray:
        """factor × (multiple × noise + floor) + sensitivity: the sensitivity is not scaled, since on a
        precision case (`precision_case`) it is already measured for that precision's gradient error. `parts`:
        the rest of `TruthBound.bound`'s arguments, `named` by name."""
        base = TruthBound.bound_and_ratios(self, reference, truth, sensitivity, *parts, **named)[0]
        sens = 0.0 if sensitivity is None else np.asarray(sensitivity, np.float64)
        return self.factor * (base - sens) + sens

    def bound_and_ratios(self, *args, actual=None, **kwargs):
        """No ratios: the golden is a float32 sample, not one of this precision's noise."""
        return self.bound(*args, **kwargs), None, None


def precision_factor(precision: str, dtype: str = "float32") -> float:
    """How much coarser a training step in `dtype` rounds when its float32 matmuls run in `precision`: the
    matmul's unit roundoff over the storage dtype's, at least 1. float32 under TF32: 2^-11 / 2^-24 = 8192.
    bfloat16 under TF32: 1, since TF32 (10 mantissa bits) rounds less than bfloat16 storage (8 bits) already
    does, so the reference's own bfloat16 error, which the bfloat16 bound is a multiple of, still measures
    the step's noise; scaling it by 8192 would let bugs thousands of times that noise pass."""
    roundoff = MATMUL_ROUNDOFF.get(precision)
    if roundoff is None:
        raise DeviceError(f"no judgement for matmul precision {precision!r}; known: {', '.join(MATMUL_ROUNDOFF)}")
    return max(1.0, roundoff / UNIT_ROUNDOFF[dtype])


def precision_tolerance(tol, precision: str):
    """`tol` as it applies in `precision`: exact tolerances stay exact, truth bounds scale by
    `precision_factor` of their dtype."""
    if not isinstance(tol, TruthBound):
        precision_factor(precision)  # an unknown mode is refused for every stage
        return tol
    factor = precision_factor(precision, tol.dtype)
    if factor == 1.0:
        return tol
    return PrecisionBound(
        multiple=tol.multiple,
        floor_ulps=tol.floor_ulps,
        stage_floor=tol.stage_floor,
        noise=f"{tol.noise}; scaled by {factor:g} for {precision}",
        catches=f"in float32: {tol.catches}",
        factor=factor,
        mode=precision,
    )


@dataclass(frozen=True)
class RunToRunBound:
    """The resumed run against the same backend's uninterrupted run on a nondeterministic device:
    `allow` (multiple × the larger of the measured run-to-run spread and a few float32 ulps of the
    tensor's scale) + each element's sensitivity (its update's conditioning, harness/fixtures/truth.py)."""

    allow: float
    spread: float
    multiple: float = RUN_TO_RUN_MULTIPLE
    noise: str = (
        "run-to-run nondeterminism of the device, measured by running the uninterrupted trajectory twice; "
        "a repeat that happens to be bit-identical is no proof of determinism, hence the ulp floor and the sensitivity"
    )
    catches: str = "AdamW moments or step lost on resume (moves well-conditioned parameters by ~lr); any resume bug larger than the device's own noise"

    def describe(self) -> str:
        return (
            f"{self.multiple:g}× max(measured run-to-run spread {self.spread:.3g}, {RUN_TO_RUN_FLOOR_ULPS:g} ulp of the tensor's scale)"
            f" = {self.allow:.3g}, + each element's update sensitivity"
        )

    def bound(self, reference, truth=None, sensitivity=None, *unused, **named) -> np.ndarray:
        """`allow` plus each element's sensitivity (TruthBound.bound's other arguments do not enter)."""
        sens = 0.0 if sensitivity is None else np.asarray(sensitivity, np.float64)
        return np.full(np.shape(reference), self.allow) + sens


RUN_TO_RUN_FLOOR_ULPS = 8.0


def run_to_run_bounds(
    uninterrupted: dict[str, np.ndarray],
    repeat: dict[str, np.ndarray],
    scales: dict[str, float] | None = None,
    multiple: float = RUN_TO_RUN_MULTIPLE,
) -> dict[str, RunToRunBound]:
    """Per tensor name, the bound a resumed run is held to on a nondeterministic device, from two
    uninterrupted runs of one backend.

    spread_k = max |repeat_k - uninterrupted_k|; scale_k = the tensor's own magnitude or the parameter's
    (which sets a Δθ's rounding); the stage's relative spread r = max_k spread_k / scale_k; allowed_k =
    multiple × max(spread_k, r × scale_k, RUN_TO_RUN_FLOOR_ULPS × ulp32 × scale_k). The relative term
    gives a tensor that happened to repeat bit for bit the stage's noise; the ulp floor covers a repeat
    that was bit-identical as a whole (seen on an H100: two uninterrupted runs equal, the resumed one a
    few ulp of θ away, and 7e-7 away on AdamW updates whose gradient is near zero, which the element's
    sensitivity, added by `RunToRunBound.bound`, covers). A tensor absent from the repeat gets the floor."""

    scales = scales or {}
    spread, scale = {}, {}
    for k, u in uninterrupted.items():
        u = np.asarray(u, np.float64)
        finite = np.isfinite(u).all()
        scale[k] = max(float(np.abs(u).max()) if u.size and finite else 0.0, float(scales.get(k, 0.0)))
        r = repeat.get(k)
        if r is None or np.shape(r) != u.shape:
            continue
        r = np.asarray(r, np.float64)
        if not (finite and np.isfinite(r).all()):
            continue
        spread[k] = float(np.abs(r - u).max()) if u.size else 0.0
    rel = max((spread[k] / scale[k] for k in spread if scale[k] > 0), default=0.0)
    return {
        k: RunToRunBound(
            multiple * max(spread.get(k, 0.0), rel * scale[k], RUN_TO_RUN_FLOOR_ULPS * ULP32 * scale[k]),
            spread.get(k, 0.0),
            multiple,
        )
        for k in uninterrupted
    }
