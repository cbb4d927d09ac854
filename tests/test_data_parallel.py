"""Data-parallel training on this machine's CPU: the reference on MLX's ring backend (`mlx.launch`) and the
torch twin on gloo (`torchrun`). Every rank holds the same parameters and moments bit for bit, and N ranks of A
micro-batches train as one process of N·A micro-batches (bit for bit where the two sum the same gradients in
the same order: A = 1)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from mlx_parity.harness import twin_data_parallel
from mlx_parity.harness.backends import get_backend
from mlx_parity.harness.backends.external import ExternalBackend
from mlx_parity.harness.backends.mlx_backend import MLXBackend
from mlx_parity.harness.backends.torch_backend import TorchBackend
from mlx_parity.harness.cli import app
from mlx_parity.harness.data_parallel import audit_stage, launch, one_process_case
from mlx_parity.harness.diagnosis.data_parallel import _first_updates
from mlx_parity.reference import data_parallel
from mlx_parity.reference.settings import TrainSettings

from .conftest import CASES

RANKS = {"mlx": MLXBackend().ranks, "torch": TorchBackend().ranks}


def launched(engine: str, fixture: str, world: int, out: Path) -> list[dict]:
    return launch(RANKS[engine], CASES[fixture], world, out)


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
    ranks = launched(engine, fixture, 2, tmp_path)
    one = one_process(engine, fixture, accum_steps=2)
    assert set(ranks[0]) == set(one) and any(k.startswith("trajectory.delta.") for k in one)
    for k in one:
        assert np.array_equal(ranks[0][k], ranks[1][k]), f"ranks differ at {k}"
        assert np.array_equal(ranks[0][k], one[k]), f"{k}: max diff {np.abs(ranks[0][k] - one[k]).max()}"
    assert int(one["optimizer.step"]) == 1 and int(one["trajectory.step"]) == 4


@pytest.mark.parametrize("engine", ["mlx", "torch"])
def test_ranks_stay_identical_under_accumulation_clipping_and_warmup(tmp_path, engine):
    """A = 2 on two ranks with clipping and a warmup: the ranks agree bit for bit after every update; the
    first loss (before any update) is the one process's mean over its four micro-batches."""
    ranks = launched(engine, "clip_accum_warmup", 2, tmp_path)
    for k in ranks[0]:
        assert np.array_equal(ranks[0][k], ranks[1][k]), f"ranks differ at {k}"
    assert (
        ranks[0]["optimizer.loss"] == one_process(engine, "clip_accum_warmup", accum_steps=4, steps=1)["optimizer.loss"]
    )


@pytest.mark.parametrize(
    "backend, fixture, world",
    [
        ("mlx", "gqa_padded", 4),
        ("mlx", "clip_accum_warmup", 2),
        ("mlx", "bf16_lora", 2),
        ("torch", "gqa_padded", 2),
        ("mlx-rs-bin", "clip_accum_warmup", 2),  # the Rust port on mlx-c's collectives, one adapter per rank
    ],
)
def test_correct_ranks_pass_the_data_parallel_stage(backend, fixture, world):
    """Rank 0 judged as the one process of world × A micro-batches (goldens and truth built now), the ranks
    against each other bit for bit: the reference, the twin and the mlx-rs port pass, on 4 ranks too."""
    port = get_backend(backend)
    if port.unavailable():
        pytest.skip(f"{backend}: {port.unavailable()}")
    result = audit_stage(port, CASES[fixture], world)
    assert result.status == "pass", result.message
    assert {t.name.split(".")[0] for t in result.tensors} == {"optimizer", "trajectory"}
    assert any(t.name.startswith("optimizer.m.") for t in result.tensors) and 0 < result.margin <= 1


def test_a_batch_that_does_not_divide_is_not_checked_and_says_why():
    result = audit_stage(get_backend("mlx"), CASES["gqa_single"], 2)
    assert result.status == "not checked" and "does not divide into 2 ranks" in result.message


