"""Each tolerance still fails the smallest real bug it is documented to catch (harness/tolerances.py)."""

import dataclasses

import mlx.core as mx
import numpy as np
import pytest

from mlx_parity.harness.audit import audit
from mlx_parity.harness.backends.mutants import Mutant, MutantBackend, _opt
from mlx_parity.harness.compare import compare
from mlx_parity.harness.tolerances import TOLERANCES, tolerance
from mlx_parity.reference.trainer import Trainer

from .conftest import CASES, judge_with


class OnePaddingTokenCounted(Trainer):
    """The first padding position of one row counted as a target: 1 token of 56."""

    def _loss_from_logits(self, logits, batch):
        mask = np.array(batch["attention_mask"])
        row = int(np.flatnonzero(mask.min(axis=1) == 0)[0])
        mask[row, int(mask[row].sum())] = 1
        return super()._loss_from_logits(logits, batch | {"attention_mask": mx.array(mask)})


SMALL_BUGS = [
    (
        Mutant(
            "eps_1e-6",
            "RMSNorm eps 1e-6 where the config says 1e-5",
            "forward",
            ("gqa_padded",),
            "rmsnorm_eps",
            config=lambda c: dataclasses.replace(c, rms_norm_eps=1e-6),
        ),
        "forward",
    ),
    (
        Mutant(
            "one_pad_token",
            "one padding token counted",
            "loss",
            ("gqa_padded",),
            "padding_counted",
            trainer=OnePaddingTokenCounted,
        ),
        "loss",
    ),
    (
        Mutant(
            "lr_0.1pct",
            "learning rate 0.1 % high",
            "optimizer",
            ("gqa_padded",),
            "learning_rate",
            settings=lambda s: _opt(lr=s.optimizer.lr * 1.001)(s),
        ),
        "optimizer",
    ),
    (
        Mutant(
            "adam_eps_1e-7",
            "AdamW eps 1e-7 instead of 1e-8",
            "optimizer",
            ("gqa_padded",),
            "adam_eps",
            settings=_opt(eps=1e-7),
        ),
        "optimizer",
    ),
]


@pytest.mark.parametrize("mutant, stage", SMALL_BUGS, ids=[m.name for m, _ in SMALL_BUGS])
def test_smallest_bug_fails_its_stage(mutant, stage):
    result = audit(MutantBackend(mutant), CASES[mutant.fixtures[0]])
    first = result.first_failure()
    assert first is not None, f"{mutant.description} passed every stage"
    assert first.name == stage, f"{mutant.description} first failed at {first.name}: {first.message}"


@pytest.mark.parametrize(
    "stage, prefix, name, caught, passes",
    [
        ("forward", "forward.", "forward.logits", 2e-6, 1e-7),
        ("loss", "loss.", "loss.ce", 3e-6, 1e-7),  # 2e-6 passes (0.91) since the spread takes the twin's draws
        ("loss", "loss.", "loss.total", 2e-6, 1e-7),
        ("loss", "loss.", "loss.distrust", 2e-6, 1e-7),
        ("gradients", "grad.", "grad.model.layers.1.mlp.down_proj.weight", 2e-5, 1e-7),
        ("optimizer", "optimizer.", "optimizer.delta.lm_head.weight", 5e-4, 1e-6),
        ("trajectory", "trajectory.", "trajectory.delta.lm_head.weight", 1e-3, 1e-6),
    ],
)
def test_bound_fails_the_smallest_documented_error_and_passes_rounding(stage, prefix, name, caught, passes):
    case = CASES["gqa_padded"]
    g = case.golden[name].astype(np.float64)
    assert judge_with(case, stage, prefix, name, (g * (1 + caught)).astype(np.float32)).status == "fail"
    assert judge_with(case, stage, prefix, name, (g * (1 + passes)).astype(np.float32)).status == "pass"


def test_trajectory_bound_fails_one_missed_update():
    """Four updates where three were applied: the change is 25 % short."""
    case = CASES["gqa_padded"]
    name = "trajectory.delta.lm_head.weight"
    assert judge_with(case, "trajectory", "trajectory.", name, case.golden[name] * 0.75).status == "fail"


