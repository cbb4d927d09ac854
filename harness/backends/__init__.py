"""Backends: anything that can run the training step and report the stages' named outputs.

Interface (docs/backends.md): `name`, `unavailable()` (None or why it cannot run here) and
`run(case, stages) -> {stage: StageOutput}`. In-process trainers implement it through
`TrainerBackend`, which only needs `open(case, strict)` and `resume(case, path)` returning a
`mlx_parity.harness.stages.Session`.
"""

from __future__ import annotations

import importlib.util

from ..stages import STAGES, StageOutput
from .base import Backend, BackendError, TrainerBackend

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


def _torch_backend() -> Backend:
    """The twin, imported only when asked for: torch costs ~0.5 GB of memory in a process that audits only mlx."""
    if importlib.util.find_spec("torch") is None:
        return MissingBackend("torch", TWIN_MISSING)
    from .torch_backend import TorchBackend

    return TorchBackend()


def registry() -> dict:
    """Backend name -> a callable that makes it (torch is optional: without it the twin is a MissingBackend)."""
    from .mlx_backend import MLXBackend

    return {"mlx": MLXBackend, "torch": _torch_backend}


def get_backend(name: str, timeout: float | None = None, in_process: bool = False) -> Backend:
    """A backend by name. `in_process` asks for the extension backend itself rather than its
    per-stage isolated form (what `mlx_parity.harness.protocol.server` serves)."""
    if name.startswith(("cmd:", "cmd-once:")):
        from ..protocol.client import DEFAULT_TIMEOUT_S, ExternalBackend

        kind, command = (s.strip() for s in name.split(":", 1))
        if not command:
            raise BackendError(f'{kind}: needs a command line, e.g. "{kind}:./my-port-adapter"')
        return ExternalBackend(command, timeout or DEFAULT_TIMEOUT_S, one_process=kind == "cmd-once")
    if name.startswith("mutant:"):
        from ..mutants import MUTANTS, MutantBackend

        mutant = name.split(":", 1)[1]
        if mutant not in MUTANTS:
            raise BackendError(f"unknown mutant {mutant!r}; known: {', '.join(MUTANTS)}")
        return MutantBackend(MUTANTS[mutant])
    if name == "mlx-rs-bin" or name.startswith("mlx-rs-bin:"):
        from ..protocol.client import DEFAULT_TIMEOUT_S
        from .mlx_rs import RUST_INJECTIONS, MlxRsBinaryBackend

        inject = name.split(":", 1)[1] if ":" in name else None
        if inject is not None and inject not in RUST_INJECTIONS:
            raise BackendError(f"unknown mlx-rs injection {inject!r}; known: {', '.join(RUST_INJECTIONS)}")
        return MlxRsBinaryBackend(inject, timeout or DEFAULT_TIMEOUT_S)
    if name == "mlx-rs" or name.startswith("mlx-rs:"):
        from ..protocol.client import DEFAULT_TIMEOUT_S
        from .mlx_rs import RUST_INJECTIONS, MlxRsBackend, MlxRsInProcess

        inject = name.split(":", 1)[1] if ":" in name else None
        if inject is not None and inject not in RUST_INJECTIONS:
            raise BackendError(f"unknown mlx-rs injection {inject!r}; known: {', '.join(RUST_INJECTIONS)}")
        return MlxRsInProcess(inject) if in_process else MlxRsBackend(inject, timeout or DEFAULT_TIMEOUT_S)
    backends = registry()
    if name not in backends:
        raise BackendError(f"unknown backend {name!r}; known: {', '.join(backends)}")
    return backends[name]()


def default_backends() -> list[Backend]:
    """Every backend that can run here: mlx, torch, and the mlx-rs port (through its Python extension
    and through its Rust adapter binary) when built."""
    backends = [b for b in (make() for make in registry().values()) if not isinstance(b, MissingBackend)]
    return backends + [b for b in (get_backend("mlx-rs"), get_backend("mlx-rs-bin")) if b.unavailable() is None]


__all__ = ["Backend", "BackendError", "TrainerBackend", "get_backend", "default_backends", "registry"]
