"""One audit session behind every shell that takes a user's input (the CLI and the pytest plugin): the input
checks, the fixtures' hashes, the device and the backends, then the audits. A shell only formats what this
returns, so none of them skips a check another makes."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import device as D
from .audit import AuditResult, audit
from .backends import TWIN_MISSING, Backend, BackendError, default_backends, get_backend
from .backends.external import ExternalBackend
from .backends.mlx_rs import NOT_BUILT, extension_built
from .case import FIXTURES_DIR, Case, find_case, list_cases
from .errors import CaseError, FixtureError
from .fixtures.manifest import MANIFEST, check_hashes
from .stages import ALL_STAGES, LAUNCHED_STAGES

LAUNCHERS = ("mlx", "torch")  # mlx.launch (ring), torchrun (gloo): what starts a cmd: port's ranks


class AuditInputError(ValueError):
    """Input that cannot be audited (the CLI's exit 2): a typo is never a pass."""


@dataclass
class AuditSession:
    """What will be audited, checked: every case against its manifest, every backend able to run, the device
    active. `notes` are what the user should know before the results (no manifest, a backend left out)."""

    cases: list[Case]
    backends: list[Backend]
    stages: list[str]
    device: D.Device
    root: Path
    notes: list[str] = field(default_factory=list)
    live: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    world_size: int = 1  # > 1: each audit ends with the data_parallel stage on that many ranks

    def run(self, progress: Callable[[str], None] | None = None) -> list[AuditResult]:
        """Every backend on every case. In another matmul precision (TF32) each case first gets that
        precision's update sensitivities, measured once here, never inside the judge."""
        cases = self.cases
        if self.device.precision != "float32":
            from .fixtures.truth import precision_case  # the float64 twin: torch, an optional extra

            cases = [precision_case(c, self.device.precision) for c in cases]
        judge = audit
        if self.world_size > 1:  # builds the one process's goldens and float64 truth: torch, an optional extra
            from .data_parallel import audit_world

            def judge(b, c, stages, precision):
                return audit_world(b, c, self.world_size, stages, precision, progress)

        results = []
        for b in self.backends:
            for c in cases:
                if progress:
                    progress(f"auditing {b.name} on {c.name}…")
                results.append(judge(b, c, self.stages, precision=self.device.precision))
        return results

    def close(self) -> None:
        """Delete what the session built for itself (a live case's goldens)."""
        self.live.close()


def _check(cases, chosen, backends, stages, dev, root, checkpoint, world_size=1) -> tuple[list[str], list[str]]:
    """The session's checks after its cases and backends exist: (the stages to run, notes for the user)."""
    notes = []
    if world_size < 1:
        raise AuditInputError(f"--world-size must be at least 1, got {world_size}")
    if world_size > 1 and dev.name != "cpu":
        raise AuditInputError(
            "--world-size runs the ranks on the CPU (MLX's ring, torch's gloo); not with --device gpu"
        )
    if world_size > 1 and importlib.util.find_spec("torch") is None:
        raise AuditInputError(f"--world-size builds the one process's float64 truth with the twin: {TWIN_MISSING}")
    if not cases:
        raise AuditInputError(f"no fixtures in {root}; run `parity fixtures generate`")
    for b in chosen if backends else []:  # a backend asked for by name must run: a typo is never a pass
        reason = b.unavailable()
        if reason:
            raise AuditInputError(f"backend {b.name} cannot run: {reason}")
    if checkpoint is None and (root / MANIFEST).exists():  # goldens built just now have nothing stored to check
        problems = check_hashes(root, [c.name for c in cases])
        if problems:
            raise AuditInputError(
                f"fixtures differ from {root / MANIFEST} (`parity fixtures verify` says more):\n  "
                + "\n  ".join(problems)
            )
    elif checkpoint is None:
        notes.append(f"note: {root} has no {MANIFEST}: fixture files are not hash-checked")
    for c in cases:
        try:
            c.check()
        except CaseError as e:
            raise AuditInputError(str(e)) from None
    asked = list(stages or ALL_STAGES)
    unknown = [s for s in asked if s not in ALL_STAGES + LAUNCHED_STAGES]
    if unknown:
        known = ", ".join(ALL_STAGES + LAUNCHED_STAGES)
        raise AuditInputError(f"unknown stage(s) {', '.join(unknown)}; stages: {known}")
    if world_size == 1 and any(s in LAUNCHED_STAGES for s in asked):
        raise AuditInputError(f"{', '.join(LAUNCHED_STAGES)} runs on several ranks: add --world-size N (N ≥ 2)")
    try:
        frameworks = sorted({"torch" if b.name.startswith("torch") else "mlx" for b in chosen} & set(D.IN_PROCESS))
        D.activate(dev, frameworks)
    except D.DeviceError as e:
        raise AuditInputError(str(e)) from None
    if dev.name == "gpu":
        notes.append(f"device: {dev.describe()}")
    if not backends and dev.name == "cpu" and not extension_built():
        notes.append(f"note: not auditing mlx-rs: {NOT_BUILT}")
    return [s for s in ALL_STAGES if s in asked], notes


def open_session(
    fixtures: list[str] | None = None,
    backends: list[str] | None = None,
    stages: list[str] | None = None,
    fixtures_dir: Path | None = None,
    timeout: float | None = None,
    device: str = "cpu",
    tf32: bool = False,
    checkpoint: Path | None = None,
    data: Path | None = None,
    layers: int | None = None,
    vocab: int | None = None,
    settings: Path | None = None,
    say: Callable[[str], None] | None = None,
    world_size: int = 1,
    launcher: str = "mlx",
) -> AuditSession:
    """Check the input and prepare the audits; raise AuditInputError with the reason. With `checkpoint`, the
    goldens and truth are built now from it (in a temporary folder the session deletes when closed)."""
    root = Path(fixtures_dir) if fixtures_dir else FIXTURES_DIR
    live = contextlib.ExitStack()
    if checkpoint is None and (data or layers or vocab or settings):
        raise AuditInputError("--data, --layers, --vocab and --settings go with --checkpoint")
    if checkpoint is not None and (fixtures or fixtures_dir or data is None):
        raise AuditInputError(
            "--checkpoint needs --data (the batch's text) and builds its own goldens: not with --fixture or --fixtures-dir"
        )
    try:
        dev = D.parse(device, tf32)
        if dev.name == "gpu":  # the in-process backends only: an external port picks its own device
            D.check_backends(dev, list(backends or D.IN_PROCESS))
            D.set_tf32_env(dev.tf32)  # before anything computes: MLX reads it once
        if checkpoint is not None:
            from .fixtures.create import live_case  # builds goldens and truth: torch, an optional extra

            cases = [
                live.enter_context(
                    live_case(checkpoint, text=data, layers=layers, vocab=vocab, settings=settings, progress=say)
                )
            ]
            root = cases[0].path.parent
        else:
            cases = [find_case(n, root) for n in fixtures] if fixtures else list_cases(root)
        if launcher not in LAUNCHERS:
            raise AuditInputError(f"--launcher {launcher!r}: one of {', '.join(LAUNCHERS)}")
        if backends:
            chosen = [get_backend(b, timeout) for b in backends]
            for b in chosen:
                if isinstance(b, ExternalBackend):  # the port's ranks start as its engine's launcher starts them
                    b.launcher = launcher
        else:
            chosen = [get_backend(b, timeout) for b in D.IN_PROCESS] if dev.name == "gpu" else default_backends()
    except (CaseError, BackendError, D.DeviceError, FixtureError) as e:
        live.close()
        raise AuditInputError(str(e)) from None
    try:
        chosen_stages, notes = _check(cases, chosen, backends, stages, dev, root, checkpoint, world_size)
    except AuditInputError:
        live.close()
        raise
    # --stage without data_parallel leaves it out; without --stage every stage runs, data_parallel included
    world = world_size if stages is None or any(s in LAUNCHED_STAGES for s in stages) else 1
    return AuditSession(cases, chosen, chosen_stages, dev, root, notes, live, world)
