"""The GPU bench (`parity bench --device gpu`, docs/gpu.md): MLX-CUDA against torch-CUDA, each measurement
in a fresh process of the worker `bench/gpu.py`, collected into results, a table and a report."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ..machine import machine, versions
from . import BENCH_DIR, REPO, VERSIONS
from .report import gpu_markdown
from .stats import gpu_table

GPU_WORKER = BENCH_DIR / "gpu.py"
# The worker is a script run by its path, not a module of the package: its sizes and precisions are read
# from the file itself (it imports only the standard library at its top).
_spec = importlib.util.spec_from_file_location("parity_gpu_worker", GPU_WORKER)
_worker = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _worker  # dataclasses look their module up while the file runs
_spec.loader.exec_module(_worker)
GPU_SIZES, PRECISIONS = _worker.GPU_SIZES, _worker.PRECISIONS


def gpu_precisions(tf32: bool | None) -> list[str]:
    """`--tf32` on the GPU bench: None (neither flag) measures float32 with TF32 off and on; `--tf32` only
    on, `--no-tf32` only off; bfloat16 always."""
    fp32 = ["fp32", "tf32"] if tf32 is None else ["tf32"] if tf32 else ["fp32"]
    return fp32 + ["bf16"]


def _gpu_worker(args: list[str], precision: str, log, timeout: float) -> tuple[list[dict], str]:
    env = dict(os.environ, MLX_ENABLE_TF32="1" if precision == "tf32" else "0", PYTHONHASHSEED="0")
    t = time.perf_counter()
    try:
        p = subprocess.run(
            [sys.executable, str(GPU_WORKER), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        log(f"  {' '.join(args)}: timed out after {timeout:.0f} s")
        return [], f"timed out after {timeout:.0f} s"
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    log(f"  {' '.join(args)}: exit {p.returncode} in {time.perf_counter() - t:.1f} s")
    return rows, ("" if p.returncode == 0 else (p.stdout + p.stderr)[-2000:])


def run_gpu(
    sizes: list[str] | None = None,
    tf32: bool | None = None,
    frameworks: list[str] | None = None,
    steps: int = 5,
    warmup: int = 2,
    budget_s: float = 540.0,
    json_path: Path | None = None,
    report_path: Path | None = None,
    log=print,
    device: str = "gpu",
    profile: bool = True,
) -> dict:
    """MLX-CUDA against torch-CUDA, one worker process per (framework, size, precision) (`bench/gpu.py`),
    and the dense-matmul peak of each precision; `profile`: the largest size's step GEMMs timed alone in
    each framework (where a gap comes from). Sizes in order until `budget_s` is spent (the rest are
    listed as skipped, never silently left out)."""
    started = time.time()
    sizes = list(sizes or [s for s in GPU_SIZES if s != "tiny"])
    precisions = gpu_precisions(tf32)
    frameworks = list(frameworks or ("torch", "mlx"))
    bad = [s for s in sizes if s not in GPU_SIZES] + [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise ValueError(f"unknown GPU bench size or precision {', '.join(bad)}; sizes: {', '.join(GPU_SIZES)}")
    peaks: dict[str, dict] = {}
    rows: list[dict] = []
    failures: dict[str, str] = {}
    skipped: list[str] = []
    log(f"parity bench --device {device}: {', '.join(frameworks)} × {', '.join(sizes)} × {', '.join(precisions)}")
    if device == "gpu":
        for prec in precisions:
            for fw in frameworks:
                got, text = _gpu_worker([fw, "peak", prec], prec, log, 120)
                for r in got:
                    peaks.setdefault(prec, {})[fw] = r["peak"]["tflops"]
                if text:
                    failures[f"peak/{fw}/{prec}"] = text
    for size in sizes:
        for prec in precisions:
            for fw in frameworks:
                if time.time() - started > budget_s:
                    skipped.append(f"{fw}/{size}/{prec}")
                    continue
                got, text = _gpu_worker(
                    [fw, size, prec, "--steps", str(steps), "--warmup", str(warmup), "--device", device],
                    prec,
                    log,
                    max(60.0, budget_s - (time.time() - started) + 60),
                )
                rows += [r["result"] for r in got if "result" in r]
                if text:
                    failures[f"{fw}/{size}/{prec}"] = text
    gemms: list[dict] = []
    if device == "gpu" and profile:
        for prec in precisions:
            for fw in frameworks:
                if time.time() - started > budget_s:
                    skipped.append(f"gemm:{fw}/{sizes[-1]}/{prec}")
                    continue
                got, text = _gpu_worker([fw, f"gemm:{sizes[-1]}", prec], prec, log, 120)
                gemms += [r["gemm"] for r in got if "gemm" in r]
                if text:
                    failures[f"gemm/{fw}/{prec}"] = text
    for r in rows:
        peak = max(peaks.get(r["precision"], {}).values(), default=None)
        r["share_of_peak"] = (r["tflops"] / peak) if peak and "tflops" in r else None
    table = gpu_table(rows)
    out = {
        "device": device,
        "machine": machine(),
        "versions": versions(*VERSIONS),
        "gpu": _gpu_name(),
        "steps": steps,
        "warmup": warmup,
        "peak_tflops": peaks,
        "results": rows,
        "table": table,
        "gemm_profile": gemms,
        "failures": failures,
        "skipped": skipped,
        "seconds": round(time.time() - started, 1),
        "command": "parity " + " ".join(sys.argv[1:])
        if Path(sys.argv[0]).name == "parity"
        else "parity bench --device gpu",
    }
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(out, indent=2) + "\n")
    if report_path:
        report_path.write_text(gpu_markdown(out))
    return out


def _gpu_name() -> str | None:
    try:
        p = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return p.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
