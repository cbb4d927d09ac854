"""Weight loading: sharded and single files, tied heads, rotary buffers, and the explicit name map."""

import numpy as np
from safetensors.numpy import load_file

from mlx_parity.harness.torch_twin import twin_name
from mlx_parity.reference.config import ModelConfig
from mlx_parity.reference.settings import TrainSettings
from mlx_parity.reference.trainer import Trainer
from mlx_parity.reference.weights import name_map, read_checkpoint

from .conftest import CASES


def test_sharded_checkpoint_loads_every_key():
    case = CASES["mha_sharded"]
    files = sorted(case.checkpoint.glob("model-*.safetensors"))
    assert len(files) >= 2
    tensors = {k: v for f in files for k, v in load_file(str(f)).items()}
    trainer, report = Trainer.from_pretrained(case.checkpoint, TrainSettings())
    assert report.ok and not report.ignored
    params = trainer.parameters()
    assert set(params) == set(tensors)
    for k, v in tensors.items():
        assert np.array_equal(np.array(params[k]), v), k


def test_tied_head_uses_the_embedding():
    case = CASES["tied"]
    trainer, report = Trainer.from_pretrained(case.checkpoint, TrainSettings())
    assert "lm_head.weight" not in trainer.parameters()
    assert report.ignored == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    import mlx.core as mx

    logits, hidden = trainer.model.forward(mx.array(case.batch["input_ids"]))
    normed = trainer.model.model.norm(hidden[-1])
    expected = np.array(normed) @ np.array(trainer.parameters()["model.embed_tokens.weight"]).T
    np.testing.assert_allclose(np.array(logits), expected, rtol=1e-5, atol=1e-5)


def test_name_map_lists_exactly_the_checkpoint_keys(case):
    cfg = ModelConfig.from_file(case.checkpoint)
    keys = {k for k in read_checkpoint(case.checkpoint) if "rotary_emb" not in k}
    assert set(name_map(cfg)) == keys


def test_twin_name_map_is_its_own():
    assert twin_name("model.layers.3.self_attn.k_proj.weight") == "blocks.3.attn.wk.weight"
    assert twin_name("model.layers.0.mlp.down_proj.bias") == "blocks.0.ffn.w_down.bias"
    assert twin_name("lm_head.weight") == "head.weight"
    assert twin_name("model.model.norm.weight") is None
    assert twin_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None


def test_hf_defaults_differ_from_mlx_defaults():
    """LlamaConfig's defaults, not MLX's: eps 1e-6 and untied heads when the config is silent."""
    cfg = ModelConfig.from_dict(
        {"vocab_size": 8, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    )
    assert (
        cfg.rms_norm_eps == 1e-6
        and cfg.tie_word_embeddings is False
        and cfg.num_key_value_heads == 2
        and cfg.head_dim == 4
    )


def test_a_bfloat16_checkpoint_loads_exactly_into_float32_in_both_frameworks():
    """The bf16_checkpoint fixture stores bfloat16 (how released models ship): the reference and the twin load
    the very same numbers into float32 parameters; numpy cannot read bfloat16, so the truth is torch's cast."""
    import torch
    from safetensors.torch import load_file as load_torch

    from mlx_parity.harness.torch_twin import TwinTrainer

    case = CASES["bf16_checkpoint"]
    stored = load_torch(str(case.checkpoint / "model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    mlx, report = Trainer.from_pretrained(case.checkpoint, TrainSettings())
    twin, twin_report = TwinTrainer.from_pretrained(case.checkpoint, TrainSettings())
    assert report.ok and twin_report.ok
    theirs = {k: v.numpy() for k, v in twin.parameters().items()}
    for k, t in stored.items():
        want = t.float().numpy()
        assert np.array(mlx.parameters()[k]).dtype == np.float32 and np.array_equal(
            np.array(mlx.parameters()[k]), want
        ), k
        assert np.array_equal(np.asarray(theirs[k]), want), k
        assert np.array_equal(case.initial_weights[f"weights.{k}"], want), k
