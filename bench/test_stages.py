"""The stages of the step, timed alone: load, forward, loss (forward + loss), gradients (forward +
backward), save (a checkpoint). The step itself is in test_step.py."""

import itertools

import pytest
from conftest import rounds


@pytest.mark.stage
@pytest.mark.parametrize("op", ["load", "forward", "loss", "gradients", "save"])
def test_stage(benchmark, runner, batch, size, quick, record, op, tmp_path):
    warmup, n = rounds(size, quick)
    counter = itertools.count()
    fn = {
        "load": lambda: runner.load(),
        "forward": lambda: runner.forward(batch["input_ids"]),
        "loss": lambda: runner.loss(batch),
        "gradients": lambda: runner.gradients(batch),
        "save": lambda: runner.save(tmp_path / f"ckpt-{next(counter)}"),
    }[op]
    benchmark.pedantic(fn, rounds=n, warmup_rounds=warmup, iterations=1)
    record(runner.backend, op)
