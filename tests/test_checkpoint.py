"""Save, load, continue: bit-identical to an uninterrupted run; checkpoints are never half written."""

import numpy as np
import pytest

from mlx_parity.harness.torch_twin import TwinTrainer
from mlx_parity.reference.trainer import Trainer

from .conftest import CASES


@pytest.mark.parametrize("fixture", ["gqa_padded", "lora", "clip_accum_warmup"])
@pytest.mark.parametrize("impl", [Trainer, TwinTrainer], ids=["mlx", "torch"])
def test_resume_is_bit_identical(impl, fixture, tmp_path):
    case = CASES[fixture]
    s = case.settings

    def fresh():
        return impl.from_pretrained(case.checkpoint, s, case.lora_init)[0]

    straight = fresh()
    losses_straight = [straight.step(case.batch)["total"] for _ in range(s.steps)]
    part = fresh()
    losses = [part.step(case.batch)["total"] for _ in range(s.checkpoint_at)]
    part.save_checkpoint(tmp_path / "ckpt")
    resumed = impl.load_checkpoint(tmp_path / "ckpt")
    losses += [resumed.step(case.batch)["total"] for _ in range(s.steps - s.checkpoint_at)]
    assert losses == losses_straight
    a, b = straight.parameters(), resumed.parameters()
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k
    assert straight.optimizer_state()["step"] == resumed.optimizer_state()["step"] == s.steps


def test_resume_without_optimizer_state_differs(tmp_path):
    """The bit-identity check can fail: a resume that loses m and v is caught."""
    case = CASES["gqa_padded"]
    t = Trainer.from_pretrained(case.checkpoint, case.settings)[0]
    t.step(case.batch)
    t.save_checkpoint(tmp_path / "ckpt")
    resumed = Trainer.load_checkpoint(tmp_path / "ckpt")
    fresh_opt = Trainer(resumed.model, resumed.settings).optimizer
    resumed.optimizer = fresh_opt
    t.step(case.batch)
    resumed.step(case.batch)
    k = "lm_head.weight"
    assert not np.array_equal(np.array(t.parameters()[k]), np.array(resumed.parameters()[k]))


def test_checkpoint_is_never_overwritten(tmp_path):
    case = CASES["head"]
    t = Trainer.from_pretrained(case.checkpoint, case.settings)[0]
    t.save_checkpoint(tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    t.step(case.batch)
    with pytest.raises(FileExistsError):
        t.save_checkpoint(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before


def test_saved_model_loads_in_transformers(tmp_path):
    """A reference checkpoint without adapters is a Hugging Face checkpoint."""
    import torch
    from transformers import LlamaForCausalLM

    case = CASES["gqa_padded"]
    t = Trainer.from_pretrained(case.checkpoint, case.settings)[0]
    t.step(case.batch)
    t.save_checkpoint(tmp_path / "ckpt")
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "ckpt"), dtype=torch.float32)
    np.testing.assert_array_equal(hf.lm_head.weight.detach().numpy(), np.array(t.parameters()["lm_head.weight"]))
