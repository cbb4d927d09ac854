"""`parity selftest`: prove the harness's sensitivity and that it names causes, not only failures.

- The matrix: every mutant on every fixture. Where a fixture exposes the bug (the mutant's `fixtures`,
  by construction) its expected cause must be one of the audit's findings; elsewhere the cell says
  whether the fixture happened to expose it (named / localised only) or not (passed).
- Combinations: two, three and more bugs in one port; each must be named as its own finding.
- DESIGN.md's porting-bug list (the your_ai port's): each bug alone is in the matrix; together they run
  in the largest sets one port can carry (bugs that replace the same loader are alternatives).
- The same mutants through the cmd: protocol, the Rust port's injected bugs, and no false alarm on any correct
  backend, on one process and on two ranks. The data-parallel mutants are audited with `--world-size` 2
  (harness/data_parallel.py), through the protocol too (each rank one adapter process).
Detection and injection are independent: harness/diagnosis never imports this catalogue.
"""

from __future__ import annotations

from dataclasses import dataclass

from .audit import AuditResult, audit
from .backends import Backend, default_backends
from .backends.candle import CANDLE_INJECTIONS, CandleBinaryBackend
from .backends.external import example_adapter_backend
from .backends.mlx_rs import RUST_INJECTIONS, MlxRsBackend, MlxRsBinaryBackend
from .backends.mutants import MUTANTS, MutantBackend, combine
from .case import find_case, list_cases
from .data_parallel import audit_stage, audit_world, not_applicable
from .diagnosis.codes import states_a_cause, true_of

# (fixture, mutants injected together)
COMBINATIONS = [
    ("gqa_padded", ("attention_scale_wrong", "causal_mask_flipped")),
    ("gqa_padded", ("rope_traditional", "gqa_tiled_heads", "mlp_gelu")),
    ("gqa_single", ("rope_theta_hardcoded", "rmsnorm_eps_hardcoded", "adam_eps_mismatch")),
    ("small_eps_bias", ("attention_bias_ignored", "weight_decay_coupled")),
    ("lora", ("lora_scale_ignored", "distrust_alpha_default", "optimizer_disconnected")),
    ("clip_accum_warmup", ("no_shift", "schedule_off_by_one")),
    ("clip_accum_warmup", ("clipping_per_tensor", "adam_eps_inside_sqrt", "bias_correction_frozen")),
    ("head", ("distrust_lambda_one", "mlp_gelu", "forward_only")),
    ("head", ("gate_up_swapped_keys", "rope_offset", "distrust_lambda_one")),
    (
        "gqa_padded",
        (
            "attention_scale_wrong",
            "causal_mask_flipped",
            "rope_traditional",
            "gqa_tiled_heads",
            "mlp_gelu",
            "adam_eps_mismatch",
        ),
    ),
]
# DESIGN.md's list ("Porting bugs the harness must catch and name"), number -> mutant.
DESIGN_BUGS = {
    1: "weights_not_loaded",
    2: "no_shift",
    3: "forward_only",
    4: "optimizer_disconnected",
    5: "key_prefix",
    6: "bias_correction_flipped",
    7: "rmsnorm_eps_hardcoded",
    8: "tied_embeddings_ignored",
    9: "padding_counted",
}
# All of them in one port, as far as one port can hold them: 1, 5 and 8 each replace the loader, and a
# disconnected optimizer (4) leaves no update whose bias correction (6) could show, so they split in three.
DESIGN_TOGETHER = [
    (
        "small_eps_bias",
        (
            "weights_not_loaded",
            "no_shift",
            "padding_counted",
            "forward_only",
            "optimizer_disconnected",
            "rmsnorm_eps_hardcoded",
        ),
    ),
    (
        "small_eps_bias",
        (
            "key_prefix",
            "no_shift",
            "padding_counted",
            "forward_only",
            "bias_correction_flipped",
            "rmsnorm_eps_hardcoded",
        ),
    ),
    (
        "tied",
        ("tied_embeddings_ignored", "no_shift", "padding_counted", "optimizer_disconnected", "rope_theta_hardcoded"),
    ),
]


