"""Shared fixtures: the bundled cases, audit results computed once per session, and the bundled fixtures
regenerated once per session."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest

from mlx_parity.harness.audit import audit, judge
from mlx_parity.harness.backends import get_backend
from mlx_parity.harness.case import list_cases
from mlx_parity.harness.data_parallel import audit_world
from mlx_parity.harness.fixtures.build import build_fixture
from mlx_parity.harness.fixtures.specs import SPECS
from mlx_parity.harness.stages import ALL_STAGES, StageOutput

CASES = {c.name: c for c in list_cases()}
_AUDITS: dict = {}
# The slowest test files, slowest first (seconds of one worker in `make test` here, 2026-12-07: 153, 104, 81, 65,
# 64, 51, 42; every other file at most 25). They are collected first so that pytest-xdist's workers, which take whole
# files in the order collected (`make test` passes --no-loadscope-reorder), finish together rather than one
# starting the slowest file when the other has nothing left.
SLOWEST_FIRST = (
    "test_real_model.py",
    "test_mlx_rs.py",
    "test_data_parallel.py",
    "test_mutants.py",
    "test_external.py",
    "test_wheel.py",
    "test_selftest.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


def audit_once(backend, case, stages=ALL_STAGES, world: int = 1):
    """`audit()` (on `world` ranks, `audit_world()`), run once per (backend name, fixture folder, stages, world)
    in a session: the tests that read the same audit share its result (and must not change it). Only for
    backends whose name says everything they do: the registry's, the catalogue's mutants (combined ones
    included) and the mlx-rs injections."""
    key = (backend.name, str(case.path), tuple(stages), world)
    if key not in _AUDITS:
        _AUDITS[key] = audit(backend, case, stages) if world == 1 else audit_world(backend, case, world, stages)
    return _AUDITS[key]


def skip_without_cargo(what: str) -> None:
    """Skip the calling test module, saying why, on a machine with no Rust toolchain: `what` cannot be built
    there. Where cargo exists, the README's test command builds every Rust port, so nothing is skipped."""
    if shutil.which("cargo") is None and not (Path.home() / ".cargo" / "bin" / "cargo").exists():
        pytest.skip(f"no Rust toolchain (cargo) on this machine: {what} cannot be built here", allow_module_level=True)


def audited(backend: str, fixture: str, stages=ALL_STAGES, world: int = 1):
    """The session's audit of a bundled fixture by a backend named as `parity audit -b` names it."""
    return audit_once(get_backend(backend), CASES[fixture], stages, world)


@pytest.fixture(params=sorted(CASES), ids=sorted(CASES))
def case(request):
    return CASES[request.param]


@functools.cache
def _built(name: str, root: str):
    """One fixture built from its spec into `root`, once per session."""
    spec = next(s for s in SPECS if s.name == name)
    out = Path(root) / name
    build_fixture(spec, out)  # the real one, also where a test has replaced build.build_fixture
    return out


@pytest.fixture(scope="session")
def built_once(tmp_path_factory):
    """`build_fixture` that builds each bundled fixture once per session and copies that build wherever it is
    asked for again (regeneration is the slow part of the fixture tests; its result does not change)."""
    root = str(tmp_path_factory.mktemp("regenerated"))

    def build(spec, out):
        shutil.copytree(_built(spec.name, root), out)

    return build


def judge_with(case, stage: str, prefix: str, name: str, value):
    """Judge the reference's own goldens for one stage with one tensor replaced."""
    out = {k: v for k, v in case.golden.items() if k.startswith(prefix)}
    out[name] = value
    return judge(stage, StageOutput(out), case)
