"""mlx-parity: proves that a Rust (mlx-rs) port of an MLX training loop trains like its Python reference.

One distinctive top-level package, so nothing collides with other installed packages. The repository keeps
its parts at the top and maps them here (pyproject.toml): `mlx_parity.harness` (harness/),
`mlx_parity.reference` (reference/), and as package data `fixtures/`, `examples/` and `bench/`.
"""
