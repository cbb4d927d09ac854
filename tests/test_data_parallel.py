"""Data-parallel training on this machine's CPU: the reference on MLX's ring backend (`mlx.launch`) and the
torch twin on gloo (`torchrun`). Every rank holds the same parameters and moments bit for bit, and N ranks of A
micro-batches train as one process of N·A micro-batches (bit for bit where the two sum the same gradients in
the same order: A = 1)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from mlx_parity.harness import twin_data_parallel
from mlx_parity.reference import data_parallel
from mlx_parity.reference.settings import TrainSettings

from .conftest import CASES

BIN = Path(sys.executable).parent
LAUNCHERS = {  # each engine's own launcher, and the module every rank runs
    "mlx": [str(BIN / "mlx.launch"), "--backend", "ring", "-n", "{n}", "--python", sys.executable, "--", "-m"],
    "torch": [str(BIN / "torchrun"), "--nproc-per-node", "{n}", "-m"],
}
MODULES = {"mlx": data_parallel, "torch": twin_data_parallel}


def launched(engine: str, fixture: str, world: int, out: Path, steps: int | None = None) -> list[dict]:
    case = CASES[fixture]
    cmd = [a.format(n=world) for a in LAUNCHERS[engine]] + [MODULES[engine].__name__]
    cmd += [str(case.checkpoint), str(case.path / "batch.safetensors"), str(case.path / "settings.json"), str(out)]
    if case.lora_init is not None:
        cmd += ["--lora-init", str(case.lora_init)]
    if steps is not None:
        cmd += ["--steps", str(steps)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return [load_file(str(out / f"rank{r}.safetensors")) for r in range(world)]


def one_process(engine: str, fixture: str, accum_steps: int, steps: int | None = None) -> dict:
    case = CASES[fixture]
    settings = TrainSettings.from_dict(json.loads((case.path / "settings.json").read_text()))
    settings = dataclasses.replace(settings, accum_steps=accum_steps)
    batch, steps = load_file(str(case.path / "batch.safetensors")), steps or settings.steps
    if engine == "mlx":
        return data_parallel.run(case.checkpoint, batch, settings, steps, None, case.lora_init)
    return twin_data_parallel.run(case.checkpoint, batch, settings, steps, case.lora_init)


@pytest.mark.parametrize(  # torchrun starts in ~8 s: the twin on one fixture of each precision
    "engine, fixture",
    [("mlx", "gqa_padded"), ("mlx", "lora"), ("mlx", "bf16_lora"), ("torch", "lora"), ("torch", "bf16_lora")],
)
def test_two_ranks_train_as_one_process_of_twice_the_micro_batches(tmp_path, engine, fixture):
    """A = 1: each rank's one micro-batch is one of the single process's two, summed in the same order
    (a + b = b + a exactly), so every Δθ, m, v, step and loss is the same bit for bit, in float32 and bfloat16."""
    ranks = launched(engine, fixture, 2, tmp_path, steps=2)
    one = one_process(engine, fixture, accum_steps=2, steps=2)
    assert set(ranks[0]) == set(one) and any(k.startswith("delta.") for k in one)
    for k in one:
        assert np.array_equal(ranks[0][k], ranks[1][k]), f"ranks differ at {k}"
        assert np.array_equal(ranks[0][k], one[k]), f"{k}: max diff {np.abs(ranks[0][k] - one[k]).max()}"
    assert int(one["step"]) == 2


@pytest.mark.parametrize("engine", ["mlx", "torch"])
def test_ranks_stay_identical_under_accumulation_clipping_and_warmup(tmp_path, engine):
    """A = 2 on two ranks with clipping and a warmup: the ranks agree bit for bit after every update; the
    first loss (before any update) is the one process's mean over its four micro-batches."""
    ranks = launched(engine, "clip_accum_warmup", 2, tmp_path)
    for k in ranks[0]:
        assert np.array_equal(ranks[0][k], ranks[1][k]), f"ranks differ at {k}"
    assert ranks[0]["loss"][0] == one_process(engine, "clip_accum_warmup", accum_steps=4, steps=1)["loss"][0]
