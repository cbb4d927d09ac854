"""The forward judged piece by piece on the reference's own inputs, and each cause solved from the
numbers: the port outputs here are built in numpy from the goldens with a known wrong convention (not
from the mutant catalogue), and the diagnosis must report that convention and its value."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mlx_parity.harness import pieces as P
from mlx_parity.harness.audit import diagnose_stage as diagnose
from mlx_parity.harness.audit import judge
from mlx_parity.harness.stages import StageOutput
from mlx_parity.reference.config import ModelConfig

from .conftest import CASES, audited

CASE = CASES["gqa_padded"]  # 4 query heads on 2 kv heads, head_dim 8, rope_theta 10000, padded rows
G = {k: v.astype(np.float64) for k, v in P.given(CASE.golden).items()}
H, K, D, THETA = 4, 2, 8, 10000.0


def rope(x, positions, base=THETA):
    inv = base ** (-np.arange(0, D, 2) / D)
    ang = np.concatenate([np.outer(positions, inv)] * 2, -1)
    a, b = x[..., : D // 2], x[..., D // 2 :]
    return x * np.cos(ang) + np.concatenate([-b, a], -1) * np.sin(ang)


def diagnoses(piece: str, value: np.ndarray, case=CASE):
    out = StageOutput({P.PREFIX + k: v.astype(np.float32) for k, v in P.given(case.golden).items()})
    out.tensors[P.PREFIX + piece] = value.astype(np.float32)
    result = judge("isolated_forward", out, case)
    assert result.status == "fail" and {t.name for t in result.failures} == {P.PREFIX + piece}
    return diagnose(result, out, case)


def only(piece, value):
    found = diagnoses(piece, value)
    assert len(found) == 1, found
    return found[0]


def test_the_golden_rope_is_the_textbook_one():
    """The check below is only meaningful if the numpy RoPE here reproduces the reference's q_rope."""
    T = G["layer.0.q"].shape[2]
    np.testing.assert_allclose(rope(G["layer.0.q"], np.arange(T)), G["layer.0.q_rope"], atol=1e-5)


def test_rope_positions_offset_by_one():
    T = G["layer.0.q"].shape[2]
    d = only("layer.0.q_rope", rope(G["layer.0.q"], np.arange(T) + 1))
    assert d.code == "rope_position" and "t+1" in d.summary


def test_rope_base_is_solved():
    T = G["layer.1.k"].shape[2]
    d = only("layer.1.k_rope", rope(G["layer.1.k"], np.arange(T), base=31000.0))
    assert d.code == "rope_base" and abs(d.evidence["implied_base"] / 31000.0 - 1) < 1e-3


