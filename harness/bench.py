"""`parity bench`: the training step and its stages timed for each backend, one process per backend and size.

The timing itself is the pytest-benchmark suite in `bench/` (runnable alone: `python -m pytest bench`).
`run()` builds three tiny Llama checkpoints (about 1M, 5M and 20M parameters), then for every backend
(`mlx`: the reference, `torch`: the twin, `mlx-rs`: the extension when `import parity_mlx_rs` works)
and size starts `python -m pytest bench` in a fresh process with its thread count fixed
(`OMP_NUM_THREADS`, `MKL_NUM_THREADS`, `OPENBLAS_NUM_THREADS`, `torch.set_num_threads`), collects the
pytest-benchmark JSON, measures the machine's float32 matmul peak the same way, and writes the JSON,
a Markdown report and a PNG plot. (The fast BLAS is bound into libmlx.so
alone, so torch keeps the BLAS it ships with even where MLX is loaded beside it.)

Model FLOPs per step are taken as 6 · parameters · tokens (forward 2, backward 4; attention's own
T² terms left out), the usual convention, so "share of peak" is a lower bound of the real work rate.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "bench"
BACKENDS = ("mlx", "torch", "mlx-rs")
BATCH = 4
SETTINGS = {
    "trainable": "full",
    "optimizer": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01, "bias_correction": True},
    "schedule": {"kind": "constant"},
    "clip_norm": 1.0,
    "accum_steps": 1,
}


@dataclass(frozen=True)
class Size:
    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    seq_len: int

    def config(self):
        from mlx_parity.reference.config import ModelConfig
        from mlx_parity.reference.data import VOCAB_SIZE

        return ModelConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        )

    @property
    def tokens(self) -> int:
        return BATCH * self.seq_len


SIZES = {
    "1M": Size("1M", hidden=128, layers=6, intermediate=352, heads=4, kv_heads=2, head_dim=32, seq_len=128),
    "5M": Size("5M", hidden=256, layers=8, intermediate=544, heads=4, kv_heads=2, head_dim=64, seq_len=128),
    "20M": Size("20M", hidden=512, layers=8, intermediate=1088, heads=8, kv_heads=4, head_dim=64, seq_len=256),
}


def param_count(size: Size) -> int:
    c = size.config()
    d, hd = c.hidden_size, c.head_dim
    attn = d * c.num_attention_heads * hd * 2 + d * c.num_key_value_heads * hd * 2
    layer = attn + 3 * d * c.intermediate_size + 2 * d
    return 2 * c.vocab_size * d + d + c.num_hidden_layers * layer


def make_batch(size: Size, seed: int = 0) -> dict[str, np.ndarray]:
    """A full batch (no padding) of random byte tokens with provenance values in range."""
    from mlx_parity.reference.data import OFFSET, VOCAB_SIZE

    rng = np.random.default_rng(seed)
    return {
        "input_ids": rng.integers(OFFSET, VOCAB_SIZE, size=(BATCH, size.seq_len), dtype=np.int32),
        "attention_mask": np.ones((BATCH, size.seq_len), np.int32),
        "auth_weight": rng.uniform(0.0, 0.9, BATCH).astype(np.float32),
        "prov_entropy": rng.uniform(0.0, 3.0, BATCH).astype(np.float32),
    }


def ensure_checkpoint(size: Size, root: Path) -> Path:
    """The size's initial Hugging Face checkpoint under `root` (built once, seed 0)."""
    out = root / f"llama-{size.name}"
    if not (out / "config.json").exists():
        from mlx_parity.reference.train_cli import init_checkpoint

        init_checkpoint(size.config(), out, seed=0)
    return out


# --- one backend in this process (used by bench/conftest.py) -------------------------------------------


def mlx_rs_unavailable() -> str | None:
    try:
        import parity_mlx_rs  # noqa: F401
    except ImportError as e:
        return f"not built ({e}); build it with rust/build.sh"
    return None


def set_threads(backend: str, threads: int) -> None:
    if backend == "torch":
        import torch

        torch.set_num_threads(threads)


def backend_threads(backend: str) -> int | None:
    if backend == "torch":
        import torch

        return torch.get_num_threads()
    from mlx_parity.reference.blas import active

    return active().threads


