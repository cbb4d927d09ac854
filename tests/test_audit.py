"""Every stage of both Python backends passes against the goldens on every bundled fixture."""

import pytest

from mlx_parity.harness.stages import ALL_STAGES as STAGES

from .conftest import CASES, audited


def test_every_fixture_is_bundled():
    assert {
        "gqa_padded",
        "mha_sharded",
        "tied",
        "lora",
        "head",
        "clip_accum_warmup",
        "small_eps_bias",
        "trajectory_long",
    } <= set(CASES)


@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("fixture", sorted(CASES))
def test_all_stages_pass(backend, fixture):
    result = audited(backend, fixture)
    assert [s.name for s in result.stages] == list(STAGES)
    failing = [f"{s.name}: {s.message}" for s in result.stages if s.status != "pass"]
    assert not failing, "\n".join(failing)
    assert all(s.tensors for s in result.stages), "a stage compared nothing"
