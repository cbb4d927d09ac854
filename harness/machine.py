"""The machine a result was made on and the library versions it ran with, recorded beside the result (the
fixtures' manifest, the bench's JSON and report); written once here so both say the same."""

from __future__ import annotations

import importlib
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def versions(*packages: str, imported: bool = False) -> dict[str, str]:
    """Python's version and each package's, keyed by its import name. `imported`: as the imported module
    reports it (`__version__`; torch's carries its build tag, e.g. +cu132, which its package metadata may
    lack), for a record of what computed a result; otherwise from package metadata, which imports no
    framework (the bench's parent process loads none)."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            if imported:
                out[name] = importlib.import_module("mlx.core" if name == "mlx" else name).__version__
            else:
                out[name] = version(name)
        except (ImportError, PackageNotFoundError):
            out[name] = "not installed"
    return out


def machine() -> dict:
    """Platform, CPU model, core count and memory (GiB) of this machine."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem,
    }
