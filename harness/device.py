"""Where the in-process backends compute (`--device cpu|gpu`), in which float32 matmul precision
(`--tf32`), and the judgements that fit a GPU: a precision-scaled truth bound for TF32, and a resume
check against the measured run-to-run nondeterminism.

One device per process. `activate()` is called by the CLI before any backend computes:

* MLX: `mx.set_default_device(mx.gpu | mx.cpu)`; TF32 is MLX-CUDA's default for float32 matmuls and
  is read once per process from `MLX_ENABLE_TF32` at the first matmul, so `activate()` sets that
  variable before anything computes (the audit and bench processes it starts inherit it).
* torch (the twin): `torch.set_default_device("cuda")`, and `torch.backends.cuda.matmul.allow_tf32` /
  `torch.backends.cudnn.allow_tf32` set to the asked mode.

Nothing is trusted on its word: `measure_matmul()` runs a float32 matmul in each framework on the
chosen device and measures its error against float64; `activate()` refuses when the mode in effect is
not the mode asked for (TF32 on when asked off, say), and the audit report states the measured error.

Judgements (docs/gpu.md says why, with the measured margins):

* `PrecisionBound`: TF32 rounds each matmul operand to 10 mantissa bits (unit roundoff 2^-11 instead of
  float32's 2^-24). With `--tf32` every computed stage's bound is the stored float32 bound's noise and
  ulp floor (`TruthBound`) multiplied by the ratio of the unit roundoffs, 2^13, plus each element's
  sensitivity, which `precision_case` re-measures for the optimizer and trajectory updates at
  TF32-sized gradient errors (they flip Adam updates whose gradient is near zero); every stage's
  tolerance says so. Exact stages (weights, shifted slices, the step counter) stay exact.
* `RunToRunBound`: GPU reductions are not bit-deterministic, so a resumed run cannot be held to bit
  identity with the uninterrupted one. On a nondeterministic device the checkpoint stage runs the
  uninterrupted trajectory twice; the resumed run must stay within `RUN_TO_RUN_MULTIPLE` × the larger
  of that spread, the stage's relative spread × the tensor's scale and 8 ulp of that scale, plus each
  element's update sensitivity (a repeat can happen to be bit-identical while the resume is not).
  On the CPU, and for backends the harness does not run itself, the resume stays bit-exact. A resume
  that loses AdamW's moments or step moves well-conditioned parameters by about the learning rate,
  orders of magnitude past that bound.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from .tolerances import TruthBound

DEVICES = ("cpu", "gpu")
ALIASES = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu"}
# Unit roundoff of a float32 matmul's operands in each precision mode, over float32's (2^-24).
PRECISION_FACTOR = {"float32": 1.0, "tf32": 2.0**13}
RUN_TO_RUN_MULTIPLE = 8.0
# A float32 matmul's relative error against float64 on random data, K = 512: about 1e-7 in true float32,
# about 3e-4 with TF32 operands. The threshold between them decides which mode is in effect.
TF32_THRESHOLD = 1e-5
IN_PROCESS = ("mlx", "torch")


class DeviceError(ValueError):
    """A device or precision that cannot be used here (the CLI reports it as bad input, exit 2)."""


@dataclass
class Device:
    name: str = "cpu"  # cpu | gpu
    tf32: bool = False
    measured: dict = field(default_factory=dict)  # framework -> {"rel_error": ..., "tf32": bool, "device": str}

    @property
    def precision(self) -> str:
        """The float32 matmul precision the judgement fits: float32, or tf32 on a GPU that allows it."""
        return "tf32" if self.name == "gpu" and self.tf32 else "float32"

    @property
    def nondeterministic(self) -> bool:
        """GPU reductions are not bit-deterministic run to run; the CPU's are."""
        return self.name == "gpu"

    def describe(self) -> str:
        if self.name == "cpu":
            return "cpu (float32)"
        parts = [
            f"{fw}: matmul rel. error {m['rel_error']:.2g} on {m['device']}" for fw, m in sorted(self.measured.items())
        ]
        mode = (
            "TF32 on (--tf32): stages judged with the TF32 bound"
            if self.tf32
            else "TF32 off: true float32 matmuls, the stored float32 bounds"
        )
        return f"gpu, {mode}" + (f" ({'; '.join(parts)})" if parts else "")

    def to_dict(self) -> dict:
        return {"device": self.name, "tf32": self.tf32, "precision": self.precision, "measured": self.measured}


_CURRENT = Device()


