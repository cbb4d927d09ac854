"""The float64 truth verdicts rest on (harness/truth.py, built by harness/fixtures/truth.py): it holds a model once, as stored, and its
sensitivities cover gradient errors that change from one update to the next."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from mlx_parity.harness.audit import judge
from mlx_parity.harness.backends.torch_backend import TorchBackend
from mlx_parity.harness.fixtures.truth import gradient_bounds
from mlx_parity.harness.torch_twin import TwinTrainer

from .conftest import CASES


@pytest.mark.parametrize(
    "fixture, trainable",
    [("lora", "lora"), ("head", "head"), ("bf16_lora", "lora"), ("small_eps_bias", "lora"), ("tied", "lora")],
)
def test_the_float64_truth_keeps_frozen_weights_as_stored_and_computes_the_same(fixture, trainable):
    """Frozen weights (biases, tied embeddings) stay float32 (bfloat16 under that precision) and are widened
    where used, so the truth of a LoRA step on a real model holds it once; the loss and gradients are bit for
    bit those of an all-float64 copy."""
    case = CASES[fixture]
    settings = dataclasses.replace(case.settings, trainable=trainable)
    stored = torch.bfloat16 if case.settings.precision == "bfloat16" else torch.float32
    lora_init = case.lora_init if case.settings.trainable == trainable else None
    twin, _ = TwinTrainer.from_pretrained(case.checkpoint, settings, lora_init, dtype=torch.float64)
    frozen = [p for p in twin.model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == stored for p in frozen)
    assert all(p.dtype == torch.float64 for p in twin.trainable.values())
    wide = copy.deepcopy(twin)
    for p in wide.model.parameters():
        p.data = p.data.to(torch.float64)
    (parts, grads), (wide_parts, wide_grads) = twin.gradients(case.batch), wide.gradients(case.batch)
    assert parts == wide_parts
    assert all(torch.equal(grads[k], wide_grads[k]) for k in grads)


@pytest.mark.parametrize("fixture", ["lora", "mha_sharded", "gqa_padded", "bf16_lora", "bf16_full"])
def test_gradient_errors_that_change_sign_between_updates_pass_the_trajectory(fixture, monkeypatch):
    """A port's gradient error differs from one update to the next. The float64 twin with every gradient moved
    by 0.9 of the gradient stage's bound, + on one update and - on the next, is such a port: the truth measures
    those runs too, so it passes the trajectory; with the sensitivities of the common ±offset alone it fails."""
    from mlx_parity.harness.fixtures import truth as T
    from mlx_parity.harness.fixtures.truth import _PrecisionCase

    case = CASES[fixture]
    truth = {k.removeprefix("truth."): v for k, v in case.truth.items() if k.startswith("truth.")}
    bounds = gradient_bounds(case, case.golden, case.truth)
    plus, minus = {k: 0.9 * b for k, b in bounds.items()}, {k: -0.9 * b for k, b in bounds.items()}
    port = TorchBackend(torch.float64, [plus, minus]).run(case, ("trajectory",))["trajectory"]
    assert port.error is None
    assert judge("trajectory", port, case).status == "pass"
    monkeypatch.setattr(T, "MULTI_UPDATE_STAGES", ())
    common = T.sensitivities(case, case.golden, truth, bounds, ("trajectory",))
    if case.settings.precision == "bfloat16":  # as build_truth: with the optimizer's sensitivities, for the flips
        common |= {k.removeprefix("sens."): v for k, v in case.truth.items() if k.startswith("sens.optimizer.")}
        T._flippable_trajectories(common, truth, case.settings.steps)
    without = _PrecisionCase(case, dict(case.truth) | {f"sens.{k}": v for k, v in common.items()}, "float32")
    assert judge("trajectory", port, without).status == "fail"


@pytest.mark.parametrize("fixture", ["lora", "gqa_padded", "bf16_lora"])
def test_gradient_errors_the_gradient_stage_passes_pass_the_optimizer(fixture):
    """The update's sensitivities are measured at the gradient bound the audit judges, spreads included. The
    float64 twin with every gradient moved by 0.9 of that bound passes the gradient stage, and its first
    moment, a tenth of that gradient, passes the optimizer; with the sensitivities measured at the bound without
    the spreads, the same port fails a first moment where the spread widens its gradient's bound."""
    from mlx_parity.harness.fixtures import truth as T
    from mlx_parity.harness.fixtures.truth import _PrecisionCase

    case = CASES[fixture]
    bounds = gradient_bounds(case, case.golden, case.truth)
    port = TorchBackend(torch.float64, [{k: 0.9 * b for k, b in bounds.items()}]).run(case, ("gradients", "optimizer"))
    assert judge("gradients", port["gradients"], case).status == "pass"
    assert judge("optimizer", port["optimizer"], case).status == "pass"
    values = {k: v for k, v in case.truth.items() if k.startswith("truth.")}  # no spreads: the narrower bound
    truth = {k.removeprefix("truth."): v for k, v in values.items()}
    narrow = T.sensitivities(case, case.golden, truth, gradient_bounds(case, case.golden, values), ("optimizer",))
    before = _PrecisionCase(case, dict(case.truth) | {f"sens.{k}": v for k, v in narrow.items()}, "float32")
    failed = judge("optimizer", port["optimizer"], before)
    assert failed.status == "fail" and any(t.name.startswith("optimizer.m.") for t in failed.failures)
