"""Properties that hold for any input: causal-prefix invariance and the distrust term's zero gradient."""

import mlx.core as mx
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_parity.harness.torch_twin import TwinTrainer
from mlx_parity.reference.settings import TrainSettings
from mlx_parity.reference.trainer import Trainer

from .conftest import CASES

CASE = CASES["gqa_padded"]
MLX_TRAINER, _ = Trainer.from_pretrained(CASE.checkpoint, TrainSettings())
TWIN_TRAINER, _ = TwinTrainer.from_pretrained(CASE.checkpoint, TrainSettings())

ids_strategy = st.integers(min_value=2, max_value=12).flatmap(
    lambda T: st.lists(st.lists(st.integers(0, 95), min_size=T, max_size=T), min_size=1, max_size=3)
)


@settings(max_examples=25, deadline=None)
@given(ids=ids_strategy)
def test_causal_prefix_invariance(ids):
    """Logits of the first T-1 tokens equal the first rows of the full sequence's logits."""
    ids = np.array(ids, dtype=np.int32)
    full, _ = MLX_TRAINER.model.forward(mx.array(ids))
    prefix, _ = MLX_TRAINER.model.forward(mx.array(ids[:, :-1]))
    np.testing.assert_allclose(np.array(prefix), np.array(full)[:, :-1], rtol=1e-5, atol=1e-5)
    t_full, _ = TWIN_TRAINER.forward(ids)
    t_prefix, _ = TWIN_TRAINER.forward(ids[:, :-1])
    np.testing.assert_allclose(t_prefix.numpy(), t_full.numpy()[:, :-1], rtol=1e-5, atol=1e-5)


def test_causal_prefix_check_can_fail(monkeypatch):
    """Without the causal mask the property breaks, so the check above is not vacuous."""
    import torch

    monkeypatch.setattr(torch.Tensor, "tril", lambda self, *a, **k: self)  # the twin's mask: all ones
    ids = np.arange(8, dtype=np.int32)[None]
    full, _ = TWIN_TRAINER.forward(ids)
    prefix, _ = TWIN_TRAINER.forward(ids[:, :-1])
    assert not np.allclose(prefix.numpy(), full.numpy()[:, :-1], rtol=1e-5, atol=1e-5)


batch_meta = st.integers(1, 3).flatmap(
    lambda B: st.tuples(
        st.lists(st.floats(0.0, 0.99), min_size=B, max_size=B),
        st.lists(st.floats(0.0, 10.0), min_size=B, max_size=B),
        st.floats(2.3, 3.0),
    )
)


@settings(max_examples=20, deadline=None)
@given(meta=batch_meta)
def test_distrust_has_zero_gradient_and_shifts_only_the_loss(meta):
    w, h, alpha = meta
    B = len(w)
    rng = np.random.default_rng(B)
    base = {"input_ids": rng.integers(0, 96, (B, 6)).astype(np.int32), "attention_mask": np.ones((B, 6), np.int32)}
    with_d = TrainSettings.from_dict({"loss": {"alpha": alpha, "lambda": 1.0}})
    without = TrainSettings.from_dict({"loss": {"alpha": alpha, "lambda": 0.0}})
    batch = base | {"auth_weight": np.array(w, np.float32), "prov_entropy": np.array(h, np.float32)}
    a = Trainer(MLX_TRAINER.model, with_d)
    b = Trainer(MLX_TRAINER.model, without)
    parts_a, grads_a = a.gradients(batch)
    parts_b, grads_b = b.gradients(batch)
    expected = np.mean(alpha * (np.log(1 - np.array(w, np.float64) + 1e-8) + np.array(h, np.float64)) ** 2)
    assert np.isclose(parts_a["distrust"], expected, rtol=1e-5, atol=1e-6)
    assert np.isclose(parts_a["total"] - parts_b["total"], parts_a["distrust"], rtol=1e-5, atol=1e-4)
    for k in grads_a:  # d(distrust)/dθ = 0 exactly: the gradients are identical, bit for bit
        assert np.array_equal(np.array(grads_a[k]), np.array(grads_b[k])), k
