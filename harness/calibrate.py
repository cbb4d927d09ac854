"""Measure the noise each tolerance must cover: correct backends audited where nobody tuned anything, every
margin (largest error / bound, less what conditioning explains; at most 1 passes) kept, and every failure of a correct backend counted as
a false alarm.

Two sources: the bundled (or any) fixtures, and a sweep of random configurations of a real checkpoint
(`parity calibrate --checkpoint DIR`): seeded draws of the depth cut, vocabulary cut, trainable set,
precision, accumulation, clipping, schedule, AdamW convention, loss weights, batch and sequence length,
each built as a live fixture on this machine (harness/fixtures/create.py) and audited, with the mutants
optionally run on the same configurations to show what the bounds still catch there."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mlx_parity.reference.loss import ALPHA_RANGE

from .backends.mutants import MUTANTS, MutantBackend
from .case import Case, list_cases
from .checkpoint_cut import read_config
from .data_parallel import audit_world, not_applicable
from .errors import FixtureError
from .fixtures.create import create
from .selftest import cell, implements, other_causes

VOCAB_CUTS = (512, 1024, 2048, 4096)
SEQ_LENS = (16, 24, 32, 40)


def random_configuration(rng: np.random.Generator, layers_available: int) -> dict:
    """One seeded configuration: `parity fixtures create` options and the settings over its defaults."""
    accum = int(rng.choice([1, 2, 4]))
    steps = int(rng.integers(2, 5))
    trainable = str(rng.choice(["full", "lora", "head"]))
    layers = int(rng.integers(1, min(8, layers_available) + 1))
    settings = {
        "trainable": trainable,
        "precision": "bfloat16" if rng.random() < 0.3 else "float32",
        "accum_steps": accum,
        "clip_norm": None if rng.random() < 0.4 else float(rng.choice([0.1, 0.5, 1.0, 5.0])),
        "steps": steps,
        "checkpoint_at": int(rng.integers(1, steps)),
        "optimizer": {
            "lr": float(np.exp(rng.uniform(np.log(1e-4), np.log(3e-3)))),
            "betas": [0.9, float(rng.choice([0.95, 0.99, 0.999]))],
            "eps": 1e-8,
            "weight_decay": float(rng.choice([0.0, 0.01, 0.1])),
            "bias_correction": bool(rng.random() < 0.5),
        },
        "schedule": (
            {"kind": "constant"}
            if rng.random() < 0.5
            else {
                "kind": "warmup_cosine",
                "warmup_steps": int(rng.integers(0, 3)),
                "warmup_init": 0.0,
                "decay_steps": steps,
                "end_lr": 1e-5,
            }
        ),
        "loss": {"lambda": float(rng.uniform(0.0, 1.0)), "alpha": float(rng.uniform(*ALPHA_RANGE))},
    }
    if trainable == "lora":
        settings["lora"] = {
            "rank": int(rng.choice([4, 8])),
            "layers": int(rng.integers(1, layers + 1)),
            "scale": float(rng.choice([1.0, 2.0, 4.0])),
        }
    seq_len = int(rng.choice(SEQ_LENS))
    return {
        "layers": layers,
        "vocab": int(rng.choice(VOCAB_CUTS)),
        "batch_size": accum * int(rng.choice([1, 2])),
        "seq_len": seq_len,
        "dtype": "bfloat16" if settings["precision"] == "bfloat16" else None,
        "settings": settings,
    }


def token_rows(rng: np.random.Generator, vocab_size: int, rows: int, seq_len: int) -> list[list[int]]:
    """Random token ids, each row between half and all of `seq_len` long (the rest is padding)."""
    return [
        [int(t) for t in rng.integers(0, vocab_size, int(rng.integers(seq_len // 2, seq_len + 1)))] for _ in range(rows)
    ]


@dataclass
class Run:
    """One backend (or mutant) audited on one configuration."""

    backend: str
    verdict: str
    margins: dict[str, float]
    failed: list[str]
    worst: dict[str, str] = field(default_factory=dict)  # per stage, the tensor its margin comes from
    findings: list[str] = field(default_factory=list)
    cell: str | None = None  # for a mutant: named, localised, passed or not applicable
    other_causes: list[str] = field(default_factory=list)  # for a mutant: causes stated besides its own (each wrong)
    # the chance a port rounding like the reference's own fails this configuration (harness/false_alarm.py), and
    # the smallest chance, over stages, that a sample of the reference's noise reaches this backend's largest error
    stated_false_alarm: float | None = None
    own_probability: float | None = None


@dataclass
class Configuration:
    index: int
    seed: int
    options: dict
    seconds_to_build: float = 0.0
    transformers_forward: float | None = None
    error: str | None = None  # the configuration could not be built (the reference refused it)
    runs: list[Run] = field(default_factory=list)
    not_implemented: list[str] = field(default_factory=list)  # backends that do not train in its precision

    def to_dict(self) -> dict:
        return asdict(self)


def _run(backend, case, name: str, diagnosis: str | None = None, world: int = 1) -> Run:
    result = audit_world(backend, case, world)
    findings = [f"{f.stage}:{f.code}" for f in result.findings()[0]]
    stated = result.false_alarm()
    return Run(
        backend=name,
        verdict=result.verdict,
        margins={s.name: round(float(s.margin), 4) for s in result.stages},
        failed=[s.name for s in result.stages if s.status != "pass"],
        worst={s.name: max(s.tensors, key=lambda t: t.ratio).name for s in result.stages if s.tensors},
        findings=findings,
        cell=None if diagnosis is None else cell(result, diagnosis),
        other_causes=[] if diagnosis is None else other_causes(findings, {diagnosis}),
        stated_false_alarm=stated["probability"] if diagnosis is None else None,
        own_probability=min(stated["own"].values(), default=None) if diagnosis is None else None,
    )


def _mutant_run(name: str, case) -> Run:
    """A mutant of the catalogue on one configuration: a data-parallel bug on the ranks it needs (its data_parallel
    stage then runs too), or not applicable where the batch does not divide into them."""
    m = MUTANTS[name]
    why = not_applicable(case, m.world_size) if m.world_size > 1 else None
    if why:
        return Run(f"mutant:{name}", f"not applicable: {why}", {}, [], cell="not applicable")
    return _run(MutantBackend(m), case, f"mutant:{name}", m.expected_diagnosis, m.world_size)


def sweep(
    checkpoint: Path,
    configs: int,
    seed: int,
    backends: list,
    mutants: list[str],
    progress=None,
    only: list[int] | None = None,
    keep: Path | None = None,
) -> Iterator[Configuration]:
    """`configs` random configurations of `checkpoint` (configuration i drawn from seed [seed, i]), each built
    as a live fixture and audited by every backend of `backends` and every mutant of `mutants`; yielded one by
    one, so a long sweep's results are kept as they come. `only` re-runs some of them (by index), `keep` builds
    the fixtures there (`config<i>`) instead of in a temporary folder, to look at one afterwards."""
    say = progress or (lambda what: None)
    cfg = read_config(Path(checkpoint))
    chosen = list(range(configs)) if only is None else list(only)
    for n, i in enumerate(chosen, 1):
        rng = np.random.default_rng([seed, i])
        options = random_configuration(rng, int(cfg["num_hidden_layers"]))
        V = int(cfg["vocab_size"])
        rows = token_rows(rng, V, options["batch_size"], options["seq_len"])
        if options["vocab"] >= V:  # a small checkpoint keeps its whole vocabulary
            options["vocab"] = None
        conf = Configuration(i, seed, options)
        with tempfile.TemporaryDirectory(prefix="parity-calibrate-") as tmp:
            built = Path(keep) if keep is not None else Path(tmp) / "fixtures"
            (Path(tmp) / "settings.json").write_text(json.dumps(options["settings"]))
            (Path(tmp) / "tokens.json").write_text(json.dumps(rows))
            started = time.perf_counter()
            where = f"configuration {i} ({n} of {len(chosen)})"  # by the index --only and the results name
            say(f"{where}: building")
            try:
                path = create(
                    f"config{i}",
                    Path(checkpoint),
                    built,
                    layers=options["layers"],
                    vocab=options["vocab"],
                    token_ids=Path(tmp) / "tokens.json",
                    settings=Path(tmp) / "settings.json",
                    batch_size=options["batch_size"],
                    seq_len=options["seq_len"],
                    dtype=options["dtype"],
                    seed=i,
                    require_agreement=False,
                    live=True,
                )
            except FixtureError as e:
                conf.error = str(e)
                say(f"{where}: not built: {e}")
                yield conf
                continue
            conf.seconds_to_build = round(time.perf_counter() - started, 1)
            agreement = json.loads((path / "agreement.json").read_text())
            conf.transformers_forward = agreement["margins"].get("transformers", {}).get("forward")
            case = Case(path)
            for backend in backends:
                if not implements(backend, case):  # a float32-only port refuses bfloat16, saying so: no noise
                    conf.not_implemented.append(backend.name)
                    continue
                say(f"{where}: {backend.name}")
                conf.runs.append(_run(backend, case, backend.name))
            for name in mutants:
                say(f"{where}: mutant {name}")
                conf.runs.append(_mutant_run(name, case))
        yield conf


def fixture_margins(root: Path, backends: list, mutants: list[str] = ()) -> Iterator[Configuration]:
    """Every backend and every mutant of `mutants` audited on every fixture of `root`, as configurations (their
    options name the fixture): the bundled fixtures, or a sweep's kept ones (`sweep(keep=...)`)."""
    for i, case in enumerate(list_cases(root)):
        conf = Configuration(i, 0, {"fixture": case.name})
        for b in backends:
            if implements(b, case):
                conf.runs.append(_run(b, case, b.name))
            else:
                conf.not_implemented.append(b.name)
        for name in mutants:
            conf.runs.append(_mutant_run(name, case))
        yield conf


