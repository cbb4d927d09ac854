"""Bad input gives a clear error and loses nothing."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mlx_parity.harness.torch_twin import TwinTrainer
from mlx_parity.reference.config import ConfigError, ModelConfig
from mlx_parity.reference.loss import BatchError, LossSettings
from mlx_parity.reference.settings import SettingsError, TrainSettings
from mlx_parity.reference.trainer import Trainer
from mlx_parity.reference.weights import WeightLoadError

from .conftest import CASES

CASE = CASES["gqa_padded"]


def host(x) -> np.ndarray:
    return x.detach().numpy().copy() if hasattr(x, "detach") else np.array(x)


def batch(**changes):
    b = {k: v.copy() for k, v in CASE.batch.items()}
    b.update(changes)
    return b


@pytest.fixture(scope="module", params=[Trainer, TwinTrainer], ids=["mlx", "torch"])
def trainer(request):
    return request.param.from_pretrained(CASE.checkpoint, TrainSettings())[0]


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"auth_weight": np.array([0.1, 0.995, 0.2, 0.3], np.float32)},
            r"auth_weight must be in \[0, 0.99\]; rows \[1\]",
        ),
        ({"auth_weight": np.array([-0.1, 0.5, 0.2, 0.3], np.float32)}, r"rows \[0\]"),
        ({"auth_weight": np.array([0.1, np.nan, 0.2, 0.3], np.float32)}, "auth_weight holds non-finite"),
        ({"prov_entropy": np.array([1.0, -2.0, 0.0, 1.0], np.float32)}, r"prov_entropy must be >= 0; rows \[1\]"),
        ({"prov_entropy": np.array([1.0, np.inf, 0.0, 1.0], np.float32)}, "prov_entropy holds non-finite"),
        ({"auth_weight": np.float32(0.5)}, r"auth_weight must have shape \(4,\)"),
        ({"auth_weight": np.array([0.1, 0.2], np.float32)}, r"auth_weight must have shape \(4,\)"),
        ({"attention_mask": np.ones((4, 15), np.int32)}, "attention_mask shape"),
        ({"attention_mask": np.array([[0] + [1] * 15] * 4, np.int32)}, "right padding"),
        ({"attention_mask": np.full((4, 16), 2, np.int32)}, "only 0 and 1"),
        ({"input_ids": np.zeros((4, 1), np.int32), "attention_mask": np.ones((4, 1), np.int32)}, "T >= 2"),
        ({"input_ids": np.zeros((4, 16), np.float32)}, "must be integers"),
    ],
)
def test_invalid_batch_is_a_clear_error(trainer, changes, message):
    before = {k: host(v) for k, v in trainer.parameters().items()}
    with pytest.raises(BatchError, match=message):
        trainer.step(batch(**changes))
    after = trainer.parameters()
    assert all(np.array_equal(before[k], host(after[k])) for k in before), "a rejected batch changed the model"


@pytest.mark.parametrize(
    "w, h, message",
    [
        (1.0, 0.5, r"auth_weight must be in \[0, 0.99\]; rows \[0\] hold \[1.0\]"),
        (-0.01, 0.5, "auth_weight must be in"),
        ([0.2, 0.995], [1.0, 1.0], r"rows \[1\]"),
        (0.5, -1e-3, "prov_entropy must be >= 0"),
        (np.array([0.1, 0.2]), np.array([0.0, np.nan]), r"prov_entropy holds non-finite values at \[1\]"),
        (float("inf"), 0.0, "auth_weight holds non-finite"),
    ],
)
def test_distrust_rejects_bad_scalars_and_arrays(w, h, message):
    from mlx_parity.reference.loss import distrust

    with pytest.raises(BatchError, match=message):
        distrust(w, h, 2.7)


def test_float32_099_is_099():
    from mlx_parity.reference.loss import validate_distrust_inputs

    validate_distrust_inputs(np.float32(0.99), 0.0)
    with pytest.raises(BatchError):
        validate_distrust_inputs(np.nextafter(np.float32(0.99), np.float32(1)), 0.0)


def test_distrust_accepts_scalars_and_arrays():
    from mlx_parity.reference.loss import distrust

    assert float(distrust(0.5, 1.0, 2.7)) == pytest.approx(2.7 * (np.log(0.5 + 1e-8) + 1.0) ** 2, rel=1e-6)
    assert float(distrust([0.0, 0.9], [2.0, 0.0], 2.3)) == pytest.approx(
        np.mean([2.3 * (np.log(1 + 1e-8) + 2) ** 2, 2.3 * np.log(0.1 + 1e-8) ** 2]), rel=1e-6
    )
    with pytest.raises(BatchError, match="alpha must be in"):
        distrust(0.5, 1.0, 3.5)


@pytest.mark.parametrize("alpha, lam", [(2.2, 1.0), (3.01, 1.0), (float("nan"), 1.0), (2.7, -1.0)])
def test_invalid_loss_settings(alpha, lam):
    with pytest.raises(BatchError):
        LossSettings(alpha=alpha, lam=lam)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"trainable": "all"}, "trainable must be one of"),
        ({"accum_steps": 0}, "accum_steps"),
        ({"optimizer": {"betas": [0.9, 1.0]}}, "betas"),
        ({"steps": 2, "checkpoint_at": 2}, "checkpoint_at"),
        ({"learning_rate": 1e-3}, "unknown settings keys"),
        ({"schedule": {"kind": "linear"}}, "schedule.kind"),
    ],
)
def test_invalid_settings(settings, message):
    with pytest.raises(SettingsError, match=message):
        TrainSettings.from_dict(settings)


def test_accumulation_needs_a_divisible_batch(trainer):
    t = type(trainer).from_pretrained(CASE.checkpoint, TrainSettings.from_dict({"accum_steps": 3}))[0]
    with pytest.raises(SettingsError, match="not divisible"):
        t.step(CASE.batch)


def copy_checkpoint(tmp_path, name="gqa_padded"):
    dst = tmp_path / "ckpt"
    shutil.copytree(CASES[name].checkpoint, dst)
    return dst


@pytest.mark.parametrize("impl", [Trainer, TwinTrainer], ids=["mlx", "torch"])
def test_missing_unexpected_and_misshapen_keys_are_all_listed(impl, tmp_path):
    ckpt = copy_checkpoint(tmp_path)
    t = load_file(str(ckpt / "model.safetensors"))
    del t["lm_head.weight"]
    t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"].T.copy()
    t["model.extra.weight"] = np.zeros(3, np.float32)
    save_file(t, str(ckpt / "model.safetensors"))
    with pytest.raises(WeightLoadError) as e:
        impl.from_pretrained(ckpt, TrainSettings())
    report = e.value.report
    assert report.missing == ["lm_head.weight"]
    assert report.unexpected == ["model.extra.weight"]
    assert len(report.mismatched) == 1 and report.mismatched[0].startswith(
        "model.layers.0.self_attn.k_proj.weight: checkpoint (32, 16)"
    )
    assert "missing (1): lm_head.weight" in str(e.value)
    # not strict: loads, and reports the same problems
    _, report2 = impl.from_pretrained(ckpt, TrainSettings(), strict=False)
    assert report2.missing == report.missing and report2.unexpected == report.unexpected


def test_prefixed_keys_map_nothing(tmp_path):
    """The seed's bug: every key written as `model.` + name. Strict loading names every one."""
    ckpt = copy_checkpoint(tmp_path)
    t = load_file(str(ckpt / "model.safetensors"))
    save_file({f"model.{k}": v for k, v in t.items()}, str(ckpt / "model.safetensors"))
    with pytest.raises(WeightLoadError) as e:
        Trainer.from_pretrained(ckpt, TrainSettings())
    assert len(e.value.report.missing) == len(t) and "model.lm_head.weight" in e.value.report.unexpected


@pytest.mark.parametrize("impl", [Trainer, TwinTrainer], ids=["mlx", "torch"])
def test_truncated_safetensors(impl, tmp_path):
    ckpt = copy_checkpoint(tmp_path)
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(Exception, match="model.safetensors|incomplete|truncat|invalid|Error"):
        impl.from_pretrained(ckpt, TrainSettings())


def test_corrupted_header(tmp_path):
    ckpt = copy_checkpoint(tmp_path)
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"\xff" * 8
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        Trainer.from_pretrained(ckpt, TrainSettings())


def test_missing_shard_is_named(tmp_path):
    ckpt = copy_checkpoint(tmp_path, "mha_sharded")
    shard = sorted(ckpt.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.stem):
        Trainer.from_pretrained(ckpt, TrainSettings())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "gemma"}, "model_type"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_type 'yarn'"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "needs 'factor'"),
        ({"num_key_value_heads": 3}, "not a multiple"),
        ({"hidden_size": None}, "hidden_size|int"),
    ],
)
def test_unsupported_config(change, message):
    cfg = json.loads((CASE.checkpoint / "config.json").read_text())
    cfg.update(change)
    if change.get("hidden_size", 1) is None:
        del cfg["hidden_size"]
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(cfg)
