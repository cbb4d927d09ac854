"""Every built-in mutant is caught, first at its expected stage, and named as one of the audit's findings
on every fixture that exposes it."""

import pytest

from mlx_parity.harness.backends.mutants import MUTANTS

from .conftest import audited

PAIRS = [(m, f) for m in MUTANTS.values() for f in m.fixtures]


def test_mutants_cover_design_bug_list():
    design = {
        "weights_not_loaded",
        "no_shift",
        "forward_only",
        "optimizer_disconnected",
        "silent_fallback",
        "key_prefix",
        "bias_correction_flipped",
        "rmsnorm_eps_hardcoded",
        "tied_embeddings_ignored",
        "padding_counted",
    }
    assert design <= set(MUTANTS)


@pytest.mark.parametrize("mutant, fixture", PAIRS, ids=[f"{m.name}-{f}" for m, f in PAIRS])
def test_mutant_is_caught_at_its_stage(mutant, fixture):
    result = audited(f"mutant:{mutant.name}", fixture, world=mutant.world_size)
    first = result.first_failure()
    assert first is not None, f"{mutant.name} passed every stage on {fixture}"
    assert first.name == mutant.expected_stage, f"{mutant.name} first failed at {first.name}: {first.message}"
    found = [(f.stage, f.code) for f in result.findings()[0]]
    assert mutant.expected_diagnosis in {code for _, code in found}, f"{mutant.name}: findings {found}"
