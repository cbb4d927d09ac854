"""The reference's noise measured again on perturbed inputs (harness/fixtures/spread.py) and how the bound uses it."""

import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from mlx_parity.harness.case import Case
from mlx_parity.harness.errors import CaseError
from mlx_parity.harness.false_alarm import SPREAD_SAMPLES
from mlx_parity.harness.fixtures.spread import _perturbed_case, perturb
from mlx_parity.harness.tolerances import SPREAD_PER_SAMPLE, ULP32, rms_of_largest, tolerance
from mlx_parity.harness.truth import needs_truth, read_spread, store_spread

from .conftest import CASES


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturb_moves_each_element_by_at_most_one_ulp_of_its_own_dtype(dtype):
    values = torch.tensor([0.0, -0.0, 1.0, -1.0, 3.5e-3, -7.25, 1e30, 1e-30], dtype=torch.float32)
    t = values.repeat(500).to(dtype)
    moved = perturb({"w": t, "ids": torch.arange(4)}, np.random.default_rng(0))
    w = moved["w"]
    assert w.dtype == dtype and w.shape == t.shape
    assert torch.equal(moved["ids"], torch.arange(4)), "integer tensors are left alone"
    assert torch.equal(w[t == 0], t[t == 0]), "zeros stay zero (no sign flip, no denormal)"
    assert torch.equal(torch.sign(w), torch.sign(t))
    eps = torch.finfo(dtype).eps
    rel = ((w.double() - t.double()).abs() / t.double().abs().clamp_min(1e-300))[t != 0]
    assert rel.max() <= eps, "at most one spacing of the dtype"
    changed = (w != t)[t != 0].double().mean().item()
    assert 0.55 < changed < 0.78, f"about two thirds of the nonzero elements move, got {changed:.2f}"
    if dtype == torch.float32:  # a move lands exactly on a neighbour
        up, down = torch.nextafter(t, torch.full_like(t, np.inf)), torch.nextafter(t, torch.full_like(t, -np.inf))
        assert bool(((w == t) | (w == up) | (w == down)).all())


def test_bound_takes_the_spread_where_the_golden_landed_near_the_truth():
    """An element whose golden happens to sit on the truth is bounded by the noise the draws measured
    there, not by that one lucky sample; a port past the multiple of that spread still fails."""
    tol = tolerance("gradients")
    truth = np.linspace(-1.0, 1.0, 1001)
    reference = truth + np.random.default_rng(1).normal(0, 1e-8, truth.size)
    reference[500] = truth[500]  # the one sample at this element: no error at all
    spread = np.full(truth.size, 1e-8)
    spread[500] = 1e-5  # the draws: a sum that cancels here rounds far worse than elsewhere
    without = tol.bound(reference, truth)
    with_spread = tol.bound(reference, truth, spread=spread)
    port_error = 3e-5
    assert port_error > without[500], "one sample's bound fails a port within the measured noise"
    assert port_error < with_spread[500]
    assert tol.multiple * 1e-5 * 1.5 > with_spread[500], "the spread is the noise, the multiple stays"
    assert (with_spread >= without).all(), "the spread only widens the bound"
    assert with_spread[:500].max() < with_spread[500] / 10, "one cancelling element's noise is not every element's"


def test_bound_floors_an_element_whose_draws_landed_low_by_the_tensor_s_spread():
    """The spread of one element is the largest of 8 samples of its noise, and all 8 can land far below it (the
    false alarm of a correct sequential-sum port on an unseen SmolLM2 configuration: its error 4σ where the draws
    reached 0.3σ). The tensor's spread pooled over its elements cannot: one sample's rms of it floors every
    element, so a port's error a few σ out passes there, while a bug 100σ out still fails."""
    tol = tolerance("gradients")
    rng = np.random.default_rng(2)
    sigma = 1e-6
    truth = np.linspace(-1.0, 1.0, 4001)
    reference = truth + rng.normal(0, 1e-8, truth.size)  # the golden's order rounds far less (a blocked sum)
    spread = np.abs(rng.normal(0, sigma, (SPREAD_SAMPLES, truth.size))).max(axis=0)
    spread[2000] = 0.05 * sigma  # the draws at this element all landed near the truth
    bound = tol.bound(reference, truth, spread=spread)
    assert bound[2000] > 4 * sigma, "a correct port 4σ out passes where the draws landed low"
    assert bound[2000] < 100 * sigma, "a bug 100σ out still fails there"
    own = tol.multiple * max(spread[2000], abs(reference[2000] - truth[2000])) + 8 * ULP32
    assert own < 4 * sigma, "the element's own samples alone would fail that port"


