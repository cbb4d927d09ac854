"""The fast BLAS (reference/blas.py): reported, really bound into libmlx.so, loud when absent, harmless
to torch beside it, and the reference still passes every fixture under it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_parity.reference import blas

REPO = Path(__file__).resolve().parent.parent
LINUX = sys.platform.startswith("linux")


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )


def test_the_active_blas_is_reported():
    info = blas.active()
    assert info is blas.activate(), "activate() runs once per process"
    assert info.label()
    if LINUX and info.fast:
        assert info.path and info.name and info.bound >= len(blas.REQUIRED)
        assert info.config, "the library's own build string is reported"


@pytest.mark.skipif(not LINUX, reason="the binding is Linux-only; macOS MLX uses Accelerate")
def test_libmlx_really_calls_the_reported_library():
    info = blas.active()
    got = blas.resolved("cblas_sgemm")
    assert got is not None
    if info.fast:
        assert Path(got).name == Path(info.path).name, f"libmlx.so's cblas_sgemm reaches {got}, not {info.path}"
    else:
        assert "mlx_cpu.libs" in got
    r = blas.report(measure=False)
    assert r["verified"] and r["resolved_cblas_sgemm"] == got


@pytest.mark.skipif(not LINUX, reason="Linux-only")
def test_off_falls_back_loudly_and_really_uses_the_bundled_blas():
    p = _python(
        "import json, mlx_parity.reference.blas as b; print(json.dumps(b.report(measure=False)))", PARITY_BLAS="off"
    )
    assert p.returncode == 0, p.stderr
    assert "PARITY_BLAS=off" in p.stderr and "WARNING" in p.stderr, "the fallback must be said on stderr"
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert not r["fast"] and "mlx_cpu.libs" in r["resolved_cblas_sgemm"]


@pytest.mark.skipif(not LINUX, reason="Linux-only")
def test_an_unusable_path_falls_back_loudly():
    p = _python("import mlx_parity.reference.blas as b; print(b.active().fast)", PARITY_BLAS="/nonexistent/libcblas.so")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"
    assert "could not be used" in p.stderr and "reference BLAS" in p.stderr


@pytest.mark.skipif(not LINUX, reason="Linux-only")
def test_no_candidate_warns_with_the_fix():
    # Hide every candidate: no ngsolve_openblas on the path, no Debian or MKL library.
    code = (
        "import mlx_parity.reference.blas as b\nb._candidates = lambda: []\nb._STATE = None\nprint(b.activate().fast)"
    )
    p = _python(code)
    assert p.stdout.strip() == "False"
    assert "no fast BLAS found" in p.stderr and "pip install ngsolve-openblas" in p.stderr


@pytest.mark.skipif(not LINUX, reason="Linux-only")
def test_mlx_matmuls_agree_with_numpy_under_the_active_blas():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((67, 129)).astype(np.float32), rng.standard_normal((129, 33)).astype(np.float32)
    got = np.array(mx.array(a) @ mx.array(b))
    np.testing.assert_allclose(got, a.astype(np.float64) @ b, rtol=1e-4, atol=1e-4)
    x = rng.standard_normal((5, 40, 24)).astype(np.float32)
    got = np.array(mx.array(x) @ mx.array(x).transpose(0, 2, 1))
    np.testing.assert_allclose(got, x.astype(np.float64) @ x.transpose(0, 2, 1), rtol=1e-4, atol=1e-4)


def test_torch_beside_mlx_keeps_its_own_blas():
    """Bound into libmlx.so only: torch's batched matmul in the same process still works (a global load of
    OpenBLAS 0.3.33 crashes it) and gives torch's answer."""
    import torch

    rng = np.random.default_rng(1)
    q, k = (
        rng.standard_normal((4, 4, 64, 16)).astype(np.float32),
        rng.standard_normal((4, 4, 64, 16)).astype(np.float32),
    )
    s = (torch.from_numpy(q) @ torch.from_numpy(k).transpose(-1, -2)).numpy()
    np.testing.assert_allclose(s, q.astype(np.float64) @ k.transpose(0, 1, 3, 2), rtol=1e-4, atol=1e-4)


def test_every_fixture_passes_under_the_active_blas(tmp_path):
    """The reference against every golden fixture, in a fresh process with the default (fast) BLAS on a thread
    count this machine's other runs do not use (one more than its cores: the in-process audits of the suite run
    on the default count), so its kernels split their work otherwise."""
    out = tmp_path / "audit.json"
    threads = str((os.cpu_count() or 1) + 1)
    p = subprocess.run(
        [sys.executable, "-m", "mlx_parity.harness.cli", "audit", "-b", "mlx", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "OPENBLAS_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OMP_NUM_THREADS": threads},
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert results and all(r["verdict"] == "pass" for r in results)
    if LINUX:
        assert "WARNING" not in p.stderr or not blas.active().fast, p.stderr


@pytest.mark.skipif(not LINUX, reason="Linux-only")
def test_reference_blas_block_switches_libmlx_back_and_forth():
    info = blas.active()
    before = blas.resolved()
    rng = np.random.default_rng(2)
    a = rng.standard_normal((64, 300)).astype(np.float32)
    with blas.reference_blas():
        inside = blas.resolved()
        ref1 = np.array(mx.array(a) @ mx.array(a.T))
    with blas.reference_blas():
        ref2 = np.array(mx.array(a) @ mx.array(a.T))
    assert "mlx_cpu.libs" in inside
    assert blas.resolved() == before
    np.testing.assert_array_equal(ref1, ref2)  # the reference BLAS is deterministic
    if info.fast:
        assert Path(before).name == Path(info.path).name


@pytest.mark.skipif(not LINUX, reason="Linux-only")
def test_fast_blas_inside_a_reference_block_switches_to_the_fast_library_and_back():
    info = blas.active()
    if not info.fast:
        pytest.skip("no fast BLAS is bound here (PARITY_BLAS=off or none found): nothing to switch to")
    fast = blas.resolved()
    with blas.reference_blas():
        with blas.fast_blas():
            assert blas.resolved() == fast
        assert "mlx_cpu.libs" in blas.resolved(), "back to the reference BLAS the outer block chose"
    assert blas.resolved() == fast
