"""The bench session: one pytest-benchmark process per backend and size (and per library for the matmul
peak), their JSON collected and summarised into the bench's results, written as JSON and a report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlx_parity.reference import blas

from ..machine import machine, versions
from . import BENCH_DIR, REPO, VERSIONS
from .report import write_report
from .runner import mlx_rs_unavailable
from .stats import summarize, targets
from .workload import BACKENDS, SIZES, ensure_checkpoint


def _env(backend: str, threads: int, workdir: Path) -> dict:
    """The environment of one bench process: its thread count fixed before any BLAS loads."""
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "OPENBLAS_NUM_THREADS": str(threads),
            "PARITY_BENCH_THREADS": str(threads),
            "PARITY_BENCH_WORKDIR": str(workdir),
            "PYTHONHASHSEED": "0",
        }
    )
    return env


def _pytest(args: list[str], env: dict, out: Path, log) -> tuple[dict | None, str]:
    """One `python -m pytest bench` process: its pytest-benchmark JSON (None if it failed) and its output's tail."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(BENCH_DIR),
        "-q",
        "-p",
        "no:cacheprovider",
        "--benchmark-json",
        str(out),
        "--benchmark-disable-gc",
        *args,
    ]
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    log(f"  {' '.join(args)}: exit {p.returncode} in {time.perf_counter() - t:.1f} s")
    text = (p.stdout + p.stderr)[-3000:]
    if p.returncode != 0 or not out.exists():
        return None, text
    return json.loads(out.read_text()), text


def run(
    quick: bool = False,
    backends: list[str] | None = None,
    sizes: list[str] | None = None,
    threads: int | None = None,
    json_path: Path | None = None,
    report_path: Path | None = None,
    stages: bool | None = None,
    log=print,
) -> dict:
    """Run the suite as the package docstring (harness/bench/__init__.py) describes; returns the JSON-able results."""
    started = time.time()
    threads = threads or os.cpu_count() or 1
    backends = list(backends or BACKENDS)
    sizes = list(sizes or SIZES)
    stages = (not quick) if stages is None else stages
    skipped = {}
    if "mlx-rs" in backends and (why := mlx_rs_unavailable()):
        skipped["mlx-rs"] = why
        backends.remove("mlx-rs")
    blas_info = blas.report(measure=False)
    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="parity-bench-"))
    for s in sizes:
        ensure_checkpoint(SIZES[s], workdir)
    mode = ["--bench-quick"] if quick else []
    raw: list[dict] = []
    failures = {}
    peaks = {}
    log(
        f"parity bench: {', '.join(backends)} × {', '.join(sizes)}, {threads} threads, {'quick' if quick else 'full'}; BLAS for MLX: {blas_info['label']}"
    )
    for lib in ("mlx", "torch"):
        data, text = _pytest(
            ["-m", "peak", f"--bench-backend={lib}", *mode],
            _env(lib, threads, workdir),
            workdir / f"peak-{lib}.json",
            log,
        )
        if data is None:
            failures[f"peak/{lib}"] = text
            continue
        for b in data["benchmarks"]:
            peaks[lib] = b["extra_info"]["gflops_best"]
    for backend in backends:
        for s in sizes:
            marks = "step or stage" if stages else "step"
            args = ["-m", marks, f"--bench-backend={backend}", f"--bench-size={s}", *mode]
            data, text = _pytest(args, _env(backend, threads, workdir), workdir / f"{backend}-{s}.json", log)
            if data is None:
                failures[f"{backend}/{s}"] = text
                continue
            raw += data["benchmarks"]
    peak = max(peaks.values()) if peaks else None
    results, stage_rows = summarize(raw, peak)
    out = {
        "peak_gflops": round(peak, 1) if peak else None,
        "peak_by_library": {k: round(v, 1) for k, v in peaks.items()},
        "blas": blas_info["label"],
        "blas_detail": blas_info,
        "threads": threads,
        "quick": quick,
        "machine": machine(),
        "versions": versions(*VERSIONS),
        "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]},
        "seconds": round(time.time() - started, 1),
        "command": "parity " + " ".join(sys.argv[1:]) if Path(sys.argv[0]).name == "parity" else "parity bench",
        "results": results,
        "stages": stage_rows,
        "targets": targets(results),
        "skipped": skipped,
        "failures": failures,
    }
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(out, indent=2) + "\n")
    if report_path:
        write_report(out, report_path)
    return out
