"""`parity bench`: the training step and its stages timed for each backend, one process per backend and size.

The timing itself is the pytest-benchmark suite in `bench/` (runnable alone: `python -m pytest bench`).
`session.run()` builds three tiny Llama checkpoints (about 1M, 5M and 20M parameters, `workload`), then for
every backend (`mlx`: the reference, `torch`: the twin, `mlx-rs`: the extension when `import parity_mlx_rs`
works) and size starts `python -m pytest bench` in a fresh process with its thread count fixed
(`OMP_NUM_THREADS`, `MKL_NUM_THREADS`, `OPENBLAS_NUM_THREADS`, `torch.set_num_threads`), collects the
pytest-benchmark JSON, measures the machine's float32 matmul peak the same way, summarises (`stats`), and
writes the JSON, a Markdown report (`report`) and a PNG plot (`plot`). (The fast BLAS is bound into libmlx.so
alone, so torch keeps the BLAS it ships with even where MLX is loaded beside it.) `runner` is one backend
inside such a process; `gpu` drives the GPU bench's worker, `bench/gpu.py`.

Model FLOPs per step are taken as 6 · parameters · tokens (forward 2, backward 4; attention's own
T² terms left out), the usual convention, so "share of peak" is a lower bound of the real work rate.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH_DIR = REPO / "bench"  # the pytest-benchmark suites and the GPU worker
# the libraries whose versions the bench records (from package metadata: the parent imports no framework)
VERSIONS = ("mlx", "torch", "numpy", "parity_mlx_rs")
