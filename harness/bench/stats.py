"""Summaries of the measured timings: per-step rates and ratios from the pytest-benchmark JSON, the issue's
targets judged on them, and the GPU bench's one row per size and precision. Measuring is `session` and
`gpu`; presenting is `report` and `plot`."""

from __future__ import annotations

from .workload import BACKENDS, BATCH, SIZES


def summarize(raw: list[dict], peak: float | None) -> tuple[list[dict], list[dict]]:
    """pytest-benchmark's benchmarks as step rows (rates, ratio to torch, share of peak) and stage rows,
    ordered by size, then backend."""
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
