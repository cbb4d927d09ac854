"""Where the in-process backends compute (`--device cpu|gpu`) and in which float32 matmul precision
(`--tf32`), measured, never taken on a framework's word.

One device per process. `activate()` is called by the CLI before any backend computes:

* MLX: `mx.set_default_device(mx.gpu | mx.cpu)`; TF32 is MLX-CUDA's default for float32 matmuls and
  is read once per process from `MLX_ENABLE_TF32` at the first matmul, so `activate()` sets that
  variable before anything computes (the audit and bench processes it starts inherit it).
* torch (the twin): `torch.set_default_device("cuda")`, and `torch.backends.cuda.matmul.allow_tf32` /
  `torch.backends.cudnn.allow_tf32` set to the asked mode.

Nothing is trusted on its word: `measure_matmul()` runs a float32 matmul in each framework on the
chosen device and measures its error against float64; `activate()` refuses when the mode in effect is
not the mode asked for (TF32 on when asked off, say), and the audit report states the measured error.
The judgements that fit a GPU (the TF32 bound, the run-to-run bound) are in harness/tolerances.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

DEVICES = ("cpu", "gpu")
ALIASES = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu"}
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
