"""pytest-benchmark suites of the training step and its stages, per backend and model size.

    python -m pytest bench                                   # every available backend and size, in this process
    python -m pytest bench --bench-backend mlx --bench-size 5M -m step
    python -m pytest bench -m scale                          # an audit of SmolLM2-135M (`make real`): memory, cmd: cost
    python -m pytest bench -m fixtures                       # building fixtures: seconds per phase, MiB per file
    parity bench [--quick]                                   # one process per backend and size, with a report

Options: `--bench-backend` (mlx, torch, mlx-rs; repeatable; default every available one), `--bench-size`
(1M, 5M, 20M; repeatable), `--bench-quick` (fewer rounds). Thread count: `PARITY_BENCH_THREADS`
(default: every core), applied to torch with `torch.set_num_threads`; the BLAS libraries read
`OMP_NUM_THREADS`, `MKL_NUM_THREADS` and `OPENBLAS_NUM_THREADS` when they load, which `parity bench`
sets per process. Warm-up rounds are run and left out of the statistics.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# imports harness first: the fast BLAS is bound before MLX works
from mlx_parity.harness.bench.runner import Runner, backend_threads, mlx_rs_unavailable, peak_rss_mb, set_threads
from mlx_parity.harness.bench.workload import BACKENDS, SIZES, ensure_checkpoint, make_batch, param_count


def pytest_addoption(parser):
    g = parser.getgroup("parity bench")
    g.addoption("--bench-backend", action="append", choices=BACKENDS, help="backend to time (repeatable)")
    g.addoption("--bench-size", action="append", choices=list(SIZES), help="model size (repeatable)")
    g.addoption("--bench-quick", action="store_true", help="fewer rounds (what `parity bench --quick` runs)")


def pytest_configure(config):
    for m in (
        "step: the whole training step",
        "stage: one stage of the step",
        "peak: the float32 matmul peak",
        "scale: an audit of a real model (SmolLM2-135M): peak memory and the cmd: protocol's cost",
        "fixtures: building a fixture: seconds per phase and MiB per file",
    ):
        config.addinivalue_line("markers", m)


def _backends(config) -> list[str]:
    chosen = config.getoption("--bench-backend") or list(BACKENDS)
    if "mlx-rs" in chosen and mlx_rs_unavailable() and not config.getoption("--bench-backend"):
        chosen.remove("mlx-rs")
    return chosen


def pytest_generate_tests(metafunc):
    config = metafunc.config
    if "backend" in metafunc.fixturenames:
        names = _backends(config)
        if "peak" in metafunc.definition.keywords:
            names = [b for b in names if b != "mlx-rs"]  # it shares MLX's libmlx.so and BLAS
        metafunc.parametrize("backend", names, scope="session")
    if "size" in metafunc.fixturenames:
        metafunc.parametrize("size", config.getoption("--bench-size") or list(SIZES), scope="session")


def threads() -> int:
    return int(os.environ.get("PARITY_BENCH_THREADS") or os.cpu_count() or 1)


@pytest.fixture(scope="session")
def quick(request) -> bool:
    return bool(request.config.getoption("--bench-quick"))


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    given = os.environ.get("PARITY_BENCH_WORKDIR")
    return Path(given) if given else tmp_path_factory.mktemp("parity-bench")


@pytest.fixture(scope="session")
def available(backend):
    if backend == "mlx-rs" and (why := mlx_rs_unavailable()):
        pytest.skip(f"mlx-rs {why}")
    set_threads(backend, threads())
    return backend


_RUNNERS: dict = {}


@pytest.fixture
def runner(available, size, workdir):
    key = (available, size)
    if key not in _RUNNERS:
        _RUNNERS.clear()  # one model in memory at a time
        _RUNNERS[key] = Runner(available, ensure_checkpoint(SIZES[size], workdir))
    return _RUNNERS[key]


@pytest.fixture
def batch(size):
    return make_batch(SIZES[size])


def rounds(size: str, quick: bool) -> tuple[int, int]:
    """(warm-up rounds, timed rounds)."""
    if quick:
        return 1, 3
    return 2, 6 if size == "20M" else 12


@pytest.fixture
def record(benchmark, size):
    """Fills the benchmark's extra_info the report reads, after the timed call."""

    def done(backend: str, op: str, **more):
        spec = SIZES[size]
        benchmark.extra_info.update(
            {
                "backend": backend,
                "size": size,
                "op": op,
                "params": param_count(spec),
                "tokens": spec.tokens,
                "threads": backend_threads(backend) if backend != "mlx-rs" else backend_threads("mlx"),
                "peak_rss_mb": peak_rss_mb(),
                **more,
            }
        )

    return done
