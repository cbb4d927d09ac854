"""The machine's float32 matmul peak as each library reaches it (MLX through its bound BLAS, torch
through its own), so step rates can be given as a share of it."""

import pytest

N = 2048


def _matmul(backend):
    if backend == "mlx":
        import mlx.core as mx

        a, b = mx.random.normal((N, N)), mx.random.normal((N, N))
        mx.eval(a, b)
        return lambda: mx.eval(a @ b)
    import torch

    a, b = torch.randn(N, N), torch.randn(N, N)
    return lambda: a @ b


@pytest.mark.peak
def test_matmul_peak(benchmark, available, quick):
    fn = _matmul(available)
    benchmark.pedantic(fn, rounds=5 if quick else 10, warmup_rounds=1, iterations=1)
    best = benchmark.stats.stats.min
    benchmark.extra_info.update(
        {
            "backend": available,
            "op": "peak",
            "n": N,
            "gflops_best": 2 * N**3 / best / 1e9,
            "gflops_median": 2 * N**3 / benchmark.stats.stats.median / 1e9,
        }
    )