def current() -> Device:
    """The device this process's in-process backends compute on (cpu until `activate()`)."""
    return _CURRENT


def parse(name: str, tf32: bool = False) -> Device:
    """`--device` and `--tf32` as a Device, or a DeviceError that says what is allowed."""
    key = (name or "cpu").strip().lower()
    if key not in ALIASES:
        raise DeviceError(f"unknown device {name!r}; devices: cpu, gpu (cuda is the same as gpu)")
    dev = Device(ALIASES[key], tf32)
    if tf32 and dev.name != "gpu":
        raise DeviceError("--tf32 applies to --device gpu only: the CPU computes float32 matmuls in float32")
    return dev


def check_backends(dev: Device, names: list[str]) -> None:
    """On the GPU only the in-process backends run there; say so rather than audit a port on the CPU
    under a GPU heading."""
    if dev.name == "cpu":
        return
    other = [n for n in names if n not in IN_PROCESS and not n.startswith("mutant:")]
    if other:
        raise DeviceError(
            f"--device gpu runs the in-process backends ({', '.join(IN_PROCESS)}, mutant:*) on the GPU; "
            f"{', '.join(other)} choose their own device: audit them without --device, with their libmlx "
            "the CUDA one (docs/gpu.md)"
        )


def gpu_unavailable(framework: str) -> str | None:
    """None when `framework` (mlx or torch) can compute on a GPU in this process, else why not."""
    if framework == "mlx":
        try:
            import mlx.core as mx
        except ImportError as e:
            return f"MLX is not installed ({e})"
        try:
            ok = mx.is_available(mx.gpu)
        except Exception as e:  # an MLX built without any GPU backend
            return f"MLX has no GPU backend here ({type(e).__name__}: {e})"
        if not ok:
            return (
                "MLX has no GPU backend here: on Linux install the CUDA build (mlx-cuda-13 of the same version as mlx; "
                "scripts/gpu/setup.sh does it from carried wheels)"
            )
        return None
    try:
        import torch
    except ImportError as e:
        return f"torch is not installed ({e}): the twin needs the `twin` extra"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device" + ("" if torch.version.cuda else " (a CPU-only build)")
    return None


