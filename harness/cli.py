"""`parity`: audit a backend against the golden fixtures, manage the fixtures, train the reference."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from mlx_parity.reference.blas import report as blas_report
from mlx_parity.reference.train_cli import run_training

from . import device as D
from . import selftest as st
from .case import FIXTURES_DIR
from .errors import FixtureError
from .false_alarm import OWN_MODELLED
from .fixtures.specs import SPECS
from .report import print_results, results_json
from .report_page import write_report
from .session import AuditInputError, open_session

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
fixtures_app = typer.Typer(help="Generate and verify the golden fixtures.", no_args_is_help=True)
app.add_typer(fixtures_app, name="fixtures")
console = Console(stderr=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    tmp.replace(path)


def fail_input(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(2)


@app.command()
def audit(
    fixture: list[str] | None = typer.Option(
        None, "--fixture", "-f", help="Fixture name (repeatable); default: every bundled fixture."
    ),
    backend: list[str] | None = typer.Option(
        None, "--backend", "-b", help="Backend (repeatable): mlx, torch; default: every available one."
    ),
    stage: list[str] | None = typer.Option(
        None, "--stage", "-s", help="Only these stages (repeatable); default: all eight and the isolated checks."
    ),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the results as JSON to this path."),
    report: Path | None = typer.Option(
        None, "--report", help="Write a Markdown (.md) or self-contained HTML (.html) report with plots."
    ),
    fixtures_dir: Path = typer.Option(None, "--fixtures-dir", help="Folder of fixtures (default: the bundled ones)."),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds each stage of a cmd: backend may take."),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="List every failing tensor and stage, not only the first."
    ),
    device: str = typer.Option(
        "cpu", "--device", help="Where mlx and torch compute: cpu, or gpu (MLX-CUDA and torch CUDA; docs/gpu.md)."
    ),
    tf32: bool = typer.Option(
        False,
        "--tf32",
        help="On --device gpu, let float32 matmuls use TF32 and judge with the TF32 bound (default: off, true float32).",
    ),
    checkpoint: Path | None = typer.Option(
        None,
        "--checkpoint",
        help="Audit on goldens computed now from this Hugging Face checkpoint (kept nowhere), instead of stored fixtures.",
    ),
    data: Path | None = typer.Option(
        None,
        "--data",
        help="With --checkpoint: the batch's text, JSONL records or plain lines, through the checkpoint's tokenizer.",
    ),
    layers: int | None = typer.Option(
        None, "--layers", help="With --checkpoint: keep the first N layers (default: all)."
    ),
    vocab: int | None = typer.Option(
        None, "--vocab", help="With --checkpoint: keep N vocabulary rows (the batch's tokens first)."
    ),
    settings: Path | None = typer.Option(
        None,
        "--settings",
        help="With --checkpoint: settings.json keys over the defaults (LoRA rank 8 on "
        'every kept layer, 3 steps), e.g. {"precision": "bfloat16"} or {"trainable": "full"}.',
    ),
    world_size: int = typer.Option(
        1,
        "--world-size",
        "-n",
        help="Also train data-parallel on N ranks (the backend's own launcher on this CPU: mlx.launch, torchrun) and "
        "judge them as one process of N × accum_steps micro-batches, and against each other bit for bit "
        "(the data_parallel stage; docs/training-step.md).",
    ),
    launcher: str = typer.Option(
        "mlx",
        "--launcher",
        help="With --world-size and a cmd: backend: what starts the adapter once per rank, by its engine's "
        "convention: mlx (mlx.launch: MLX_RANK, MLX_HOSTFILE) or torch (torchrun: RANK, WORLD_SIZE, MASTER_ADDR, "
        "MASTER_PORT). docs/protocol.md.",
    ),
) -> None:
    """Audit backends against the golden fixtures, stage by stage; or, with --checkpoint and --data,
    against goldens and a float64 truth computed now from your checkpoint (as `parity fixtures create`
    builds them, in a temporary folder deleted afterwards).

    Exit status: 0 when every stage passes, 1 when any fails, 2 for bad input.
    """
    if report and report.suffix not in (".md", ".html"):
        fail_input(f"--report must end in .md or .html, got {report.name}")
    try:
        session = open_session(
            fixtures=fixture,
            backends=backend,
            stages=stage,
            fixtures_dir=fixtures_dir,
            timeout=timeout,
            device=device,
            tf32=tf32,
            checkpoint=checkpoint,
            data=data,
            layers=layers,
            vocab=vocab,
            settings=settings,
            say=lambda what: err.print(f"goldens from {escape(str(checkpoint))}: {escape(what)}", highlight=False),
            world_size=world_size,
            launcher=launcher,
        )
    except AuditInputError as e:
        fail_input(str(e))
    for note in session.notes:
        err.print(escape(note), highlight=False)
    with console.status("") as status:
        results = session.run(progress=status.update)
    dev = session.device
    print_results(console, results, verbose=verbose)
    if dev.name == "gpu":
        console.print(
            f"device: {escape(dev.describe())}; the checkpoint stage judges the resume against the measured "
            "run-to-run spread of two uninterrupted runs, at least 8 ulp, plus each update's sensitivity (docs/gpu.md)",
            highlight=False,
        )
    if json_path:
        write_atomic(json_path, json.dumps(results_json(results) | {"device": dev.to_dict()}, indent=2) + "\n")
        console.print(f"JSON written to {json_path}")
    if report:
        write_report(report, results)
        console.print(f"report written to {report}")
    session.close()
    raise typer.Exit(1 if any(r.verdict == "fail" for r in results) else 0)


@app.command()
def selftest(
    json_path: Path | None = typer.Option(None, "--json", help="Write the self-test results as JSON."),
    protocol: bool = typer.Option(
        True, "--protocol/--no-protocol", help="Also run every mutant through the cmd: protocol (slower)."
    ),
) -> None:
    """Prove that bugs are found and named: every mutant on every fixture, bugs combined, no false alarm.

    The matrix shows, per mutant and fixture, whether the audit names the injected cause as one of its
    findings (N), fails without naming it (l), passes (.) or cannot build the bug there (-); bold cells
    are the fixtures built to expose it. Then bugs injected together, DESIGN.md's porting-bug list, the
    cmd: protocol and the Rust ports' injected bugs (mlx-rs, candle). Exit 0 only when every exposing cell and every
    combined bug is named and no correct backend fails.
    """

    extra = st.rust_mutants()
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("self-test", total=st.count_jobs(protocol, extra))
        result = st.run(
            protocol, progress=lambda what: progress.update(task, advance=1, description=what[:60]), extra=extra
        )
    fixtures = list(result["matrix"][0]["cells"]) if result["matrix"] else []
    table = Table(
        title="parity selftest: the matrix (N named, l localised only, . passed, - not applicable; bold: built to expose it)"
    )
    table.add_column("mutant")
    table.add_column("cause")
    for f in fixtures:
        table.add_column(f, justify="center")
    table.add_column("ok")
    table.add_column("other causes")
    mark = {"named": "N", "localised": "l", "passed": ".", "not applicable": "-"}
    for row in result["matrix"]:
        cells = [(f"[bold]{mark[c]}[/]" if f in row["exposing_fixtures"] else mark[c]) for f, c in row["cells"].items()]
        wrong = sorted({c for codes in row["other_causes"].values() for c in codes})
        table.add_row(
            escape(row["mutant"]),
            escape(row["expected_diagnosis"]),
            *cells,
            "[green]yes[/]" if row["named_where_exposed"] else "[bold red]NO[/]",
            f"[bold red]{len(row['other_causes'])}: {escape(', '.join(wrong))}[/]" if wrong else "-",
        )
    console.print(table)
    combos = Table(title="bugs together (DESIGN.md's list marked *)")
    for col in ("fixture", "mutants", "named", "localised only", "missed", "other causes"):
        combos.add_column(col)
    for c in result["combinations"]:
        by = {k: [m for m, v in c["outcome"].items() if v == k] for k in ("named", "localised", "missed")}
        combos.add_row(
            c["fixture"] + (" *" if c["design_list"] else ""),
            escape(", ".join(c["mutants"])),
            *(escape(", ".join(by[k])) or "-" for k in ("named", "localised", "missed")),
            escape(", ".join(c["other_causes"])) or "-",
        )
    console.print(combos)
    if result["mutants"]:
        runs = Table(title="through the protocol and the Rust port")
        for col in ("mutant", "via", "fixture", "findings", "named", "other causes"):
            runs.add_column(col)
        for m in result["mutants"]:
            runs.add_row(
                escape(m["name"]),
                m["via"],
                m["fixture"],
                escape(", ".join(m["findings"])),
                "[green]yes[/]" if m["named_as_finding"] else "[bold red]NO[/]",
                escape(", ".join(m["other_causes"])) or "-",
            )
        console.print(runs)
    named = sum(r["named_where_exposed"] for r in result["matrix"])
    console.print(
        f"{named}/{len(result['matrix'])} mutants named on every fixture that exposes them; "
        f"{sum(c['all_named'] for c in result['combinations'])}/{len(result['combinations'])} combinations with every bug named; "
        f"{sum(m['named_as_finding'] for m in result['mutants'])}/{len(result['mutants'])} protocol and Rust runs named"
    )
    console.print(
        f"causes stated besides the injected ones (each wrong): {result['cells_with_other_causes']} matrix cells, "
        f"{sum(bool(c['other_causes']) for c in result['combinations'])} combinations, "
        f"{sum(bool(m['other_causes']) for m in result['mutants'])} protocol and Rust runs"
    )
    console.print(
        f"DESIGN.md's list, each bug alone: {', '.join(f'{n}' + ('' if ok else ' (NOT named)') for n, ok in result['design_list_alone'].items())}"
    )
    console.print(
        f"false alarms on correct backends ({', '.join(result['correct_backends'])}): {result['false_alarms']}"
    )
    for fa in result["false_alarm_details"]:
        console.print(
            f"[bold red]false alarm[/] {escape(fa['backend'])} on {fa['fixture']} at {fa['stage']}: {escape(fa['message'])}",
            highlight=False,
        )
    if json_path:
        write_atomic(json_path, json.dumps(result, indent=2) + "\n")
        console.print(f"JSON written to {json_path}")
    raise typer.Exit(0 if result["passed"] else 1)


@fixtures_app.command("generate")
def fixtures_generate(
    name: list[str] | None = typer.Argument(None, help="Fixtures to build (default: all)."),
    force: bool = typer.Option(False, "--force", help="Replace existing goldens that changed, showing what changed."),
    fixtures_dir: Path = typer.Option(None, "--fixtures-dir", help="Where to write (default: the bundled folder)."),
) -> None:
    """Build the fixtures; each is written only when the torch twin and transformers agree with MLX."""
    from .fixtures.build import generate  # the torch twin: an optional extra, kept out of start-up

    todo = [s for s in SPECS if not name or s.name in name]
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("building fixtures", total=len(todo))
        try:
            messages = generate(
                fixtures_dir or FIXTURES_DIR, name or None, force, progress=lambda n: progress.advance(task)
            )
        except FixtureError as e:
            progress.stop()
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
            raise typer.Exit(1) from None
    for m in messages:
        console.print(escape(m), highlight=False)


@fixtures_app.command("create")
def fixtures_create(
    name: str = typer.Argument(..., help="The new fixture's name (lowercase letters, digits, '_', '-')."),
    checkpoint: Path = typer.Option(
        ..., "--checkpoint", help="A Hugging Face checkpoint folder (config.json, safetensors, tokenizer.json)."
    ),
    fixtures_dir: Path = typer.Option(
        Path("parity-fixtures"), "--fixtures-dir", help="Where to write it, beside the folder's own manifest.json."
    ),
    layers: int | None = typer.Option(None, "--layers", help="Keep the first N decoder layers (default: all)."),
    vocab: int | None = typer.Option(
        None,
        "--vocab",
        help="Keep N vocabulary rows (default: all): every token the batch uses, then the lowest others, renumbered in order.",
    ),
    text: Path | None = typer.Option(
        None,
        "--text",
        help="Text for the batch: JSONL records (text, auth_weight, prov_entropy) or plain lines, through the checkpoint's tokenizer.",
    ),
    token_ids: Path | None = typer.Option(
        None, "--token-ids", help="Or the batch's token ids: a JSON list of lists, or .npy."
    ),
    settings: Path | None = typer.Option(
        None, "--settings", help="settings.json keys over the defaults (LoRA rank 8 on every kept layer, 3 steps)."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Rows of the batch (default: the first 4 records, fewer if there are fewer)."
    ),
    seq_len: int = typer.Option(32, "--seq-len", help="Tokens per row (longer text is cut, shorter padded)."),
    dtype: str | None = typer.Option(
        None,
        "--dtype",
        help='Store the kept weights as float32, bfloat16 or float16 (default: as stored). Training runs in the settings\' precision (float32 unless --settings says "precision": "bfloat16").',
    ),
    seed: int = typer.Option(0, "--seed", help="Seeds the LoRA adapters and any provenance the text does not give."),
    force: bool = typer.Option(False, "--force", help="Replace a fixture of that name."),
    link_checkpoint: bool = typer.Option(
        False,
        "--link-checkpoint",
        help="Keep the cut weights out of the fixture: it records "
        "the checkpoint's path and every kept tensor's sha256, and the cut is made again (into "
        "~/.cache/mlx-parity/cuts) and checked when audited. For real layers too large to store.",
    ),
) -> None:
    """A fixture from your own checkpoint: its first layers and vocabulary rows with their real shapes and
    weights, your text through its tokenizer. Written only when the torch twin and transformers agree with the
    MLX goldens; audit it with `parity audit --fixtures-dir DIR`."""
    from .fixtures.create import create  # the torch twin: an optional extra, kept out of start-up

    try:
        path = create(
            name,
            checkpoint,
            fixtures_dir,
            layers=layers,
            vocab=vocab,
            text=text,
            token_ids=token_ids,
            settings=settings,
            batch_size=batch_size,
            seq_len=seq_len,
            dtype=dtype,
            seed=seed,
            force=force,
            link=link_checkpoint,
            progress=lambda what: err.print(f"{escape(name)}: {escape(what)}", highlight=False),
        )
    except FixtureError as e:
        fail_input(str(e))
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    console.print(
        f"{escape(str(path))}: written ({size / 2**20:.1f} MiB); audit it with "
        f"`parity audit --fixtures-dir {escape(str(fixtures_dir))} -f {escape(name)}`",
        highlight=False,
    )


@fixtures_app.command("verify")
def fixtures_verify(
    fixtures_dir: Path = typer.Option(None, "--fixtures-dir"),
    no_regenerate: bool = typer.Option(False, "--no-regenerate", help="Check hashes only."),
) -> None:
    """Check every fixture file against the manifest's sha256 and that regeneration reproduces it (the spreads,
    samples of noise, are compared by their layout, not drawn again)."""
    from .fixtures.build import verify  # the torch twin: an optional extra, kept out of start-up

    root = fixtures_dir or FIXTURES_DIR
    with Progress(console=err, transient=True) as progress:
        n = (
            len(json.loads((root / "manifest.json").read_text())["fixtures"])
            if (root / "manifest.json").exists()
            else 0
        )
        task = progress.add_task("regenerating fixtures", total=n)
        problems = verify(root, regenerate=not no_regenerate, progress=lambda _: progress.advance(task))
    if problems:
        for p in problems:
            err.print(f"[red]✗[/] {escape(p)}", highlight=False)
        raise typer.Exit(1)
    console.print(
        f"all fixtures in {escape(str(root))} match the manifest"
        + (
            ""
            if no_regenerate
            else " and regenerate: inputs bit for bit, goldens bit for bit on their platform and within the bound"
            " elsewhere, the truth within 1 % of its bound, the spreads (samples of noise) by their layout"
        ),
        highlight=False,
    )


@app.command()
def calibrate(
    checkpoint: Path | None = typer.Option(
        None,
        "--checkpoint",
        help="A Hugging Face checkpoint folder: audit random configurations of it (default: the fixtures instead).",
    ),
    configs: int = typer.Option(30, "--configs", min=1, help="How many random configurations of --checkpoint."),
    seed: int = typer.Option(0, "--seed", help="Configuration i is drawn from the seed [SEED, i]."),
    backend: list[str] | None = typer.Option(
        None, "--backend", "-b", help="Correct backends to audit (repeatable; default: every one that can run here)."
    ),
    mutants: list[str] | None = typer.Option(
        None,
        "--mutant",
        "-m",
        help="Mutants to run on each configuration or fixture too (repeatable; 'all' for every one).",
    ),
    fixtures_dir: Path | None = typer.Option(
        None, "--fixtures-dir", help="Without --checkpoint: the fixtures to audit (default: the bundled ones)."
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Write every configuration, margin and finding here."),
    only: list[int] | None = typer.Option(
        None, "--only", help="Run only configuration I of the sweep (repeatable; 0-based, below --configs)."
    ),
    keep: Path | None = typer.Option(
        None, "--keep", help="Build each configuration's fixture in this folder (config<I>) and keep it."
    ),
) -> None:
    """Measure the noise the tolerances must cover: every margin of the correct backends, and each failure of
    one counted as a false alarm. With --checkpoint, on seeded random configurations (layers 1-8, vocabulary
    cut, full / LoRA / head, float32 / bfloat16, accumulation, clipping, schedules, both AdamW conventions,
    batch and sequence length), each built as a live fixture here (--keep keeps them, for --fixtures-dir later); with
    --mutant, what is still caught there.
    Exits 1 if a correct backend failed anywhere."""
    from . import calibrate as cal  # the torch twin: kept out of start-up
    from .backends import BackendError, default_backends, get_backend
    from .backends.mutants import MUTANTS

    try:
        backends = [get_backend(b) for b in backend] if backend else default_backends()
    except BackendError as e:
        fail_input(str(e))
    names = list(MUTANTS) if mutants and "all" in mutants else list(mutants or [])
    unknown = [m for m in names if m not in MUTANTS]
    if unknown:
        fail_input(f"unknown mutant(s): {', '.join(unknown)}; known: {', '.join(MUTANTS)}")
    if (only or keep) and checkpoint is None:
        fail_input("--only and --keep need --checkpoint")
    if only and not all(0 <= i < configs for i in only):
        fail_input(f"--only: configurations are 0 to {configs - 1}")
    say = lambda what: err.print(escape(what), highlight=False)  # noqa: E731
    done = []
    for conf in (
        cal.sweep(checkpoint, configs, seed, backends, names, progress=say, only=only, keep=keep)
        if checkpoint is not None
        else cal.fixture_margins(fixtures_dir or FIXTURES_DIR, backends, names)
    ):
        done.append(conf)
        result = cal.summary(done)
        if json_out:  # after every configuration: a long sweep keeps what it measured
            write_atomic(
                json_out, json.dumps({"summary": result, "configurations": [c.to_dict() for c in done]}, indent=2)
            )
    table = Table(title=f"largest margin per stage over {result['configurations']} configurations (at most 1 passes)")
    stages = sorted({s for per in result["worst_margin"].values() for s in per})
    table.add_column("backend")
    for s in stages:
        table.add_column(s, justify="right")
    for name, per in result["worst_margin"].items():
        table.add_row(name, *(f"{per[s][0]:.3g} (#{per[s][1]})" if s in per else "-" for s in stages))
    console.print(table)
    for name, counts in result["mutants"].items():
        console.print(f"{escape(name)}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), highlight=False)
    for c in result["not_built"]:
        console.print(f"configuration {c['configuration']} not built: {escape(c['error'])}", highlight=False)
    for c in done:
        if c.not_implemented:
            console.print(
                f"configuration {c.index}: not run by {', '.join(c.not_implemented)} "
                f"(not trained in {c.options.get('dtype') or 'its precision'} by that port)",
                highlight=False,
            )
    stated = result["stated_false_alarm"]
    if stated:
        worst = max(stated, key=stated.get)
        console.print(
            f"stated chance of a false alarm (a port rounding like the reference's own, docs/tolerances.md): "
            f"at most {stated[worst]:.2g} per audit (configuration {worst}); below 1e-6 on "
            f"{sum(p < 1e-6 for p in stated.values())} of {len(stated)} configurations",
            highlight=False,
        )
    for name, (least, where) in result["own_probability"].items():
        console.print(
            f"{escape(name)}: its largest error is one a sample of the reference's noise reaches with probability "
            f"{least:.2g} or more (least on configuration {where}; below {OWN_MODELLED:g}, the stated chance does not hold for it)",
            highlight=False,
        )
    alarms = result["false_alarms"]
    console.print(
        f"false alarms: {len(alarms)}"
        + "".join(f"\n  configuration {a['configuration']}: {a['backend']} fails {a['stage']}" for a in alarms),
        highlight=False,
    )
    if alarms:
        raise typer.Exit(1)


@app.command()
def train(
    checkpoint: Path | None = typer.Option(
        None, help="Hugging Face checkpoint folder (default: a tiny model built here)."
    ),
    data: Path | None = typer.Option(
        None, help="JSONL with text, auth_weight, prov_entropy (default: the bundled set)."
    ),
    out: Path = typer.Option(Path("runs/default"), help="Where checkpoints go."),
    settings: Path | None = typer.Option(None, help="Trainer settings JSON (docs/training-step.md)."),
    steps: int = typer.Option(60, help="Optimizer updates."),
    batch_size: int = typer.Option(8),
    seq_len: int = typer.Option(64),
    save_every: int = typer.Option(20, help="Write a checkpoint every N updates."),
    resume: Path | None = typer.Option(None, help="Continue from a checkpoint written by this command."),
    seed: int = typer.Option(0),
) -> None:
    """Train the MLX reference: on the embedded default, or on your own config, weights and data."""
    try:
        run_training(
            checkpoint=checkpoint,
            data=data,
            out=out,
            settings_path=settings,
            steps=steps,
            batch_size=batch_size,
            seq_len=seq_len,
            save_every=save_every,
            resume=resume,
            seed=seed,
            console=console,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        fail_input(str(e))


@app.command()
def bench(
    quick: bool = typer.Option(False, "--quick", help="Fewer rounds, the step only (about two minutes; what CI runs)."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the results as JSON to this path."),
    report: Path = typer.Option(
        Path("bench-report.md"), "--report", help="Markdown report; the plot goes beside it as .png."
    ),
    backend: list[str] | None = typer.Option(
        None, "--backend", "-b", help="mlx, torch, mlx-rs (repeatable); default: all available."
    ),
    size: list[str] | None = typer.Option(None, "--size", help="1M, 5M, 20M (repeatable); default: all three."),
    threads: int | None = typer.Option(None, "--threads", help="Threads per backend process (default: every core)."),
    blas: bool = typer.Option(
        False, "--blas", help="Only print which BLAS MLX uses here, checked and measured, then exit."
    ),
    device: str = typer.Option(
        "cpu",
        "--device",
        help="cpu (the backends above), or gpu: MLX-CUDA against torch-CUDA at 60M, 250M and 1B parameters (bench/gpu.py, docs/gpu.md).",
    ),
    tf32: bool | None = typer.Option(
        None, "--tf32/--no-tf32", help="GPU: float32 with TF32 on only / off only (default: both); bfloat16 always."
    ),
) -> None:
    """Time the training step of every backend at three model sizes, each in its own process (bench/)."""
    from .bench.gpu import run_gpu  # the bench's modules: torch and matplotlib, kept out of start-up
    from .bench.report import print_gpu_summary, print_summary
    from .bench.session import run
    from .bench.workload import BACKENDS, SIZES

    try:
        dev = D.parse(device, bool(tf32))
    except D.DeviceError as e:
        fail_input(str(e))
    if dev.name == "gpu":
        if backend and set(backend) - {"mlx", "torch"}:
            fail_input(
                "--device gpu benches mlx and torch (MLX-CUDA, torch-CUDA); the mlx-rs port is not benched on the GPU (docs/gpu.md)"
            )
        why = [f"{fw}: {w}" for fw in (backend or D.IN_PROCESS) if (w := D.gpu_unavailable(fw))]
        if why:
            fail_input("--device gpu: " + "; ".join(why))
        try:
            out = run_gpu(
                sizes=size,
                tf32=tf32,
                frameworks=backend,
                steps=2 if quick else 5,
                json_path=json_path,
                report_path=report,
                log=lambda m: err.print(m, highlight=False),
            )
        except ValueError as e:
            fail_input(str(e))
        print_gpu_summary(console, out)
        console.print(f"report written to {report}" + (f", JSON to {json_path}" if json_path else ""))
        raise typer.Exit(1 if out["failures"] else 0)

    if blas:
        console.print_json(json.dumps(blas_report()))
        return
    bad = [b for b in backend or [] if b not in BACKENDS] + [s for s in size or [] if s not in SIZES]
    if bad:
        fail_input(
            f"unknown backend or size {', '.join(bad)}; backends: {', '.join(BACKENDS)}; sizes: {', '.join(SIZES)}"
        )
    out = run(
        quick=quick,
        backends=backend,
        sizes=size,
        threads=threads,
        json_path=json_path,
        report_path=report,
        log=lambda m: err.print(m, highlight=False),
    )
    print_summary(console, out)
    console.print(
        f"report written to {report} (plot {report.with_suffix('.png')})"
        + (f", JSON to {json_path}" if json_path else "")
    )
    raise typer.Exit(1 if out["failures"] else 0)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