def summary(configs: list[Configuration]) -> dict:
    """Per correct backend and stage, the largest margin, its configuration and tensor; the false alarms (a correct backend failing
    a stage); per mutant, how often it was named, only localised or passed, and on how many configurations a cause
    it does not have was stated besides (each a wrong cause)."""
    worst: dict[str, dict[str, list]] = {}
    false_alarms = []
    stated: dict[int, float] = {}
    own: dict[str, list] = {}
    mutants: dict[str, dict[str, int]] = {}
    for conf in configs:
        for run in conf.runs:
            if run.cell is not None:
                counts = mutants.setdefault(run.backend, {})
                counts[run.cell] = counts.get(run.cell, 0) + 1
                if run.other_causes:
                    counts["other causes stated"] = counts.get("other causes stated", 0) + 1
                continue
            for stage, margin in run.margins.items():
                best = worst.setdefault(run.backend, {}).get(stage)
                if best is None or margin > best[0]:
                    worst[run.backend][stage] = [margin, conf.index, run.worst.get(stage, "")]
            false_alarms += [{"configuration": conf.index, "backend": run.backend, "stage": s} for s in run.failed]
            if run.stated_false_alarm is not None:
                stated[conf.index] = max(stated.get(conf.index, 0.0), run.stated_false_alarm)
            if run.own_probability is not None:
                least = own.get(run.backend)
                if least is None or run.own_probability < least[0]:
                    own[run.backend] = [run.own_probability, conf.index]
    return {
        "configurations": len(configs),
        "not_built": [{"configuration": c.index, "error": c.error} for c in configs if c.error],
        "worst_margin": worst,
        "false_alarms": false_alarms,
        "stated_false_alarm": stated,
        "own_probability": own,
        "mutants": mutants,
    }
