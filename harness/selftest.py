"""`parity selftest`: prove the harness's sensitivity. Every mutant must be caught at its expected
stage with its expected diagnosis, and no correct backend may fail (no false alarm)."""

from __future__ import annotations

from dataclasses import dataclass

from .audit import AuditResult, audit
from .backends import Backend, default_backends
from .case import find_case, list_cases
from .mutants import MUTANTS, MutantBackend


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
    def caught(self) -> bool:
        return self.detected_stage == self.expected_stage and self.diagnosis == self.expected_diagnosis

    @property
    def named(self) -> bool:
        """The injected bug is one of the audit's findings, with its cause (not only inherited)."""
        return any(f.endswith(":" + self.expected_diagnosis) for f in self.findings)

    def to_dict(self) -> dict:
        return {"name": self.name, "fixture": self.fixture, "via": self.via, "expected_stage": self.expected_stage,
                "expected_diagnosis": self.expected_diagnosis, "detected_stage": self.detected_stage,
                "diagnosis": self.diagnosis, "summary": self.summary, "caught": self.caught,
                "findings": self.findings, "named_as_finding": self.named}


def judge_mutant(result: AuditResult, name: str, via: str, stage: str, diagnosis: str) -> MutantRun:
    first = result.first_failure()
    return MutantRun(name, result.fixture, via, stage, diagnosis, first.name if first else None,
                     first.diagnosis.code if first and first.diagnosis else None,
                     first.diagnosis.summary if first and first.diagnosis else "passed every stage",
                     [f"{f.stage}:{f.code}" for f in result.findings()[0]])


def mutant_backends(protocol: bool) -> list[tuple[object, Backend, str]]:
    """(mutant, backend, via) for every in-process mutant, the same through cmd:, and the Rust ones."""
    out = [(m, MutantBackend(m), "in-process") for m in MUTANTS.values()]
    if protocol:
        from .backends.external import example_adapter_backend

        out += [(m, example_adapter_backend(m.name), "cmd") for m in MUTANTS.values()]
    return out


def run(protocol: bool = True, progress=None, extra: list | None = None) -> dict:
    """extra: (name, backend, via, expected_stage, expected_diagnosis, fixtures) for backends beyond the catalogue."""
    mutants: list[MutantRun] = []
    jobs = [(m.name, b, via, m.expected_stage, m.expected_diagnosis, m.fixtures) for m, b, via in mutant_backends(protocol)]
    jobs += extra or []
    for name, backend, via, stage, diag, fixtures in jobs:
        for f in fixtures:
            mutants.append(judge_mutant(audit(backend, find_case(f)), name, via, stage, diag))
            if progress:
                progress(f"{via} {name} on {f}")
    correct = []
    for backend in default_backends():
        if backend.unavailable():
            continue
        for case in list_cases():
            correct.append(audit(backend, case))
            if progress:
                progress(f"{backend.name} on {case.name}")
    false_alarms = [r for r in correct if r.verdict == "fail"]
    return {
        "mutants": [m.to_dict() for m in mutants],
        "false_alarms": len(false_alarms),
        "false_alarm_details": [{"fixture": r.fixture, "backend": r.backend, "stage": r.first_failure().name,
                                 "message": r.first_failure().message} for r in false_alarms],
        "correct_backends": sorted({r.backend for r in correct}),
        "passed": all(m.caught for m in mutants) and not false_alarms,
    }


def rust_mutants() -> list:
    """The mlx-rs port's injected failures, when the extension is built (issue: the Rust side)."""
    from .backends.mlx_rs import RUST_INJECTIONS, MlxRsBackend

    if MlxRsBackend().unavailable():
        return []
    return [(f"mlx-rs:{name}", MlxRsBackend(inject=name), "mlx-rs", stage, diag, fixtures)
            for name, (stage, diag, fixtures) in RUST_INJECTIONS.items()]


def count_jobs(protocol: bool, extra: list | None = None) -> int:
    n = sum(len(m.fixtures) for m in MUTANTS.values()) * (2 if protocol else 1)
    n += sum(len(e[5]) for e in extra or [])
    return n + sum(len(list_cases()) for b in default_backends() if not b.unavailable())
