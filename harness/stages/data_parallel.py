"""data_parallel: the step trained by N ranks (`parity audit --world-size N`), each started by the backend's
engine launcher; rank 0 judged as the one process of N·A micro-batches, the ranks against each other bit for bit
(harness/data_parallel.py runs it: no session computes it)."""

from __future__ import annotations

from ..diagnosis.data_parallel import data_parallel
from .base import Stage

STAGE = Stage(
    "data_parallel",
    "dp",
    None,
    consumes=("optimizer", "trajectory"),
    launched=True,
    diagnose=data_parallel,
)