class Runner:
    """One backend's trainer on a checkpoint, with the operations the suite times. Every method returns
    only after the work is done (MLX is lazy: each evaluates what it computes)."""

    def __init__(self, backend: str, checkpoint: Path):
        self.backend, self.checkpoint = backend, checkpoint
        self.t = self.load()

    def load(self):
        from mlx_parity.reference.settings import TrainSettings

        settings = TrainSettings.from_dict(SETTINGS)
        if self.backend == "mlx":
            from mlx_parity.reference.trainer import Trainer

            return Trainer.from_pretrained(self.checkpoint, settings)[0]
        if self.backend == "torch":
            from .torch_twin import TwinTrainer

            return TwinTrainer.from_pretrained(self.checkpoint, settings)[0]
        import parity_mlx_rs

        return parity_mlx_rs.Trainer(str(self.checkpoint), json.dumps(SETTINGS), None, True)

    def forward(self, ids):
        if self.backend == "mlx":
            import mlx.core as mx

            logits, hidden = self.t.model.forward(mx.array(ids))
            mx.eval(logits, hidden)
            return logits
        return self.t.forward(ids)

    def loss(self, batch):
        return self.t.loss(batch)

    def gradients(self, batch):
        return self.t.gradients(batch)

    def step(self, batch):
        return self.t.step(batch)

    def save(self, path: Path):
        self.t.save_checkpoint(path) if self.backend != "mlx-rs" else self.t.save_checkpoint(str(path))