def test_rms_of_largest_sample_matches_a_simulation():
    assert rms_of_largest(1) == pytest.approx(1.0, abs=1e-6)
    z = np.abs(np.random.default_rng(3).standard_normal((200_000, SPREAD_SAMPLES))).max(axis=1)
    simulated = float(np.sqrt(np.mean(z**2)))
    assert rms_of_largest(SPREAD_SAMPLES) == pytest.approx(simulated, rel=5e-3)
    assert SPREAD_PER_SAMPLE == pytest.approx(simulated, rel=5e-3), "the divisor the bounds use"


def test_every_bundled_fixture_stores_a_spread_for_every_judged_tensor():
    for name, case in CASES.items():
        judged = [k for k, v in case.golden.items() if needs_truth(k, v)]
        for k in judged:
            s = case.truth.get(f"spread.{k}")
            assert s is not None, f"{name}: no spread for {k}"
            assert s.shape == case.golden[k].shape and np.isfinite(s).all() and (s >= 0).all(), f"{name}: {k}"


def test_a_stored_spread_is_never_below_the_measured_one_and_within_an_eighth_octave():
    measured = np.abs(np.random.default_rng(2).normal(0, 1e-7, 10000))
    measured[:3] = [0.0, 1e-30, 3e-6]
    stored = store_spread("x", measured)
    assert stored["spread.x"].dtype == np.uint8 and stored["spread.x"].shape == measured.shape
    back = read_spread(stored["spread.x"], stored["spread_scale.x"])
    big = measured > 1e-9 * measured.max()
    assert (back >= measured).all() and (back[big] <= measured[big] * 2 ** (1 / 8) * (1 + 1e-12)).all()
    assert back[0] < 1e-9 * measured.max(), "nothing measured stays far below every floor"
    zero = store_spread("z", np.zeros((2, 3)))
    assert (read_spread(zero["spread.z"], zero["spread_scale.z"]) == 0).all()
    scalar = store_spread("s", np.float64(2.5e-7))
    assert isinstance(scalar["spread.s"], np.ndarray) and scalar["spread.s"].shape == ()
    assert read_spread(scalar["spread.s"], scalar["spread_scale.s"]) >= 2.5e-7


@pytest.mark.parametrize("scale", [np.float32(-1.0), None])
def test_a_spread_without_a_valid_scale_is_refused(tmp_path, scale):
    shutil.copytree(CASES["head"].path, tmp_path / "head")
    f = tmp_path / "head" / "truth.safetensors"
    stored = load_file(str(f))
    name = next(k for k in stored if k.startswith("spread_scale."))
    if scale is None:
        del stored[name]
    else:
        stored[name] = np.asarray(scale)
    save_file(stored, str(f))
    with pytest.raises(CaseError, match="no valid spread_scale"):
        Case(tmp_path / "head").check()


def test_a_draw_moves_every_float_input_of_the_case_by_at_most_an_ulp(tmp_path):
    """The checkpoint, the initial adapters and the goldens (the isolated checks' inputs) move; integers and
    the batch do not."""
    case = CASES["lora"]
    drawn = _perturbed_case(case, tmp_path, np.random.default_rng(0))
    pairs = [(case.golden, drawn.golden), (dict(case.initial_weights), dict(drawn.initial_weights))]
    moved = 0
    for before, after in pairs:
        assert before.keys() == after.keys()
        for k, v in before.items():
            w = after[k]
            if not np.issubdtype(v.dtype, np.floating):
                assert np.array_equal(v, w), k
                continue
            step = np.abs(np.spacing(v.astype(np.float32)))
            assert (np.abs(w.astype(np.float64) - v) <= step).all(), k
            moved += int((w != v).sum())
    assert moved > 0
    assert drawn.settings == case.settings
    assert all(np.array_equal(case.batch[k], drawn.batch[k]) for k in case.batch)