def _rel_error(product: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    exact = a.astype(np.float64) @ b.astype(np.float64)
    return float(np.abs(product.astype(np.float64) - exact).max() / np.abs(exact).max())


def measure_matmul(framework: str, n: int = 512, seed: int = 0) -> dict:
    """A float32 n×n matmul on the active device in `framework`, its error against float64, and the mode
    that error shows (TF32 operands err ~1000× more than float32's)."""
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    if framework == "mlx":
        import mlx.core as mx

        out = np.array(mx.array(a) @ mx.array(b))
        where = str(mx.default_device())
    else:
        import torch

        ta, tb = torch.as_tensor(a), torch.as_tensor(b)
        out = (ta @ tb).cpu().numpy()
        where = str(ta.device)
    err = _rel_error(out, a, b)
    return {"rel_error": err, "tf32": err > TF32_THRESHOLD, "device": where}


def set_tf32_env(tf32: bool) -> None:
    """MLX reads MLX_ENABLE_TF32 once, at its first float32 matmul: set before anything computes."""
    os.environ["MLX_ENABLE_TF32"] = "1" if tf32 else "0"


def activate(dev: Device, frameworks=IN_PROCESS) -> Device:
    """Make `dev` this process's device for `frameworks`, measure the matmul mode in effect in each and
    refuse (DeviceError) when it is not the one asked for. Returns `dev`, its `measured` filled in."""
    global _CURRENT
    if dev.name == "gpu":
        set_tf32_env(dev.tf32)
        missing = {fw: why for fw in frameworks if (why := gpu_unavailable(fw))}
        if missing:
            raise DeviceError("--device gpu: " + "; ".join(f"{fw}: {why}" for fw, why in missing.items()))
    for fw in frameworks:
        if fw == "mlx":
            import mlx.core as mx

            mx.set_default_device(mx.gpu if dev.name == "gpu" else mx.cpu)
        elif fw == "torch":
            try:
                import torch
            except ImportError:
                continue  # the twin is optional; its backend says so itself
            if dev.name == "gpu":
                torch.set_default_device("cuda")
                torch.backends.cuda.matmul.allow_tf32 = dev.tf32
                torch.backends.cudnn.allow_tf32 = dev.tf32
        if dev.name == "gpu":
            m = measure_matmul(fw)
            dev.measured[fw] = m
            if m["tf32"] != dev.tf32:
                hint = (
                    " (MLX read MLX_ENABLE_TF32 before it was set: start a fresh process with MLX_ENABLE_TF32="
                    f"{int(dev.tf32)})"
                    if fw == "mlx"
                    else ""
                )
                raise DeviceError(
                    f"{fw} on the GPU computes float32 matmuls with TF32 {'on' if m['tf32'] else 'off'} "
                    f"(measured relative error {m['rel_error']:.2g}), but TF32 {'on' if dev.tf32 else 'off'} "
                    f"was asked for{hint}"
                )
    _CURRENT = dev
    return dev


# --- judgements ---------------------------------------------------------------------------------------


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

    def bound(
        self, reference, truth, sensitivity=None, stage_rms: float = 0.0, param=None, param_dtype="float32"
    ) -> np.ndarray:
        """factor × (multiple × noise + floor) + sensitivity: the sensitivity is not scaled, since on a
        precision case (`precision_case`) it is already measured for that precision's gradient error."""
        base = TruthBound.bound(self, reference, truth, sensitivity, stage_rms, param, param_dtype)
        sens = 0.0 if sensitivity is None else np.asarray(sensitivity, np.float64)
        return self.factor * (base - sens) + sens


def precision_tolerance(tol, precision: str):
    """`tol` as it applies in `precision`: exact tolerances stay exact, truth bounds scale."""
    factor = PRECISION_FACTOR.get(precision)
    if factor is None:
        raise DeviceError(f"no judgement for matmul precision {precision!r}; known: {', '.join(PRECISION_FACTOR)}")
    if factor == 1.0 or not isinstance(tol, TruthBound):
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


class _PrecisionCase:
    """A case whose `truth` carries the sensitivities of one matmul precision; all else is the case's."""

    def __init__(self, case, truth: dict):
        self._case, self.truth = case, truth

    def __getattr__(self, name):
        return getattr(self._case, name)


_PRECISION_TRUTH: dict[tuple[str, str], dict] = {}
# Stages whose goldens are AdamW updates of gradients the backend computed itself: there a gradient
# error moves updates nonlinearly (an update whose gradient is near noise level flips sign). The
# isolated optimizer and schedule checks apply the reference's own gradients and keep their sensitivity.
UPDATE_STAGES = ("optimizer", "trajectory")


def precision_case(case, precision: str):
    """`case` judged in `precision`: its `sens.*` for the optimizer and trajectory goldens re-measured the
    way harness/truth.py measures them for float32 (the float64 twin's updates with every gradient
    moved by + and by - the gradient stage's bound), but with that precision's gradient bound (the
    float32 bound × the unit-roundoff ratio), the larger of the two kept. TF32 gradient errors are
    ~10³ times float32's, enough to flip an Adam update whose gradient is near zero: that update may
    then be off by up to 2 lr, as in the reference run in TF32 itself. Cached per case and precision;
    needs the torch twin (float64, on this process's device)."""
    factor = PRECISION_FACTOR.get(precision)
    if factor is None:
        raise DeviceError(f"no judgement for matmul precision {precision!r}; known: {', '.join(PRECISION_FACTOR)}")
    if factor == 1.0:
        return case
    key = (str(case.path), precision)
    if key not in _PRECISION_TRUTH:
        _PRECISION_TRUTH[key] = _precision_truth(case, factor)
    return _PrecisionCase(case, _PRECISION_TRUTH[key])


def _precision_truth(case, factor: float) -> dict:
    from .truth import gradient_bounds, sensitivities

    golden = case.golden
    truth = {k.removeprefix("truth."): v for k, v in case.truth.items() if k.startswith("truth.")}
    bounds = {k: factor * b for k, b in gradient_bounds(case, golden, truth).items()}
    sens = sensitivities(case, golden, truth, bounds, UPDATE_STAGES)
    out = dict(case.truth)
    for k, v in sens.items():
        old = out.get(f"sens.{k}")
        out[f"sens.{k}"] = v if old is None else np.maximum(v, np.asarray(old, np.float64))
    return out


@dataclass(frozen=True)
class RunToRunBound:
    """The resumed run against the same backend's uninterrupted run on a nondeterministic device:
    `allow` (multiple × the larger of the measured run-to-run spread and a few float32 ulps of the
    tensor's scale) + each element's sensitivity (its update's conditioning, harness/truth.py)."""

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

    def bound(
        self, reference, truth=None, sensitivity=None, stage_rms: float = 0.0, param=None, param_dtype="float32"
    ) -> np.ndarray:
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
    from .tolerances import ULP32

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