def test_the_contract_re_computed_from_each_shard_is_the_one_process_s_first_update():
    """The diagnosis re-computes every hypothesis from each shard's own gradient; its `contract` must be what
    the fixture builder's one process of 2 micro-batches gives, or no cause it names could be trusted."""
    one = one_process_case(CASES["gqa_padded"], 2)
    first = _first_updates(one, 2)
    golden = {k: v for k, v in one.golden.items() if k.startswith("optimizer.") and k != "optimizer.loss"}
    for rank in first["contract"]:
        assert set(rank) == set(golden)
        for k, v in golden.items():
            assert np.array_equal(np.asarray(rank[k]), v), k
    mask = CASES["gqa_padded"].batch["attention_mask"]  # two right-padded rows: the ranks' tokens differ
    assert first["tokens"] == [int(mask[:2, 1:].sum()), int(mask[2:, 1:].sum())] and len(set(first["tokens"])) == 2


def test_the_command_runs_the_stage_and_refuses_it_without_ranks(tmp_path):
    out = tmp_path / "dp.json"
    res = CliRunner().invoke(app, ["audit", "-f", "lora", "-b", "mlx", "--world-size", "2", "--json", str(out)])
    assert res.exit_code == 0, res.output
    stages = json.loads(out.read_text())["results"][0]["stages"]
    assert stages[-1]["name"] == "data_parallel" and stages[-1]["status"] == "pass"
    res = CliRunner().invoke(app, ["audit", "-f", "lora", "-b", "mlx", "--stage", "data_parallel"])
    assert res.exit_code == 2 and "--world-size" in res.output
    res = CliRunner().invoke(app, ["audit", "-f", "lora", "-b", "mlx", "--world-size", "0"])
    assert res.exit_code == 2 and "at least 1" in res.output


SERVER = f"{sys.executable} -m mlx_parity.harness.protocol.server"


@pytest.mark.parametrize(
    "command, launcher, status, cause",
    [  # one adapter process per rank, started by each engine's launcher; the request says which
        (f"{SERVER} mutant:dp_token_weighted", "mlx", "fail", "dp_token_weighted"),
        (f"{SERVER} torch", "torch", "pass", None),
    ],
)
def test_a_port_behind_the_protocol_answers_one_process_per_rank(command, launcher, status, cause):
    backend = ExternalBackend(command, launcher=launcher)
    result = audit_stage(backend, CASES["gqa_padded"], 2)
    assert result.status == status, result.message
    assert [d.code for d in result.diagnoses] == ([cause] if cause else [])


def test_a_port_that_trains_on_one_process_is_not_checked_with_its_own_reason(tmp_path):
    """An adapter that answers the request `data_parallel.unsupported`: the stage is not checked, never passed."""
    adapter = tmp_path / "one_process.py"
    adapter.write_text(
        "import sys, pathlib\n"
        "pathlib.Path(sys.argv[2], 'data_parallel.unsupported').write_text('this port trains on one process')\n"
    )
    result = audit_stage(ExternalBackend(f"{sys.executable} {adapter}"), CASES["gqa_padded"], 2)
    assert result.status == "not checked" and result.message.endswith("this port trains on one process")


@pytest.mark.parametrize("engine", ["mlx", "torch"])
def test_the_launchers_leave_nothing_in_the_temporary_folder(tmp_path, monkeypatch, engine):
    """mlx.launch writes a pid file and a host file per rank with mktemp and torchrun a torchelastic_* folder,
    and neither removes them: the launch gives them a scratch folder of its own, deleted with its work."""
    shared = tmp_path / "shared-tmp"
    shared.mkdir()
    monkeypatch.setenv("TMPDIR", str(shared))
    out = tmp_path / "out"
    out.mkdir()
    assert len(launched(engine, "gqa_padded", 2, out)) == 2
    assert not list(shared.iterdir()), sorted(p.name for p in shared.iterdir())
