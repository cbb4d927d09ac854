"""Backends: anything that can run the training step and report the stages' named outputs.

Interface (docs/backends.md): `name`, `unavailable()` (None or why it cannot run here) and
`run(case, stages) -> {stage: StageOutput}`. In-process trainers implement it through
`TrainerBackend`, which only needs `open(case, strict)` and `resume(case, path)` returning a
`mlx_parity.harness.stages.Session`.

Every backend is found by name in one registry, `KINDS`: a name is `KIND` or `KIND:ARGUMENT`
(`mutant:no_shift`, `mlx-rs:forward_only`, `cmd:./my-port-adapter`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

from ..stages import STAGES, StageOutput
from .base import Backend, BackendError, TrainerBackend
from .candle import CANDLE_INJECTIONS, CandleBinaryBackend
from .external import DEFAULT_TIMEOUT_S, ExternalBackend
from .mlx_backend import MLXBackend
from .mlx_rs import RUST_INJECTIONS, MlxRsBackend, MlxRsBinaryBackend, MlxRsInProcess
from .mutants import MUTANTS, MutantBackend

TWIN_MISSING = (
    "torch is not installed: the twin is an extra (pip install 'mlx-parity[twin]'); auditing a port needs only mlx"
)


class MissingBackend(Backend):
    """A backend whose framework is not installed here: named with the reason, never run."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason

    def unavailable(self) -> str | None:
        return self.reason

    def run(self, case, stages=STAGES) -> dict[str, StageOutput]:
        return {s: StageOutput(error=self.reason) for s in stages}


def _torch(arg, timeout, in_process) -> Backend:
    """The twin, imported only when asked for: torch costs ~0.5 GB of memory in a process that audits only mlx."""
    if importlib.util.find_spec("torch") is None:
        return MissingBackend("torch", TWIN_MISSING)
    from .torch_backend import TorchBackend

    return TorchBackend()


def _command(kind: str) -> Callable:
    def make(arg, timeout, in_process) -> Backend:
        if not arg:
            raise BackendError(f'{kind}: needs a command line, e.g. "{kind}:./my-port-adapter"')
        return ExternalBackend(arg, timeout, one_process=kind == "cmd-once")

    return make


def _mutant(arg, timeout, in_process) -> Backend:
    if arg not in MUTANTS:
        raise BackendError(f"unknown mutant {arg!r}; known: {', '.join(MUTANTS)}")
    return MutantBackend(MUTANTS[arg])


def _injection(arg) -> str | None:
    if arg is not None and arg not in RUST_INJECTIONS:
        raise BackendError(f"unknown mlx-rs injection {arg!r}; known: {', '.join(RUST_INJECTIONS)}")
    return arg


def _mlx_rs(arg, timeout, in_process) -> Backend:
    """`in_process`: the extension backend itself rather than its per-stage isolated form (what
    `mlx_parity.harness.protocol.server` serves)."""
    inject = _injection(arg)
    return MlxRsInProcess(inject) if in_process else MlxRsBackend(inject, timeout)


def _mlx_rs_bin(arg, timeout, in_process) -> Backend:
    return MlxRsBinaryBackend(_injection(arg), timeout)


def _candle_bin(arg, timeout, in_process) -> Backend:
    if arg is not None and arg not in CANDLE_INJECTIONS:
        raise BackendError(f"unknown candle injection {arg!r}; known: {', '.join(CANDLE_INJECTIONS)}")
    return CandleBinaryBackend(arg, timeout)


@dataclass(frozen=True)
class Kind:
    make: Callable  # (argument or None, timeout in s, in_process) -> Backend
    argument: str = ""  # what follows `KIND:`, for messages; "" when the kind takes none
    optional: bool = False  # the argument may be left out
    default: bool = False  # audited by default when it can run here


KINDS: dict[str, Kind] = {
    "mlx": Kind(lambda arg, timeout, in_process: MLXBackend(), default=True),
    "torch": Kind(_torch, default=True),
    "mlx-rs": Kind(_mlx_rs, "INJECTION", optional=True, default=True),
    "mlx-rs-bin": Kind(_mlx_rs_bin, "INJECTION", optional=True, default=True),
    # not audited by default: it trains in float32 only, so the bfloat16-trained fixtures fail with its reason
    "candle-bin": Kind(_candle_bin, "INJECTION", optional=True),
    "mutant": Kind(_mutant, "NAME"),
    "cmd": Kind(_command("cmd"), "COMMAND LINE"),
    "cmd-once": Kind(_command("cmd-once"), "COMMAND LINE"),
}


def get_backend(name: str, timeout: float | None = None, in_process: bool = False) -> Backend:
    """A backend by name: `KIND` or `KIND:ARGUMENT`."""
    kind, sep, arg = name.partition(":")
    spec = KINDS.get(kind.strip())
    if spec is None or (sep and not spec.argument):
        known = ", ".join(
            k + (f"[:{s.argument}]" if s.optional else f":{s.argument}" if s.argument else "") for k, s in KINDS.items()
        )
        raise BackendError(f"unknown backend {name!r}; known: {known}")
    if spec.argument and not spec.optional and not sep:
        raise BackendError(f'{kind}: needs {spec.argument.lower()}, e.g. "{kind}:{spec.argument}"')
    return spec.make(arg.strip() if sep else None, timeout or DEFAULT_TIMEOUT_S, in_process)


def default_backends() -> list[Backend]:
    """Every backend that can run here: mlx, torch, and the mlx-rs port (through its Python extension
    and through its Rust adapter binary) when built."""
    made = [get_backend(name) for name, kind in KINDS.items() if kind.default]
    return [b for b in made if b.unavailable() is None]


__all__ = ["Backend", "BackendError", "TrainerBackend", "KINDS", "get_backend", "default_backends"]