def versions() -> dict:
    """Installed versions, read from package metadata (the parent process imports no framework)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for mod, dist in (("mlx", "mlx"), ("torch", "torch"), ("numpy", "numpy"), ("parity_mlx_rs", "parity-mlx-rs")):
        try:
            out[mod] = version(dist)
        except PackageNotFoundError:
            out[mod] = "not installed"
    return out


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --- the parent: processes, aggregation, report ---------------------------------------------------------


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem,
    }


def _env(backend: str, threads: int, workdir: Path) -> dict:
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
    """Run the suite as described in the module docstring; returns the JSON-able results."""
    from mlx_parity.reference import blas

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
        "versions": versions(),
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


def summarize(raw: list[dict], peak: float | None) -> tuple[list[dict], list[dict]]:
    steps = {}
    stage_rows = []
    for b in raw:
        e, st = b["extra_info"], b["stats"]
        row = {
            "backend": e["backend"],
            "size": e["size"],
            "params": e["params"],
            "tokens": e["tokens"],
            "threads": e["threads"],
            "rounds": st["rounds"],
            "median_s": st["median"],
            "iqr_s": st["iqr"],
            "min_s": st["min"],
            "max_s": st["max"],
            "peak_rss_mb": round(e["peak_rss_mb"], 1),
        }
        if e["op"] == "step":
            steps[(e["backend"], e["size"])] = row
        else:
            row["op"] = e["op"]
            stage_rows.append(row)
    results = []
    for (backend, size), r in steps.items():
        torch_row = steps.get(("torch", size))
        flops = 6 * r["params"] * r["tokens"]
        results.append(
            {
                "backend": backend,
                "size": size,
                "params": r["params"],
                "seq_len": r["tokens"] // BATCH,
                "batch": BATCH,
                "threads": r["threads"],
                "rounds": r["rounds"],
                "step_s_median": round(r["median_s"], 5),
                "step_s_iqr": round(r["iqr_s"], 5),
                "step_s_min": round(r["min_s"], 5),
                "step_s_max": round(r["max_s"], 5),
                "tokens_per_s": round(r["tokens"] / r["median_s"], 1),
                "model_gflops": round(flops / r["median_s"] / 1e9, 2),
                "ratio_to_torch": round(r["median_s"] / torch_row["median_s"], 3) if torch_row else None,
                "share_of_peak": round(flops / r["median_s"] / 1e9 / peak, 4) if peak else None,
                "peak_rss_mb": r["peak_rss_mb"],
            }
        )
    order = {b: i for i, b in enumerate(BACKENDS)}
    results.sort(key=lambda r: (list(SIZES).index(r["size"]), order.get(r["backend"], 9)))
    stage_rows.sort(key=lambda r: (list(SIZES).index(r["size"]), r["op"], order.get(r["backend"], 9)))
    return results, stage_rows


def targets(results: list[dict]) -> list[dict]:
    """The issue's targets, judged on this run's medians."""
    by = {(r["backend"], r["size"]): r for r in results}
    out = []
    for size in ("5M", "20M"):
        r = by.get(("mlx", size))
        if r and r["ratio_to_torch"] is not None:
            out.append(
                {
                    "target": f"MLX step ≤ 1.0× torch at {size}",
                    "value": f"{r['ratio_to_torch']:.2f}×",
                    "met": r["ratio_to_torch"] <= 1.0,
                }
            )
    for size in SIZES:
        a, b = by.get(("mlx-rs", size)), by.get(("mlx", size))
        if a and b:
            ratio = a["step_s_median"] / b["step_s_median"]
            out.append({"target": f"mlx-rs step ≤ 1.05× MLX at {size}", "value": f"{ratio:.2f}×", "met": ratio <= 1.05})
    r = by.get(("mlx", "20M"))
    if r and r["share_of_peak"] is not None:
        out.append(
            {
                "target": "MLX ≥ 50% of matmul peak at 20M",
                "value": f"{100 * r['share_of_peak']:.0f}%",
                "met": r["share_of_peak"] >= 0.5,
            }
        )
    return out


def write_report(out: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    png = path.with_suffix(".png")
    plot(out["results"], png)
    m, v = out["machine"], out["versions"]
    b = out["blas_detail"]
    lines = [
        "# parity bench",
        "",
        f"Made by `{out['command']}` in {out['seconds']:.0f} s ({'quick' if out['quick'] else 'full'} run).",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['platform']}",
        f"- load average before/after (other work on the machine slows every backend alike): "
        f"{' '.join(map(str, out['load_average']['before']))} / {' '.join(map(str, out['load_average']['after']))}",
        "- versions: " + ", ".join(f"{k} {x}" for k, x in v.items()),
        f"- BLAS for MLX: {out['blas']}"
        + (
            f" — `{b['config']}`, libmlx.so's cblas_sgemm → `{Path(b['resolved_cblas_sgemm']).name}`"
            if b.get("config") and b.get("resolved_cblas_sgemm")
            else ""
        ),
        f"- threads per backend process: {out['threads']} (OMP/MKL/OPENBLAS_NUM_THREADS, torch.set_num_threads); "
        "every backend and size ran in its own process, one after another",
        f"- float32 matmul peak of this machine: {out['peak_gflops']} GFLOP/s (best of "
        + ", ".join(f"{k} {x}" for k, x in out["peak_by_library"].items())
        + ")",
        f"- step: AdamW, full fine-tuning, global-norm clipping, B={BATCH}; model FLOPs = 6 · params · tokens; "
        "median and IQR over the timed rounds, warm-up rounds left out; peak RSS is the process's (in a full run it "
        "includes the stage benchmarks, which ran first)",
        "",
        "| backend | size | params | T | step median (s) | IQR (s) | min–max (s) | tokens/s | ratio to torch | share of peak | peak RSS (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in out["results"]:
        ratio = f"{r['ratio_to_torch']:.2f}×" if r["ratio_to_torch"] is not None else "—"
        share = f"{100 * r['share_of_peak']:.0f}%" if r["share_of_peak"] is not None else "—"
        lines.append(
            f"| {r['backend']} | {r['size']} | {r['params']:,} | {r['seq_len']} | {r['step_s_median']:.4f} | "
            f"{r['step_s_iqr']:.4f} | {r['step_s_min']:.4f}–{r['step_s_max']:.4f} | {r['tokens_per_s']:,.0f} | "
            f"{ratio} | {share} | {r['peak_rss_mb']:,.0f} |"
        )
    lines += ["", f"![tokens/s against model size]({png.name})", ""]
    if out["targets"]:
        lines += ["## Targets", "", "| target | this run | met |", "|---|---:|---|"]
        lines += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else 'no'} |" for t in out["targets"]]
        lines.append("")
    if out["stages"]:
        lines += [
            "## Stages (median seconds)",
            "",
            "| size | operation | "
            + " | ".join(b for b in BACKENDS if any(r["backend"] == b for r in out["stages"]))
            + " |",
        ]
        present = [b for b in BACKENDS if any(r["backend"] == b for r in out["stages"])]
        lines.append("|---|---|" + "---:|" * len(present))
        cells = {(r["size"], r["op"], r["backend"]): r["median_s"] for r in out["stages"]}
        for size in SIZES:
            for op in ("load", "forward", "loss", "gradients", "save"):
                if any((size, op, b) in cells for b in present):
                    lines.append(
                        f"| {size} | {op} | "
                        + " | ".join(f"{cells[(size, op, b)]:.4f}" if (size, op, b) in cells else "—" for b in present)
                        + " |"
                    )
        lines.append("")
    for name, why in out["skipped"].items():
        lines.append(f"- {name}: {why}")
    for name, text in out["failures"].items():
        lines += [f"- **{name} failed**:", "", "```", text.strip()[-1500:], "```"]
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def plot(results: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for backend in BACKENDS:
        rows = [r for r in results if r["backend"] == backend]
        if rows:
            ax.plot([r["params"] / 1e6 for r in rows], [r["tokens_per_s"] for r in rows], marker="o", label=backend)
    ax.set_xscale("log")
    ax.set_yscale("log")
    xs = sorted({r["params"] / 1e6 for r in results})
    ax.set_xticks(xs, [f"{x:.1f}M" for x in xs])
    ax.minorticks_off()
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("training tokens / s")
    ax.set_title("training step throughput (higher is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def print_summary(console, out: dict) -> None:
    from rich.table import Table

    t = Table(
        title=f"parity bench — BLAS for MLX: {out['blas']}; matmul peak {out['peak_gflops']} GFLOP/s; {out['threads']} threads"
    )
    for col in (
        "backend",
        "size",
        "params",
        "step median (s)",
        "IQR (s)",
        "tokens/s",
        "vs torch",
        "share of peak",
        "peak RSS (MB)",
    ):
        t.add_column(col, justify="left" if col in ("backend", "size") else "right")
    for r in out["results"]:
        t.add_row(
            r["backend"],
            r["size"],
            f"{r['params']:,}",
            f"{r['step_s_median']:.4f}",
            f"{r['step_s_iqr']:.4f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['ratio_to_torch']:.2f}×" if r["ratio_to_torch"] is not None else "—",
            f"{100 * r['share_of_peak']:.0f}%" if r["share_of_peak"] is not None else "—",
            f"{r['peak_rss_mb']:,.0f}",
        )
    console.print(t)
    for tg in out["targets"]:
        console.print(f"{'✓' if tg['met'] else '✗'} {tg['target']}: {tg['value']}")
    for name, why in out["skipped"].items():
        console.print(f"[yellow]{name} skipped:[/] {why}")
    for name in out["failures"]:
        console.print(f"[red]{name} failed[/] (see the report)")


# --- the GPU bench: MLX-CUDA against torch-CUDA (`parity bench --device gpu`, docs/gpu.md) -------------------

GPU_WORKER = BENCH_DIR / "gpu.py"
GPU_PRECISIONS = ("fp32", "tf32", "bf16")
PRECISION_LABEL = {"fp32": "float32, TF32 off", "tf32": "float32, TF32 on", "bf16": "bfloat16"}


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
    sys.path.insert(0, str(BENCH_DIR))
    from gpu import GPU_SIZES, PRECISIONS  # noqa: E402  (bench/gpu.py: no package import, runs as a script too)

    sys.path.pop(0)
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
        "versions": versions(),
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


def gpu_table(rows: list[dict]) -> list[dict]:
    """One row per (size, precision): torch's step, each MLX variant's, the best MLX over torch."""
    out = []
    keys = []
    for r in rows:
        if (r["size"], r["precision"]) not in keys:
            keys.append((r["size"], r["precision"]))
    for size, prec in keys:
        rs = [r for r in rows if r["size"] == size and r["precision"] == prec and "median_s" in r]
        torch_r = next((r for r in rs if r["framework"] == "torch"), None)
        mlx_rs = {r["variant"]: r for r in rs if r["framework"] == "mlx"}
        best = min(mlx_rs.values(), key=lambda r: r["median_s"], default=None)
        errors = {
            f"{r['framework']} {r['variant']}": r["error"]
            for r in rows
            if r["size"] == size and r["precision"] == prec and "error" in r
        }
        out.append(
            {
                "size": size,
                "precision": prec,
                "params": (torch_r or best or {}).get("params"),
                "tokens": (torch_r or best or {}).get("tokens"),
                "torch_ms": torch_r and 1e3 * torch_r["median_s"],
                "mlx_ms": {v: 1e3 * r["median_s"] for v, r in mlx_rs.items()},
                "best_mlx": best and best["variant"],
                "ratio": (best["median_s"] / torch_r["median_s"]) if best and torch_r else None,
                "torch_tokens_s": torch_r and torch_r["tokens_per_s"],
                "mlx_tokens_s": best and best["tokens_per_s"],
                "torch_share": torch_r and torch_r.get("share_of_peak"),
                "mlx_share": best and best.get("share_of_peak"),
                "errors": errors,
            }
        )
    return out


def gpu_markdown(out: dict) -> str:
    def ms(v):
        return "—" if v is None else f"{v:.1f}"

    def pct(v):
        return "—" if v is None else f"{100 * v:.0f}%"

    variants = sorted({v for row in out["table"] for v in row["mlx_ms"]})
    lines = [
        f"# parity bench --device {out['device']}",
        "",
        f"GPU: {out.get('gpu')}; {out['versions']}; {out['steps']} timed steps after {out['warmup']} warm-up steps, median; "
        f"{out['seconds']} s in all. Command: `{out['command']}`.",
        "",
        "Measured dense-matmul peak (8192³, TFLOP/s): "
        + "; ".join(
            f"{PRECISION_LABEL.get(p, p)}: " + ", ".join(f"{fw} {v:.0f}" for fw, v in sorted(d.items()))
            for p, d in out["peak_tflops"].items()
        ),
        "",
        "| size | params | tokens/step | precision | torch ms | "
        + " | ".join(f"MLX {v} ms" for v in variants)
        + " | best MLX / torch | torch tokens/s | best MLX tokens/s | torch % of peak | MLX % of peak |",
        "|" + "---|" * (10 + len(variants)),
    ]
    for r in out["table"]:
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}× ({r['best_mlx']})"
        tok_t = "—" if r["torch_tokens_s"] is None else f"{r['torch_tokens_s']:,.0f}"
        tok_m = "—" if r["mlx_tokens_s"] is None else f"{r['mlx_tokens_s']:,.0f}"
        params = "—" if r["params"] is None else f"{r['params'] / 1e6:.1f}M"
        cells = [
            r["size"],
            params,
            str(r["tokens"]),
            PRECISION_LABEL.get(r["precision"], r["precision"]),
            ms(r["torch_ms"]),
            *(ms(r["mlx_ms"].get(v)) for v in variants),
            ratio,
            tok_t,
            tok_m,
            pct(r["torch_share"]),
            pct(r["mlx_share"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    prof = out.get("gemm_profile") or []
    if prof:
        lines += [
            "",
            f"Where the time goes at {prof[0]['size']}: the step's matrix products timed alone, summed (ms per step; "
            "the step above minus this is everything else: attention, norms, elementwise, the optimizer, launches):",
            "",
            "| precision | torch GEMMs ms | MLX GEMMs ms | MLX / torch | slowest MLX GEMM vs torch |",
            "|---|---|---|---|---|",
        ]
        for prec in dict.fromkeys(g["precision"] for g in prof):
            by = {g["framework"]: g for g in prof if g["precision"] == prec}
            if "torch" not in by or "mlx" not in by:
                continue
            t, m = by["torch"], by["mlx"]
            worst = max(zip(m["gemms"], t["gemms"]), key=lambda p: p[0]["ms"] / p[1]["ms"])
            lines.append(
                f"| {PRECISION_LABEL.get(prec, prec)} | {t['total_ms']:.1f} | {m['total_ms']:.1f} | {m['total_ms'] / t['total_ms']:.2f}× | "
                f"{worst[0]['gemm']} {worst[0]['shape']}: {worst[0]['ms']:.2f} vs {worst[1]['ms']:.2f} ms |"
            )
    errs = [(r["size"], r["precision"], k, v) for r in out["table"] for k, v in r["errors"].items()]
    if errs or out["failures"] or out["skipped"]:
        lines += ["", "Not measured:"]
        lines += [f"- {s} {p} {k}: {v}" for s, p, k, v in errs]
        lines += [
            f"- {k}: worker failed: {v.strip().splitlines()[-1] if v.strip() else '?'}"
            for k, v in out["failures"].items()
        ]
        lines += [f"- {k}: skipped (time budget)" for k in out["skipped"]]
    lines += [
        "",
        "Model FLOPs per step: 6 × (parameters except the embedding table) × tokens + 12 × layers × heads × head_dim × T × tokens "
        "(attention, causal mask not halved); % of peak is that rate over the measured matmul peak of the same precision.",
    ]
    return "\n".join(lines) + "\n"


def print_gpu_summary(console, out: dict) -> None:
    console.print(gpu_markdown(out), markup=False, highlight=False)
