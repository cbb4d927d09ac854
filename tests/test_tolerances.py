"""Each tolerance still fails the smallest real bug it is documented to catch (harness/tolerances.py)."""

import dataclasses

import mlx.core as mx
import numpy as np
import pytest

from harness.audit import audit
from harness.compare import compare
from harness.mutants import Mutant, MutantBackend, _opt
from harness.tolerances import TOLERANCES, tolerance
from reference import loss as L
from reference.trainer import Trainer

from .conftest import CASES


class OnePaddingTokenCounted(Trainer):
    """The first padding position of one row counted as a target: 1 token of 56."""

    def _loss(self, batch):
        mask = np.array(batch["attention_mask"])
        row = int(np.flatnonzero(mask.min(axis=1) == 0)[0])
        mask[row, int(mask[row].sum())] = 1
        return super()._loss(batch | {"attention_mask": mx.array(mask)})


SMALL_BUGS = [
    (Mutant("eps_1e-6", "RMSNorm eps 1e-6 where the config says 1e-5", "forward", ("gqa_padded",), "rmsnorm_eps",
            config=lambda c: dataclasses.replace(c, rms_norm_eps=1e-6)), "forward"),
    (Mutant("one_pad_token", "one padding token counted", "loss", ("gqa_padded",), "padding_counted", trainer=OnePaddingTokenCounted), "loss"),
    (Mutant("lr_0.1pct", "learning rate 0.1 % high", "optimizer", ("gqa_padded",), "learning_rate",
            settings=lambda s: _opt(lr=s.optimizer.lr * 1.001)(s)), "optimizer"),
    (Mutant("adam_eps_1e-7", "AdamW eps 1e-7 instead of 1e-8", "optimizer", ("gqa_padded",), "adam_eps",
            settings=_opt(eps=1e-7)), "optimizer"),
]


@pytest.mark.parametrize("mutant, stage", SMALL_BUGS, ids=[m.name for m, _ in SMALL_BUGS])
def test_smallest_bug_fails_its_stage(mutant, stage):
    result = audit(MutantBackend(mutant), CASES[mutant.fixtures[0]])
    first = result.first_failure()
    assert first is not None, f"{mutant.description} passed every stage"
    assert first.name == stage, f"{mutant.description} first failed at {first.name}: {first.message}"


def test_gradient_tolerance_fails_a_0_005_percent_error():
    golden = CASES["gqa_padded"].golden
    name = "grad.model.layers.1.mlp.down_proj.weight"
    assert not compare(name, golden[name] * (1 + 5e-5), golden[name], tolerance("gradients")).passed
    assert compare(name, golden[name] * (1 + 2e-6), golden[name], tolerance("gradients")).passed


def test_trajectory_tolerance_fails_one_missed_update():
    """Four updates where three were applied: the change is 25 % short."""
    golden = CASES["gqa_padded"].golden
    name = "trajectory.delta.lm_head.weight"
    assert not compare(name, golden[name] * 0.75, golden[name], tolerance("trajectory")).passed


def test_every_tolerance_states_its_evidence():
    for key, tol in TOLERANCES.items():
        assert tol.noise and tol.catches, f"{key} lacks its measured noise or the bug it catches"


def test_outliers_are_bounded():
    """The optimizer's outlier allowance (ill-conditioned m/sqrt(v) where g ≈ 0) cannot hide a tensor-wide error."""
    tol = tolerance("optimizer")
    assert tol.outlier_fraction <= 0.01
    expected = np.linspace(-1e-3, 1e-3, 1000, dtype=np.float32)
    actual = expected.copy()
    actual[:20] += 1e-3  # 2 % of the elements wrong
    assert not compare("x", actual, expected, tol).passed