@dataclass
class MutantRun:
    name: str
    fixture: str
    via: str  # "in-process", "cmd", or "mlx-rs"
    expected_stage: str
    expected_diagnosis: str
    detected_stage: str | None
    diagnosis: str | None
    summary: str
    findings: list[str]  # "stage:code" of the audit's distinct findings (harness/findings.py)

    @property
    def named(self) -> bool:
        """The injected bug is one of the audit's findings, with its cause (not only inherited)."""
        return any(f.endswith(":" + self.expected_diagnosis) for f in self.findings)

    @property
    def caught(self) -> bool:
        return self.named

    @property
    def other_causes(self) -> list[str]:
        """Causes the audit states besides the injected one: each is wrong, since the port has one bug."""
        return other_causes(self.findings, {self.expected_diagnosis})

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "fixture": self.fixture,
            "via": self.via,
            "expected_stage": self.expected_stage,
            "expected_diagnosis": self.expected_diagnosis,
            "detected_stage": self.detected_stage,
            "diagnosis": self.diagnosis,
            "summary": self.summary,
            "caught": self.caught,
            "findings": self.findings,
            "named_as_finding": self.named,
            "other_causes": self.other_causes,
        }


def judge_mutant(result: AuditResult, name: str, via: str, stage: str, diagnosis: str) -> MutantRun:
    first = result.first_failure()
    return MutantRun(
        name,
        result.fixture,
        via,
        stage,
        diagnosis,
        first.name if first else None,
        first.diagnosis.code if first and first.diagnosis else None,
        first.diagnosis.summary if first and first.diagnosis else "passed every stage",
        [f"{f.stage}:{f.code}" for f in result.findings()[0]],
    )


def other_causes(findings: list[str], injected: set[str]) -> list[str]:
    """Of an audit's findings ("stage:code"), those that state a cause none of the injected bugs is."""
    true = set().union(*(true_of(c) for c in injected))
    return sorted({f for f in findings if states_a_cause(f.split(":", 1)[1]) and f.split(":", 1)[1] not in true})


def cell(result: AuditResult, diagnosis: str) -> str:
    """named (the cause is a finding), localised (the audit fails, the cause is not named), passed, or
    not applicable (the bug cannot be built for this fixture: every stage is the same error)."""
    found = result.findings()[0]
    if (
        result.stages
        and all(s.diagnosis is not None and s.diagnosis.code == "stage_error" for s in result.stages)
        and len({s.message for s in result.stages}) == 1
    ):
        return "not applicable"
    if any(f.code == diagnosis for f in found):
        return "named"
    return "localised" if result.verdict == "fail" else "passed"


def matrix(progress=None, cases: list | None = None) -> list[dict]:
    """Every mutant on every fixture (or on `cases`: a test's fewer cells)."""
    rows = []
    cases = list_cases() if cases is None else cases
    for m in MUTANTS.values():
        backend = MutantBackend(m)
        cells, wrong = {}, {}
        for case in cases:
            result = audit_world(backend, case, m.world_size)
            cells[case.name] = cell(result, m.expected_diagnosis)
            stated = other_causes([f"{f.stage}:{f.code}" for f in result.findings()[0]], {m.expected_diagnosis})
            if stated:
                wrong[case.name] = stated
            if progress:
                progress(f"matrix {m.name} on {case.name}")
        rows.append(
            {
                "mutant": m.name,
                "expected_diagnosis": m.expected_diagnosis,
                "exposing_fixtures": list(m.fixtures),
                "cells": cells,
                "other_causes": wrong,  # per fixture, causes stated besides the injected one
                "named_where_exposed": all(cells[f] == "named" for f in m.fixtures if f in cells),
                "exposed_by": sorted(f for f, c in cells.items() if c != "passed"),
            }
        )
    return rows


def together(fixture: str, names: tuple[str, ...]) -> dict:
    """Several bugs in one port: which were named, which only localised, which missed."""
    result = audit(MutantBackend(combine(names)), find_case(fixture))
    found = {f.code for f in result.findings()[0]}
    outcome = {
        n: "named"
        if MUTANTS[n].expected_diagnosis in found
        else ("localised" if result.verdict == "fail" else "missed")
        for n in names
    }
    findings = [f"{f.stage}:{f.code}" for f in result.findings()[0]]
    return {
        "fixture": fixture,
        "mutants": list(names),
        "outcome": outcome,
        "findings": findings,
        "other_causes": other_causes(findings, {MUTANTS[n].expected_diagnosis for n in names}),
        "all_named": all(v == "named" for v in outcome.values()),
    }


def mutant_backends(protocol: bool) -> list[tuple[object, Backend, str]]:
    """(mutant, backend, via) for the cmd: protocol run of every mutant."""
    if not protocol:
        return []

    return [(m, example_adapter_backend(m.name), "cmd") for m in MUTANTS.values()]