def test_attention_scale_is_solved():
    q, k = G["layer.0.q_rope"], np.repeat(G["layer.0.k_rope"], H // K, axis=1)
    d = only("layer.0.scores", 0.3 * q @ k.transpose(0, 1, 3, 2))
    assert d.code == "attention_scale" and abs(d.evidence["implied_scale"] - 0.3) < 1e-5


def _flat_repeat(kv):
    """kv heads repeated by concatenating flattened copies, then reshaped (a `concatenate` with no axis)."""
    B, _, T, _ = kv.shape
    return np.concatenate([kv.ravel()] * (H // K)).reshape(B, H, T, D)


def test_kv_heads_repeated_across_the_batch_are_named_in_scores_and_values():
    """A flat concatenation repeats kv heads across batch rows: row 0's query heads read rows 0 and 1."""
    q, k, v, p = G["layer.0.q_rope"], G["layer.0.k_rope"], G["layer.0.v"], G["layer.0.probs"]
    d = only("layer.0.scores", q @ _flat_repeat(k).transpose(0, 1, 3, 2) / math.sqrt(D))
    assert d.code == "gqa_head_mapping" and "another batch row" in d.summary
    assert d.evidence["kv_row_and_head_of_query_row_and_head"]["0,2"] == [1, 0]
    B, T = q.shape[0], q.shape[2]
    attn = (p @ _flat_repeat(v)).transpose(0, 2, 1, 3).reshape(B, T, H * D)
    d = only("layer.0.attn", attn)
    assert d.code == "gqa_head_mapping" and "values" in d.summary


def _softmax(s, axis):
    e = np.exp(s - np.nanmax(s, axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_a_mask_diagonal_moved_is_solved():
    s = G["layer.1.scores"]
    T = s.shape[-1]
    allowed = np.arange(T)[None, :] <= np.arange(T)[:, None] + 1
    d = only("layer.1.probs", _softmax(np.where(allowed, s, -np.inf), -1))
    assert d.code == "causal_mask" and "t+1" in d.summary


def test_softmax_over_queries_is_named():
    s = G["layer.0.scores"]
    T = s.shape[-1]
    causal = np.arange(T)[None, :] <= np.arange(T)[:, None]
    d = only("layer.0.probs", np.nan_to_num(_softmax(np.where(causal, s, -np.inf), -2)))
    assert d.code == "softmax_axis"


def test_heads_merged_without_transposing():
    o = G["layer.0.probs"] @ np.repeat(G["layer.0.v"], H // K, axis=1)  # [B, H, T, D]
    B, _, T, _ = o.shape
    assert only("layer.0.attn", o.reshape(B, T, H * D)).code == "attention_merge"


def test_gate_and_up_exchanged():
    up, gate = G["layer.1.up"], G["layer.1.gate"]
    assert only("layer.1.act", up / (1 + np.exp(-up)) * gate).code == "gate_up_swapped"


def test_embeddings_scaled():
    d = only("embed", G["embed"] * math.sqrt(32))
    assert d.code == "embedding_scale" and "sqrt(hidden_size)" in d.summary


def test_rmsnorm_eps_is_solved_without_the_weight():
    x = G[f"layer.{P.num_layers(CASE.golden) - 1}.output"]  # head.norm reads the last layer's output
    w = CASE.initial_weights["weights.model.norm.weight"].astype(np.float64)
    d = only("head.norm", w * x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-2))
    assert d.code == "rmsnorm_eps" and abs(d.evidence["implied_eps"] / 1e-2 - 1) < 1e-3


def test_rope_along_the_head_axis_is_named_not_guessed_as_a_direction():
    """A [B, T, heads, D] tensor given to a RoPE that reads positions from axis -2 rotates by the head index;
    its angles looked like −angle to a solver that never re-rotated the input (a wrong cause, once named)."""
    x = G["layer.0.q"]
    y = rope(x.transpose(0, 2, 1, 3), np.arange(H)).transpose(0, 2, 1, 3)
    d = only("layer.0.q_rope", y)
    assert d.code == "rope_position" and "head index" in d.summary


def test_rope_along_the_head_axis_with_unscaled_frequencies_is_two_causes():
    """Two bugs in one piece (llama3 scaling ignored, and positions along the head axis): each named, since
    rotating by the head index at rope_theta's plain frequencies reproduces the port's piece."""
    case = CASES["llama3_rope"]
    x = case.golden[P.PREFIX + "layer.0.q"].astype(np.float64)
    Dh, theta = x.shape[-1], ModelConfig.from_file(case.checkpoint).rope_theta
    inv = theta ** (-np.arange(0, Dh, 2) / Dh)
    ang = np.concatenate([np.outer(np.arange(x.shape[1]), inv)] * 2, -1)[None, :, None, :]
    a, b = x[..., : Dh // 2], x[..., Dh // 2 :]
    y = x * np.cos(ang) + np.concatenate([-b, a], -1) * np.sin(ang)
    assert {d.code for d in diagnoses("layer.0.q_rope", y, case)} == {"rope_position", "rope_scaling"}


def test_rope_over_fewer_dimensions_is_named_not_guessed_as_a_pairing():
    """RoPE sized by another head_dim (here 4 of 8 dimensions): once named an interleaved pairing."""
    x, T = G["layer.0.k"], G["layer.0.k"].shape[2]
    inv = THETA ** (-np.arange(0, 4, 2) / 4)
    ang = np.concatenate([np.outer(np.arange(T), inv)] * 2, -1)
    a, b = x[..., :2], x[..., 2:4]
    head = x[..., :4] * np.cos(ang) + np.concatenate([-b, a], -1) * np.sin(ang)
    d = only("layer.0.k_rope", np.concatenate([head, x[..., 4:]], -1))
    assert d.code == "rope_dims" and d.evidence["rotated_dims"] == 4


def test_a_layer_norm_is_named_and_never_an_impossible_eps():
    """A LayerNorm where the model has an RMSNorm once read as "RMSNorm implies eps = -0.000186"."""
    x = G[f"layer.{P.num_layers(CASE.golden) - 1}.output"]
    w = CASE.initial_weights["weights.model.norm.weight"].astype(np.float64)
    xc = x - x.mean(-1, keepdims=True)
    assert only("head.norm", w * xc / np.sqrt((xc * xc).mean(-1, keepdims=True) + 1e-5)).code == "layer_norm"


def test_a_norm_no_eps_reproduces_is_localised():
    """Each row scaled by its own random factor: the rows' ratios imply some eps, but no eps reproduces the
    output, so none is named (a solver's estimate is not a cause until it re-computes the port's numbers)."""
    x = G["layer.0.output"]
    w = CASE.initial_weights["weights.model.layers.1.input_layernorm.weight"].astype(np.float64)
    y = w * x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5)
    y = y * (1 + 0.05 * np.random.default_rng(0).standard_normal(y.shape[:-1]))[..., None]
    assert only("layer.1.input_norm", y).code == "piece_divergence"


def test_a_weight_used_untransposed():
    x = G["layer.0.input_norm"]
    W = CASE.initial_weights["weights.model.layers.0.self_attn.q_proj.weight"].astype(np.float64)
    y = (x @ W).reshape(*x.shape[:2], H, D).transpose(0, 2, 1, 3)
    assert only("layer.0.q", y).code == "weight_transposed"


def test_an_unexplained_piece_is_localised_to_that_piece():
    v = G["layer.1.down"].copy()
    v[0, 2, 5] += 0.1
    d = only("layer.1.down", v)
    assert (
        d.code == "piece_divergence"
        and d.pieces == ["layer.1.down"]
        and d.parameters == ["model.layers.1.mlp.down_proj"]
    )


@pytest.mark.parametrize(
    "mutant, fixture, code",
    [
        ("rope_traditional", "gqa_padded", "rope_pairing"),
        ("rope_theta_hardcoded", "tied", "rope_base"),
        ("attention_scale_wrong", "mha_sharded", "attention_scale"),
        ("causal_mask_flipped", "tied", "causal_mask"),
        ("gqa_tiled_heads", "gqa_single", "gqa_head_mapping"),
        ("mlp_gelu", "head", "mlp_activation"),
        ("rmsnorm_eps_hardcoded", "gqa_single", "rmsnorm_eps"),
        ("attention_bias_ignored", "small_eps_bias", "bias_missing"),
        ("lora_scale_ignored", "lora", "lora_scale"),
    ],
)
def test_each_forward_bug_is_one_finding_at_its_piece(mutant, fixture, code):
    found, _ = audited(f"mutant:{mutant}", fixture).findings()
    assert [(f.stage, f.code) for f in found] == [("isolated_forward", code)], found


def _gradient_diagnosis(change):
    case = CASES["gqa_padded"]
    out = StageOutput({k: v.copy() for k, v in case.golden.items() if k.startswith("grad.")})
    change(out.tensors)
    result = judge("gradients", out, case)
    assert result.status == "fail"
    return diagnose(result, out, case)[0]


def test_a_transposed_gradient_is_named():
    name = "grad.model.layers.0.self_attn.q_proj.weight"
    d = _gradient_diagnosis(lambda t: t.__setitem__(name, np.ascontiguousarray(t[name].T)))
    assert d.code == "gradient_layout" and d.evidence["transposed"] == [name.removeprefix("grad.")]


def test_a_gradient_with_its_heads_in_another_order_is_named():
    name = "grad.model.layers.1.self_attn.q_proj.weight"  # [heads·head_dim, hidden]: heads 0 and 1 exchanged
    d = _gradient_diagnosis(
        lambda t: t.__setitem__(name, np.concatenate([t[name][D : 2 * D], t[name][:D], t[name][2 * D :]]))
    )
    assert d.code == "gradient_layout" and d.evidence["reordered"] == [name.removeprefix("grad.")]


def test_gradients_under_each_others_names_are_named():
    a, b = "grad.model.layers.0.mlp.gate_proj.weight", "grad.model.layers.0.mlp.up_proj.weight"

    def swap(t):
        t[a], t[b] = t[b], t[a]

    d = _gradient_diagnosis(swap)
    assert d.code == "gradient_names" and d.evidence["holds"][a.removeprefix("grad.")] == b.removeprefix("grad.")


def test_an_absent_piece_is_said_to_be_absent():
    out = StageOutput({P.PREFIX + k: v for k, v in P.given(CASE.golden).items() if k != "layer.1.attn"})
    result = judge("isolated_forward", out, CASE)
    d = diagnose(result, out, CASE)[0]
    assert d.code == "piece_divergence" and "absent" in d.summary and d.evidence["problem"].startswith("absent")
