"""Audit results for people (a rich table; colour only on a terminal) and for programs (JSON)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .audit import AuditResult
from .false_alarm import OWN_MODELLED, TARGET
from .stages import ALL_STAGES, LAUNCHED_STAGES, REGISTRY

# 2: errors are measured against the float64 truth; "margin" per stage. 3: the margin (and each tensor's "ratio")
# leaves out the part of an error its element's sensitivity explains (harness/compare.py); verdicts are unchanged
JSON_SCHEMA_VERSION = 3
STYLE = {"pass": "green", "fail": "bold red", "skip": "yellow", "not checked": "yellow"}
SHORT = {n: s.label for n, s in REGISTRY.items()}  # each stage's column


def results_json(results: list[AuditResult]) -> dict:
    return {
        "schema_version": JSON_SCHEMA_VERSION,
        "stages": list(ALL_STAGES)
        + [s for s in LAUNCHED_STAGES if any(x.name == s for r in results for x in r.stages)],
        "results": [r.to_dict() for r in results],
    }


def format_evidence(evidence: dict, limit: int = 400) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v[:8]) + (", …" if len(v) > 8 else "") + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}: {fmt(x)}" for k, x in list(v.items())[:6]) + "}"
        return str(v)

    text = "; ".join(f"{k} = {fmt(v)}" for k, v in evidence.items())
    return text if len(text) <= limit else text[:limit] + " …"


def print_results(console: Console, results: list[AuditResult], verbose: bool = False) -> None:
    stages = [s.name for s in results[0].stages] if results else []
    table = Table(title="parity audit", show_lines=False)
    table.add_column("fixture")
    table.add_column("backend")
    for s in stages:
        table.add_column(SHORT.get(s, s), justify="center")
    table.add_column("verdict")
    for r in results:
        cells = [
            f"[{STYLE[s.status]}]{s.status}[/]"
            + (
                f" {s.margin:.2f}"
                if s.status != "skip" and not s.message.startswith(("the port", "timed out")) and s.tensors
                else ""
            )
            for s in r.stages
        ]
        table.add_row(escape(r.fixture), escape(r.backend), *cells, f"[{STYLE[r.verdict]}]{r.verdict}[/]")
    console.print(table)
    console.print(
        "each cell: status and margin, the largest error / bound of the stage, each less the part its "
        "conditioning explains (at most 1 passes)",
        highlight=False,
    )
    unchecked: dict[str, set] = {}
    for r in results:
        by_name = {s.name: s for s in r.stages}
        for s in r.stages:
            if s.status == "not checked":
                unchecked.setdefault(f"{r.backend}: {s.name} ({s.message})", set()).add(r.fixture)
        skipped = [s for s in r.stages if s.status == "skip"]
        if skipped:
            console.print(
                f"[yellow]skip[/] {escape(r.backend)} on {escape(r.fixture)}: {escape(skipped[0].message)}",
                highlight=False,
            )
        found, inherited = r.findings()
        for f in found:  # the distinct findings; what follows from them is named, not repeated
            s = by_name[f.stage]
            console.print(
                f"[bold red]fail[/] {escape(r.backend)} on {escape(r.fixture)}, stage {s.name}: {escape(s.message)}",
                highlight=False,
            )
            console.print(f"    [bold]diagnosis[/] ({escape(f.code)}): {escape(f.summary)}", highlight=False)
            if f.evidence:
                console.print(f"    evidence: {escape(format_evidence(f.evidence))}", highlight=False)
        origins: dict[tuple, list[str]] = {}
        for i in inherited:
            origins.setdefault((tuple(i.from_stages), i.isolated), []).append(i.stage)
        for (origin, isolated), followers in origins.items():
            how = "fail as a consequence of" if isolated else "fail and may follow from (not isolated)"
            console.print(f"    inherited: {', '.join(followers)} {how} {', '.join(origin)}", highlight=False)
        if verbose:
            for s in r.stages:
                for t in s.failures:
                    console.print(f"    {escape(t.describe())}", highlight=False)
    for what, fixtures in unchecked.items():
        console.print(f"[yellow]not checked[/] {escape(what)} on {len(fixtures)} fixture(s)", highlight=False)
    if any(r.findings()[1] for r in results) and not verbose:
        console.print("(-v lists every failing tensor of every stage)", highlight=False)
    print_false_alarm(console, results, verbose)
    passed = sum(r.verdict == "pass" for r in results)
    console.print(f"{passed}/{len(results)} audits passed")


def print_false_alarm(console: Console, results: list[AuditResult], verbose: bool) -> None:
    """How likely a correct port is to fail each fixture by chance (harness/false_alarm.py): the same for every
    backend on one fixture, so one line, the fixtures over TARGET named (every one with -v)."""
    per_fixture = {}
    for r in results:
        fa = r.false_alarm()
        if fa["estimated"]:
            per_fixture[r.fixture] = fa
    if not per_fixture:
        return
    worst = max(per_fixture, key=lambda f: per_fixture[f]["probability"])
    shown = per_fixture if verbose else {f: v for f, v in per_fixture.items() if v["probability"] > TARGET}
    listed = "; ".join(f"{f} {v['probability']:.2g} ({v['largest']})" for f, v in sorted(shown.items()))
    label = "" if verbose else f"above {TARGET:g}: "
    console.print(
        f"chance a correct port fails by rounding alone (if its rounding is distributed like the reference's own; "
        f"docs/tolerances.md): at most {per_fixture[worst]['probability']:.2g} per audit"
        + (f", on {worst}" if len(per_fixture) > 1 else "")
        + (f"; {label}{listed}" if listed else ""),
        highlight=False,
    )
    unmodelled = []
    for r in results:
        low = [f"{stage} {p:.2g}" for stage, p in r.false_alarm()["own"].items() if p < OWN_MODELLED]
        if low and r.verdict == "pass":
            unmodelled.append(f"{r.backend} on {r.fixture} ({', '.join(low)})")
    if unmodelled:
        console.print(
            f"it does not hold where a passing backend errs beyond what the reference's noise reaches with probability "
            f"{OWN_MODELLED:g}: " + "; ".join(unmodelled),
            highlight=False,
        )
