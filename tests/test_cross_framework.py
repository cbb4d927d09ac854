"""MLX against torch directly, without the goldens in between, and transformers as a forward oracle."""

import dataclasses

import numpy as np

from mlx_parity.harness.audit import judge
from mlx_parity.harness.backends import get_backend
from mlx_parity.harness.fixtures.build import base_forward
from mlx_parity.harness.fixtures.oracle import check_forward, transformers_forward
from mlx_parity.harness.stages import STAGES


@dataclasses.dataclass(frozen=True)
class _Against:
    """A case whose goldens are another backend's live outputs."""

    case: object
    golden: dict

    def __getattr__(self, name):
        return getattr(self.case, name)


def test_torch_matches_mlx_directly(case):
    mlx = get_backend("mlx").run(case, STAGES)
    torch = get_backend("torch").run(case, STAGES)
    live = _Against(case, {k: v for o in mlx.values() for k, v in o.tensors.items() if not k.startswith("weights.")})
    failing = []
    for stage in STAGES:
        if stage == "checkpoint":  # judged against trajectory goldens, i.e. MLX's live trajectory
            live.golden.update(
                {
                    k.replace("checkpoint.uninterrupted.", "trajectory."): v
                    for k, v in mlx[stage].tensors.items()
                    if k.startswith("checkpoint.uninterrupted.")
                }
            )
        r = judge(stage, torch[stage], live)
        if r.status != "pass":
            failing.append(f"{stage}: {r.message}")
    assert not failing, failing


def test_transformers_oracle_agrees(case):
    reference, truth, spread = base_forward(case)
    results = check_forward(
        case.checkpoint, case.batch["input_ids"], case.batch["attention_mask"], reference, truth, spread=spread
    )
    assert results and all(r.passed for r in results), [r.describe() for r in results if not r.passed]


def test_transformers_oracle_detects_a_wrong_forward(monkeypatch):
    """transformers' logits 0.1 % off (as a wrong checkpoint conversion would make them) fail the check."""
    from mlx_parity.harness.fixtures import oracle

    from .conftest import CASES

    real = oracle.transformers_forward
    monkeypatch.setattr(
        oracle,
        "transformers_forward",
        lambda *a: (lambda o: o | {"forward.logits": o["forward.logits"] * 1.001})(real(*a)),
    )
    case = CASES["gqa_padded"]
    reference, truth, spread = base_forward(case)
    bad = [
        r
        for r in check_forward(
            case.checkpoint, case.batch["input_ids"], case.batch["attention_mask"], reference, truth, spread=spread
        )
        if not r.passed
    ]
    assert [r.name for r in bad] == ["forward.logits"]


def test_the_oracle_is_judged_with_the_measured_spread_of_float32_noise():
    """base_forward's spread: the twin's random-rounding draws, float32-sized at every output (more than none, far
    less than a bug), and with it the bound can only widen."""
    from .conftest import CASES

    case = CASES["gqa_padded"]
    reference, truth, spread = base_forward(case)
    assert sorted(spread) == sorted(truth)
    for k, s in spread.items():
        assert 0 < s.max() < 1e-5 * np.abs(truth[k]).max(), k
    args = (case.checkpoint, case.batch["input_ids"], case.batch["attention_mask"], reference, truth)
    with_spread = {r.name: r.ratio for r in check_forward(*args, spread=spread)}
    one_sample = {r.name: r.ratio for r in check_forward(*args)}
    assert all(with_spread[k] <= one_sample[k] for k in one_sample)


def test_oracle_hidden_states_are_per_layer():
    from .conftest import CASES

    case = CASES["gqa_padded"]
    out = transformers_forward(case.checkpoint, case.batch["input_ids"])
    # two layers: the residual after layer 0 only (the last one is normed in transformers' output)
    assert sorted(out) == ["forward.hidden.0", "forward.logits"]
    assert out["forward.logits"].shape == (4, 16, 96)
    assert np.isfinite(out["forward.logits"]).all()
