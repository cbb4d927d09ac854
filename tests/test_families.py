"""Model families and RoPE scaling: Llama (with llama3 and linear RoPE scaling), Mistral and Qwen2
configs are read in both transformers layouts, agree with transformers' own numbers, and anything
unsupported is refused with the key that makes it so."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_parity.reference.config import ConfigError, ModelConfig

from .conftest import CASES

BASE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)
LLAMA3 = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=128
)


def test_the_family_fixtures_read_as_their_family():
    qwen2, mistral, llama3 = (ModelConfig.from_file(CASES[n].checkpoint) for n in ("qwen2", "mistral", "llama3_rope"))
    assert (qwen2.model_type, qwen2.qkv_bias, qwen2.o_bias) == ("qwen2", True, False)
    assert (mistral.model_type, mistral.qkv_bias, mistral.num_key_value_heads) == ("mistral", False, 1)
    assert llama3.rope_type == "llama3" and dict(llama3.rope_scaling)["factor"] == 8.0
    qwen3 = ModelConfig.from_file(CASES["qwen3"].checkpoint)
    assert (qwen3.model_type, qwen3.qk_norm, qwen3.qkv_bias, qwen3.o_bias, qwen3.mlp_bias) == (
        "qwen3",
        True,
        False,
        False,
        False,
    )


def test_qwen3_norms_each_query_and_key_head_before_rope():
    """The q/k norms are in the checkpoint, the name map and the q/k pieces: an eps or a missing norm moves `q`."""
    import mlx.core as mx

    from mlx_parity.reference.model import LlamaForCausalLM
    from mlx_parity.reference.weights import name_map

    cfg = ModelConfig.from_file(CASES["qwen3"].checkpoint)
    assert {"model.layers.1.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight"} <= set(name_map(cfg))
    attn = LlamaForCausalLM(cfg).model.layers[0].self_attn
    x = mx.random.normal((1, 3, cfg.hidden_size))
    q, k, _ = attn.project(x)
    raw = (x @ attn.q_proj.weight.T).reshape(1, 3, cfg.num_attention_heads, cfg.head_dim).transpose(0, 2, 1, 3)
    rms = np.sqrt(np.mean(np.array(raw) ** 2, axis=-1, keepdims=True) + cfg.rms_norm_eps)
    np.testing.assert_allclose(np.array(q), np.array(raw) / rms, rtol=1e-5, atol=1e-6)


def test_both_layouts_give_one_config():
    t5 = ModelConfig.from_dict(BASE | {"rope_parameters": {"rope_theta": 5e5, **LLAMA3}})
    t4 = ModelConfig.from_dict(BASE | {"rope_theta": 5e5, "rope_scaling": {**LLAMA3}})
    legacy = ModelConfig.from_dict(
        BASE
        | {
            "rope_theta": 5e5,
            "rope_scaling": {"type": "llama3", **{k: v for k, v in LLAMA3.items() if k != "rope_type"}},
        }
    )
    assert t5 == t4 == legacy and t5.rope_theta == 5e5


@pytest.mark.parametrize("rope", [LLAMA3, {"rope_type": "linear", "factor": 4.0}, {"rope_type": "default"}])
def test_rope_frequencies_are_transformers_own(rope):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d = BASE | {"rope_parameters": {"rope_theta": 10000.0, **rope}, "max_position_embeddings": 256}
    ours = ModelConfig.from_dict(d).rope_inv_freq()
    init = ROPE_INIT_FUNCTIONS.get(rope["rope_type"])
    theirs = init(LlamaConfig(**d), "cpu")[0] if init else 10000.0 ** (-np.arange(0, 8, 2) / 8)
    np.testing.assert_allclose(ours, np.asarray(theirs, dtype=np.float64), rtol=1e-6)


@pytest.mark.parametrize(
    "config, key",
    [
        ({"model_type": "gemma"}, "model_type"),
        ({"model_type": "mistral", "sliding_window": 4096}, "sliding_window"),
        ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
        ({"model_type": "qwen3", "use_sliding_window": True}, "use_sliding_window"),
        ({"model_type": "qwen3", "layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_what_is_not_supported_is_refused_by_name(config, key):
    with pytest.raises(ConfigError, match=key):
        ModelConfig.from_dict(BASE | config)


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "mistral", "llama3_rope", "tied", "small_eps_bias"])
def test_a_saved_config_reads_back_and_loads_in_transformers(name, tmp_path):
    import json

    from transformers import AutoConfig

    cfg = ModelConfig.from_file(CASES[name].checkpoint)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    assert ModelConfig.from_file(tmp_path) == cfg
    hf = AutoConfig.from_pretrained(tmp_path)
    assert hf.model_type == cfg.model_type and hf.num_key_value_heads == cfg.num_key_value_heads
