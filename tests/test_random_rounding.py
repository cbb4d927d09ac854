"""Monte Carlo arithmetic on the float64 twin (harness/fixtures/random_rounding.py): its noise model against real
float32 arithmetic, and what it leaves exact."""

import numpy as np
import pytest
import torch

from mlx_parity.harness import pieces
from mlx_parity.harness.fixtures.random_rounding import RandomRounding, twin_outputs
from mlx_parity.harness.fixtures.spread import measure_spread
from mlx_parity.harness.fixtures.truth import ONE_PASS_STAGES, TRUTH_GROUPS
from mlx_parity.harness.stages import PREFIX
from mlx_parity.harness.truth import needs_truth, read_spread

from .conftest import CASES

U = 2.0**-24


def _model_std(terms: np.ndarray) -> np.ndarray:
    """The module's standard deviation of a sum carried one term after the other (last axis)."""
    n = terms.shape[-1]
    return U * np.sqrt((n / 2 * (terms**2).sum(-1) + n / 3 * terms.sum(-1) ** 2) / 3)


@pytest.mark.parametrize("drift", [0.0, 1.0])
def test_the_sum_model_covers_a_float32_sum_carried_term_by_term(drift):
    """Real float32 sums of 1024 terms (numpy's accumulate adds one after the other), mean-zero or all of one
    sign (a massive activation's dot product): their rms error against the exact sum is at most the model's,
    and not far below it (a model 10 times too large would blunt every bound it widens)."""
    rng = np.random.default_rng(0)
    terms = (rng.normal(drift, 1.0, (4000, 1024))).astype(np.float32)
    exact = terms.astype(np.float64).sum(-1)
    float32 = np.add.accumulate(terms, axis=-1, dtype=np.float32)[:, -1].astype(np.float64)
    measured = np.sqrt(np.mean((float32 - exact) ** 2))
    model = np.sqrt(np.mean(_model_std(terms.astype(np.float64)) ** 2))
    assert measured <= model, (measured, model)
    assert measured >= model / 3, (measured, model)


def test_a_matmul_is_drawn_with_the_sum_models_spread():
    a = torch.randn(6, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    b = torch.randn(300, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    exact = a @ b
    draws = []
    gen = torch.Generator().manual_seed(3)
    for _ in range(400):
        with RandomRounding(gen):
            draws.append(a @ b)
    errors = torch.stack(draws) - exact
    terms = (a[:, :, None] * b[None, :, :]).permute(0, 2, 1).numpy()  # [6, 5, 300]: each output's terms
    ratio = errors.std(0).numpy() / _model_std(terms)
    assert np.all((ratio > 0.8) & (ratio < 1.2)), ratio
    assert torch.allclose(errors.mean(0), torch.zeros_like(exact), atol=float(errors.std(0).max()) * 0.3)


def test_copies_views_selections_and_integers_stay_exact():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, dtype=torch.float64)
    ids = torch.arange(12).reshape(3, 4)
    with RandomRounding(gen):
        views = [x.t().contiguous().t(), x.clone(), x.reshape(8, 4).reshape(4, 8), torch.cat([x, x])[:4]]
        rows = x[1:3]
        gathered = x[:, torch.tensor([7, 0, 3])]
        summed_ints = ids.sum(-1) * 2 + 1
        negated, largest = -x, x.amax(-1)
    for v in views:
        assert torch.equal(v, x)
    assert torch.equal(rows, x[1:3])
    assert torch.equal(gathered, x[:, [7, 0, 3]])
    assert torch.equal(summed_ints, ids.sum(-1) * 2 + 1)
    assert torch.equal(negated, -x) and torch.equal(largest, x.amax(-1))


def test_arithmetic_moves_by_at_most_one_rounding_and_in_place_forms_too():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(10000, dtype=torch.float64) + 0.5
    y = x.clone()
    with RandomRounding(gen):
        e = torch.exp(x)
        y.mul_(3.0)
    rel = ((e - torch.exp(x)) / torch.exp(x)).abs()
    assert 0 < rel.max() <= U and rel.mean() > U / 4
    rel_inplace = ((y - 3 * x) / (3 * x)).abs()
    assert 0 < rel_inplace.max() <= U


def test_a_backward_pass_is_perturbed_too_and_the_draws_are_seeded():
    w = torch.randn(64, 64, dtype=torch.float64, requires_grad=True)
    x = torch.randn(32, 64, dtype=torch.float64)

    def grad(seed):
        with RandomRounding(torch.Generator().manual_seed(seed)):
            (g,) = torch.autograd.grad((x @ w).pow(2).sum(), [w])
        return g

    (exact,) = torch.autograd.grad((x @ w).pow(2).sum(), [w])
    assert torch.equal(grad(5), grad(5))
    assert not torch.equal(grad(5), grad(6))
    rel = ((grad(5) - exact).abs() / exact.abs().max()).max().item()
    assert 0 < rel < 1e-5


def test_the_twins_forward_under_random_rounding_stays_within_float32s_reach_of_the_truth():
    """On a bundled fixture, the drawn forward differs from the truth by float32-sized errors: more than none,
    far less than a bug."""
    case = CASES["gqa_padded"]
    out = twin_outputs(case, ["forward"], torch.Generator().manual_seed(0))
    logits = out["forward.logits"]
    truth = case.truth["truth.forward.logits"]
    err = np.abs(logits - truth).max() / np.abs(truth).max()
    assert 1e-9 < err < 1e-5, err


def test_the_spread_takes_the_twins_draws_for_every_judged_tensor():
    """measure_spread with the twin's draws alone: a spread for every tensor the truth judges, the trajectory's
    included, at least what the drawn run erred and at most an eighth of an octave above it (the stored rounding)."""
    case = CASES["head"]
    golden, truth = case.golden, case.truth
    stored = measure_spread(case, golden, truth, draws=0, twin_draws=1)
    drawn_stages = tuple(PREFIX[s] for g in TRUTH_GROUPS for s in g) + (pieces.PREFIX,)
    judged = [k for k, v in golden.items() if needs_truth(k, v) and k.startswith(drawn_stages)]
    assert any(k.startswith(PREFIX["optimizer"]) for k in judged) and any(k.startswith("trajectory.") for k in judged)
    assert sorted(k.removeprefix("spread.") for k in stored if k.startswith("spread.")) == sorted(judged)
    drawn = twin_outputs(case, ONE_PASS_STAGES, torch.Generator().manual_seed(1009 * int(case.info["seed"]) + 13))
    logits = read_spread(stored["spread.forward.logits"], stored["spread_scale.forward.logits"])
    err = np.abs(drawn["forward.logits"] - truth["truth.forward.logits"])
    assert (logits >= err).all() and (logits <= err * 2 ** (1 / 8) + 1e-300 + 1e-9 * err.max()).all()
    assert logits.max() > 0
