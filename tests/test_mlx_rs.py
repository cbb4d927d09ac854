"""The mlx-rs port (rust/): every stage on every fixture, its injected failures caught, errors as
Python exceptions. Skipped only where no Rust toolchain exists; where one does, the extension must
be built (the README's test command builds it)."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mlx_parity.harness.backends.mlx_rs import RUST_INJECTIONS, extension_built

from .conftest import CASES, audited, skip_without_cargo

skip_without_cargo("the mlx-rs port")


@pytest.fixture(scope="module")
def P():
    assert extension_built(), "cargo exists but the parity_mlx_rs extension is not built: run `make rust`"
    import parity_mlx_rs

    return parity_mlx_rs


CASE = CASES["gqa_padded"]


@pytest.mark.parametrize("fixture", sorted(CASES))
def test_every_stage_passes(P, fixture):
    result = audited("mlx-rs", fixture)
    failing = [f"{s.name}: {s.message}" for s in result.stages if s.status != "pass"]
    assert not failing, failing


@pytest.mark.parametrize("inject", sorted(RUST_INJECTIONS))
def test_injected_failure_is_caught_with_its_diagnosis(P, inject):
    stage, diagnosis, fixtures = RUST_INJECTIONS[inject]
    first = audited(f"mlx-rs:{inject}", fixtures[0]).first_failure()
    assert first is not None, f"{inject} passed every stage"
    assert (first.name, first.diagnosis.code) == (stage, diagnosis), first.message


def trainer(P, **settings):
    return P.Trainer(str(CASE.checkpoint), json.dumps({**CASE.settings_dict, **settings}))


@pytest.mark.parametrize(
    "change, exc",
    [
        ({"auth_weight": np.full(4, 1.0, np.float32)}, ValueError),
        ({"prov_entropy": np.full(4, -1.0, np.float32)}, ValueError),
        ({"prov_entropy": np.full(4, np.nan, np.float32)}, ValueError),
    ],
)
def test_bad_batch_is_a_python_exception(P, change, exc):
    with pytest.raises(exc):
        trainer(P).loss(CASE.batch | change)


@pytest.mark.parametrize(
    "settings", [{"loss": {"alpha": 3.5, "lambda": 1.0}}, {"inject": "bogus"}, {"learning_rate": 1}]
)
def test_bad_settings_are_a_python_exception(P, settings):
    with pytest.raises(ValueError):
        trainer(P, **settings)


def test_strict_loading_lists_every_problem(P, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(CASE.checkpoint, ck)
    t = load_file(str(ck / "model.safetensors"))
    t["model.extra.weight"] = np.zeros(3, np.float32)
    del t["lm_head.weight"]
    t["model.norm.weight"] = t["model.norm.weight"].astype(np.int32)  # not floating point: no weight
    save_file(t, str(ck / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        P.Trainer(str(ck), json.dumps(CASE.settings_dict))
    assert all(k in str(e.value) for k in ("lm_head.weight", "model.extra.weight", "model.norm.weight"))
    report = P.Trainer(str(ck), json.dumps(CASE.settings_dict), None, False).load_report()
    assert "lm_head.weight" in report["missing"] and report["unexpected"] == ["model.extra.weight"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_checkpoint_loads_into_float32_exactly(P, tmp_path, dtype):
    """Released models are stored in bfloat16: the port loads them into its float32 (master) weights exactly,
    as the reference does."""
    import torch
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    from mlx_parity.reference.settings import TrainSettings
    from mlx_parity.reference.trainer import Trainer

    ck = tmp_path / "ck"
    shutil.copytree(CASE.checkpoint, ck)
    f = ck / "model.safetensors"
    save_torch({k: v.to(getattr(torch, dtype)) for k, v in load_torch(str(f)).items()}, str(f))
    rust = P.Trainer(str(ck), json.dumps(CASE.settings_dict)).parameters()
    ref, _ = Trainer.from_pretrained(ck, TrainSettings.from_dict(CASE.settings_dict))
    half = {k: v.float().numpy() for k, v in load_torch(str(f)).items()}
    for k, v in rust.items():
        assert (
            v.dtype == np.float32 and np.array_equal(v, half[k]) and np.array_equal(v, np.array(ref.parameters()[k]))
        ), k


def test_reference_resumes_a_rust_checkpoint_exactly(P, tmp_path):
    """The port writes the reference's checkpoint layout: the reference continues it bit for bit."""
    from mlx_parity.reference.trainer import Trainer

    rust = trainer(P)
    rust.step(CASE.batch)
    rust.save_checkpoint(str(tmp_path / "ckpt"))
    rust.step(CASE.batch)
    ref = Trainer.load_checkpoint(tmp_path / "ckpt")
    ref.step(CASE.batch)
    for k, v in rust.parameters().items():
        assert np.array_equal(v, np.array(ref.parameters()[k])), k
