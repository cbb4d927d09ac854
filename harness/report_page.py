"""A report file: Markdown (PNG plots beside it) or one self-contained HTML page (plots inline),
with the stage table, the diagnoses and the plots people would rather look at than read."""

from __future__ import annotations

import base64
import html
import io
import platform
from pathlib import Path

from .audit import AuditResult, StageResult
from .report import SHORT, format_evidence, results_json


def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _bar(ax, names, values, title):
    ys = [max(v, 1e-6) for v in values]
    colors = ["#c0392b" if v > 1 else "#2e86c1" for v in values]
    ax.barh(range(len(names)), ys, color=colors)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", lw=1, ls="--")
    ax.set_xlabel("error / tolerance bound (> 1 fails)")
    ax.set_title(title, fontsize=10)
    ax.invert_yaxis()


def plots(result: AuditResult) -> list[tuple[str, bytes]]:
    """(caption, PNG) for the stages whose shape a picture shows best."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    by = {s.name: s for s in result.stages}
    fwd = by.get("forward")
    if fwd and fwd.tensors:
        layers = sorted(
            (t for t in fwd.tensors if t.name.startswith("forward.hidden.")),
            key=lambda t: int(t.name.rsplit(".", 1)[1]),
        )
        layers += [t for t in fwd.tensors if t.name == "forward.logits"]
        fig, ax = plt.subplots(figsize=(6, 3))
        xs = [t.name.removeprefix("forward.").replace("hidden.", "layer ") for t in layers]
        ax.plot(xs, [max(t.ratio, 1e-6) for t in layers], marker="o")
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", lw=1, ls="--")
        ax.set_ylabel("error / tolerance bound")
        ax.set_title(f"{result.backend} on {result.fixture}: error along the forward pass", fontsize=10)
        out.append(
            (
                "Error per layer along the forward pass (first point above the line: first divergent layer)",
                _figure_png(fig),
            )
        )
    for stage, caption in (
        ("gradients", "Error per parameter: gradients"),
        ("optimizer", "Error per tensor after one update (Δθ, m, v)"),
    ):
        st = by.get(stage)
        if st and st.tensors and st.status == "fail":
            tensors = sorted(st.tensors, key=lambda t: -t.ratio)[:30]
            fig, ax = plt.subplots(figsize=(7, 0.22 * len(tensors) + 1.2))
            _bar(
                ax,
                [t.name.split(".", 1)[1] for t in tensors],
                [t.ratio if not t.problem else 1e3 for t in tensors],
                f"{result.backend} on {result.fixture}: {stage}",
            )
            out.append((caption + " (worst 30; an absent tensor is drawn at 1000)", _figure_png(fig)))
    traj = by.get("trajectory")
    if traj and traj.series and traj.status == "fail":
        port, ref = traj.series["port"], traj.series["reference"]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3))
        steps = range(1, len(ref) + 1)
        a1.plot(steps, ref, marker="o", label="reference")
        a1.plot(range(1, len(port) + 1), port, marker="x", label=result.backend[:30])
        a1.set_xlabel("update")
        a1.set_ylabel("total loss")
        a1.legend(fontsize=7)
        n = min(len(port), len(ref))
        a2.semilogy(range(1, n + 1), [max(abs(p - r), 1e-9) for p, r in zip(port, ref)], marker="o", color="#c0392b")
        a2.set_xlabel("update")
        a2.set_ylabel("|loss difference|")
        fig.suptitle(f"{result.backend} on {result.fixture}: trajectory divergence", fontsize=10)
        fig.subplots_adjust(wspace=0.45)
        out.append(("The trajectory's divergence over the updates", _figure_png(fig)))
    return out


def _machine() -> str:
    import mlx.core as mx

    return f"{platform.machine()} {platform.system()}, Python {platform.python_version()}, MLX {mx.__version__}"


def _table_rows(results: list[AuditResult]) -> tuple[list[str], list[list[str]]]:
    stages = [s.name for s in results[0].stages] if results else []
    header = ["fixture", "backend"] + [SHORT.get(s, s) for s in stages] + ["verdict"]
    rows = [[r.fixture, r.backend] + [s.status for s in r.stages] + [r.verdict] for r in results]
    return header, rows


def _failed(results: list[AuditResult]) -> list[tuple[AuditResult, list[tuple[StageResult, object]], list]]:
    """Each failing audit with its findings (and their stage results) and its inherited failures."""
    out = []
    for r in results:
        found, inherited = r.findings()
        if found or inherited:
            by_name = {s.name: s for s in r.stages}
            out.append((r, [(by_name[f.stage], f) for f in found], inherited))
    return out


def _inherited_text(inherited) -> str:
    return "; ".join(f"{i.stage} ({i.describe()})" for i in inherited)


def write_report(path: Path, results: list[AuditResult]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    if path.suffix == ".html":
        tmp.write_text(render_html(results))
    else:
        files = path.with_name(path.stem + "_files")
        tmp.write_text(render_markdown(results, files, path.parent))
    tmp.replace(path)


def render_markdown(results: list[AuditResult], files: Path, base: Path) -> str:
    header, rows = _table_rows(results)
    lines = [
        "# parity audit",
        "",
        f"Machine: {_machine()}. {sum(r.verdict == 'pass' for r in results)}/{len(results)} audits passed.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    failures = _failed(results)
    if failures:
        files.mkdir(parents=True, exist_ok=True)
    for i, (r, found, inherited) in enumerate(failures):
        lines += ["", f"## {r.backend} on {r.fixture}: {len(found)} finding(s)"]
        for st, f in found:
            lines += [
                "",
                f"### `{st.name}`: {f.code} (isolated to `{f.piece}`)",
                "",
                f"- {st.message}",
                f"- **Diagnosis** (`{f.code}`): {f.summary}",
            ]
            if f.evidence:
                lines += [f"- Evidence: {format_evidence(f.evidence, 800)}"]
            lines += [f"- Tolerance: {st.tolerance}"]
        if inherited:
            lines += [
                "",
                f"Inherited failures (each with what it follows from, or may where nothing isolated it): {_inherited_text(inherited)}.",
            ]
        for j, (caption, png) in enumerate(plots(r)):
            f = files / f"{i:02d}-{j}.png"
            f.write_bytes(png)
            lines += ["", f"![{caption}]({f.relative_to(base).as_posix()})", "", f"*{caption}*"]
    return "\n".join(lines) + "\n"


def render_html(results: list[AuditResult]) -> str:
    header, rows = _table_rows(results)
    colour = {"pass": "#1e8449", "fail": "#c0392b", "skip": "#b7950b"}
    cell = lambda v: f'<td style="color:{colour.get(v, "inherit")}">{html.escape(v)}</td>'  # noqa: E731
    parts = [
        "<!doctype html><meta charset='utf-8'><title>parity audit</title>",
        "<style>body{font:14px system-ui,sans-serif;max-width:1100px;margin:2em auto}td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
        "code{background:#f4f4f4}</style>",
        "<h1>parity audit</h1>",
        f"<p>Machine: {html.escape(_machine())}. {sum(r.verdict == 'pass' for r in results)}/{len(results)} audits passed.</p>",
        "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>",
    ]
    parts += ["<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows]
    parts.append("</table>")
    for r, found, inherited in _failed(results):
        parts.append(f"<h2>{html.escape(r.backend)} on {html.escape(r.fixture)}: {len(found)} finding(s)</h2>")
        for st, f in found:
            parts.append(
                f"<h3><code>{st.name}</code>: {html.escape(f.code)} (isolated to <code>{html.escape(f.piece)}</code>)</h3>"
            )
            parts.append(f"<p>{html.escape(st.message)}</p>")
            parts.append(f"<p><b>Diagnosis</b> (<code>{html.escape(f.code)}</code>): {html.escape(f.summary)}</p>")
            if f.evidence:
                parts.append(f"<p>Evidence: {html.escape(format_evidence(f.evidence, 800))}</p>")
            parts.append(f"<p>Tolerance: {html.escape(st.tolerance)}</p>")
        if inherited:
            parts.append(
                f"<p>Inherited failures (each with what it follows from, or may where nothing isolated it): {html.escape(_inherited_text(inherited))}.</p>"
            )
        for caption, png in plots(r):
            data = base64.b64encode(png).decode()
            parts.append(
                f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'><figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    return "\n".join(parts) + "\n"


__all__ = ["write_report", "render_html", "render_markdown", "plots", "results_json"]
