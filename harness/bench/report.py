"""The bench's presentation: the Markdown report (with the plot beside it) and the terminal table, of the
CPU bench and of the GPU bench, from the summaries in `stats`."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from .plot import plot
from .workload import BACKENDS, BATCH, SIZES

PRECISION_LABEL = {"fp32": "float32, TF32 off", "tf32": "float32, TF32 on", "bf16": "bfloat16"}


def write_report(out: dict, path: Path) -> Path:
    """The CPU bench's Markdown report at `path`, its plot beside it (same name, .png)."""
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


def print_summary(console, out: dict) -> None:
    """The CPU bench's step table, targets, skips and failures on the terminal."""
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


def gpu_markdown(out: dict) -> str:
    """The GPU bench's Markdown report: peaks, one row per size and precision, the GEMM profile, what was not measured."""

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
