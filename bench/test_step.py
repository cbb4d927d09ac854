"""The training step (accumulate, clip, AdamW update), timed per backend and size."""

import pytest
from conftest import rounds


@pytest.mark.step
def test_step(benchmark, runner, batch, size, quick, record):
    warmup, n = rounds(size, quick)
    parts = benchmark.pedantic(runner.step, args=(batch,), rounds=n, warmup_rounds=warmup, iterations=1)
    assert parts["total"] == parts["total"], "the loss is NaN"
    record(runner.backend, "step")