def test_every_tolerance_states_its_evidence():
    for key, tol in TOLERANCES.items():
        assert tol.noise and tol.catches, f"{key} lacks its measured noise or the bug it catches"


def test_no_outlier_quota_one_element_fails():
    """One element of a large tensor far past its bound fails the tensor: no share of elements is forgiven."""
    case = CASES["gqa_padded"]
    name = "optimizer.delta.model.embed_tokens.weight"
    bad = case.golden[name].copy()
    bad.flat[7] += 10 * abs(bad.flat[7]) + 1e-4
    r = judge_with(case, "optimizer", "optimizer.", name, bad)
    assert r.status == "fail" and r.worst().mismatched == 1


def test_ill_conditioned_update_is_judged_by_its_sensitivity():
    """Where |g| is near AdamW's eps (small_eps_bias, lr 1e-2) the update m/sqrt(v) swings with rounding
    noise in g: the truth builder measured how far, and another correct float32 port may land anywhere
    in that range. The same absolute change on a well-conditioned element fails."""
    case = CASES["small_eps_bias"]
    t = case.truth
    ratios = {k[5:]: t[k] / (np.abs(t["truth." + k[5:]]) + 1e-30) for k in t if k.startswith("sens.optimizer.delta.")}
    name = max(ratios, key=lambda k: ratios[k].max())
    i = int(np.argmax(ratios[name]))
    sens = float(t[f"sens.{name}"].flat[i])
    assert ratios[name].flat[i] > 1, "no ill-conditioned update in small_eps_bias: the fixture no longer exposes one"
    moved = case.golden[name].copy()
    moved.flat[i] = t[f"truth.{name}"].flat[i] + 0.9 * sens
    assert judge_with(case, "optimizer", "optimizer.", name, moved).status == "pass"
    other = "optimizer.delta.lm_head.weight"
    j = int(np.argmin(t[f"sens.{other}"]))
    shifted = case.golden[other].copy()
    shifted.flat[j] += 0.9 * sens
    assert judge_with(case, "optimizer", "optimizer.", other, shifted).status == "fail"


def test_margin_is_the_share_of_the_noise_budget_an_error_uses():
    """A flipped update (error = its sensitivity, ±lr) uses none of the bound's noise budget: its margin is 0,
    not error / bound = 0.99. Past the sensitivity the margin is the share of the rest of the bound it uses,
    and the verdict is the same as error <= bound."""
    tol = tolerance("optimizer")
    truth = np.linspace(-1e-3, 1e-3, 1000)
    golden = truth + np.random.default_rng(0).normal(0, 1e-9, 1000)
    sens = np.zeros(1000)
    sens[0] = 2e-3  # the gradient's own bound moves the update from -lr to +lr
    bound = tol.bound(golden, truth, sens)
    flipped = golden.copy()
    flipped[0] = truth[0] + 0.999 * sens[0]
    r = compare("d", flipped, golden, tol, truth=truth, sensitivity=sens)
    assert r.passed and r.ratio <= 1 / tol.multiple  # the golden's own elements: error <= bound / multiple
    assert flipped[0] - truth[0] > 0.95 * bound[0]  # what error / bound read
    half = golden.copy()
    half[0] = truth[0] + sens[0] + 0.5 * (bound[0] - sens[0])
    assert compare("d", half, golden, tol, truth=truth, sensitivity=sens).ratio == pytest.approx(0.5, rel=1e-9)
    past = golden.copy()
    past[0] = truth[0] + bound[0] * (1 + 1e-6)
    r = compare("d", past, golden, tol, truth=truth, sensitivity=sens)
    assert not r.passed and r.mismatched == 1 and r.ratio > 1


def test_bound_scales_with_the_references_own_error():
    """Ten times the reference's float32 error gives ten times the bound: deep or wide models with large
    activations get bounds that follow their own rounding, not a constant calibrated on toys."""
    tol = tolerance("forward")
    truth = np.linspace(-3, 3, 1000)
    noise = np.random.default_rng(0).normal(0, 1e-6, 1000)
    small, large = tol.bound(truth + noise, truth), tol.bound(truth + 10 * noise, truth)
    floor = tol.floor_ulps * 2.0**-24 * 3
    assert np.allclose(large - floor, 10 * (small - floor), rtol=1e-9)
