"""The parity harness: backends, stages, tolerances, comparison, fixtures, audit and CLI."""

from mlx_parity.reference.blas import activate as _activate_blas  # first: a fast BLAS before any module loads mlx.core

_activate_blas()