def run(protocol: bool = True, progress=None, extra: list | None = None, cases: list | None = None) -> dict:
    """extra: (name, backend, via, expected_stage, expected_diagnosis, fixtures) for backends beyond the catalogue;
    cases: the fixtures of the matrix and of the false-alarm runs (every bundled one by default)."""
    say = progress or (lambda what: None)
    cases = list_cases() if cases is None else cases
    rows = matrix(say, cases)
    combos = []
    for fixture, names in COMBINATIONS + DESIGN_TOGETHER:
        combos.append(together(fixture, names) | {"design_list": (fixture, names) in DESIGN_TOGETHER})
        say(f"together {'+'.join(names)[:40]} on {fixture}")
    mutants: list[MutantRun] = []
    jobs = [
        (m.name, b, via, m.expected_stage, m.expected_diagnosis, m.fixtures[:1])
        for m, b, via in mutant_backends(protocol)
    ]
    jobs += extra or []
    for name, backend, via, stage, diag, fixtures in jobs:
        world = MUTANTS[name].world_size if name in MUTANTS else 1  # a data-parallel bug shows on several ranks
        for f in fixtures:
            mutants.append(judge_mutant(audit_world(backend, find_case(f), world), name, via, stage, diag))
            say(f"{via} {name} on {f}")
    correct = []
    for backend in correct_backends():
        for case in filter(lambda c: implements(backend, c), cases):
            correct.append(audit(backend, case))
            say(f"{backend.name} on {case.name}")
        if backend.ranks is not None:  # and trained on two ranks, wherever the batch divides
            for case in cases:
                if not_applicable(case, 2) is None:
                    correct.append(AuditResult(case.name, backend.name, [audit_stage(backend, case, 2)]))
                    say(f"{backend.name} on {case.name}, 2 ranks")
    false_alarms = [r for r in correct if r.verdict == "fail"]
    design = {n: next(r for r in rows if r["mutant"] == m)["named_where_exposed"] for n, m in DESIGN_BUGS.items()}
    return {
        "matrix": rows,
        "combinations": combos,
        "design_list_alone": design,
        "mutants": [m.to_dict() for m in mutants],
        "cells_with_other_causes": sum(len(r["other_causes"]) for r in rows),
        "false_alarms": len(false_alarms),
        "false_alarm_details": [
            {
                "fixture": r.fixture,
                "backend": r.backend,
                "stage": r.first_failure().name,
                "message": r.first_failure().message,
            }
            for r in false_alarms
        ],
        "correct_backends": sorted({r.backend for r in correct}),
        "passed": (
            all(r["named_where_exposed"] for r in rows)
            and all(c["all_named"] for c in combos)
            and all(m.caught for m in mutants)
            and not false_alarms
        ),
    }


def rust_mutants() -> list:
    """The Rust ports' injected failures: mlx-rs through its Python extension and its adapter binary, candle
    through its adapter binary (each when built)."""
    out = []
    for via, cls in (("mlx-rs", MlxRsBackend), ("mlx-rs-bin", MlxRsBinaryBackend)):
        if cls().unavailable() is None:
            out += [
                (f"{via}:{name}", cls(inject=name), via, stage, diag, fixtures)
                for name, (stage, diag, fixtures) in RUST_INJECTIONS.items()
            ]
    if CandleBinaryBackend().unavailable() is None:
        out += [
            (f"candle-bin:{name}", CandleBinaryBackend(inject=name), "candle-bin", stage, diag, (fixture,))
            for name, (stage, diag, fixture) in CANDLE_INJECTIONS.items()
        ]
    return out


def correct_backends() -> list[Backend]:
    """Every correct backend that can run here: the default ones and the candle port when built."""
    candle = CandleBinaryBackend()
    return [b for b in default_backends() if not b.unavailable()] + ([candle] if not candle.unavailable() else [])


def implements(backend: Backend, case) -> bool:
    """Whether the backend trains in the case's precision (a port may implement float32 only)."""
    return backend.precisions is None or case.settings.precision in backend.precisions


def count_jobs(protocol: bool, extra: list | None = None) -> int:
    n = len(MUTANTS) * len(list_cases()) + len(COMBINATIONS) + len(DESIGN_TOGETHER)
    n += len(MUTANTS) if protocol else 0
    n += sum(len(e[5]) for e in extra or [])
    ranked = sum(not_applicable(c, 2) is None for c in list_cases())
    return n + sum(sum(implements(b, c) for c in list_cases()) + (ranked if b.ranks else 0) for b in correct_backends())
