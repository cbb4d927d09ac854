"""The external-program protocol: the example adapter passes, mutants fail with their diagnosis
through it, and a port that crashes, hangs or writes garbage is reported at that stage only."""

import shlex
import sys
from pathlib import Path

import pytest

from mlx_parity.harness.audit import audit
from mlx_parity.harness.backends import get_backend
from mlx_parity.harness.backends.external import ExternalBackend, example_adapter_backend
from mlx_parity.harness.stages import ALL_STAGES as STAGES

from .conftest import CASES

BROKEN = Path(__file__).parent / "ports" / "broken_port.py"


def broken(mode: str, stage: str, timeout: float = 60) -> ExternalBackend:
    return ExternalBackend(f"{shlex.quote(sys.executable)} {BROKEN} {mode} {stage}", timeout=timeout)


def test_example_adapter_passes_every_stage():
    result = audit(example_adapter_backend(), CASES["lora"])
    assert [s.status for s in result.stages] == ["pass"] * len(STAGES), [s.message for s in result.stages]


def test_one_process_serves_every_stage_and_still_names_a_bug():
    """`cmd-once:` sends every stage in one request (one load): the example adapter passes, a mutant fails where
    it does, and the port ran once (each stage's time is its share of the one run)."""
    once = get_backend(f"cmd-once:{example_adapter_backend().command}")
    assert once.one_process and once.name.startswith("cmd-once:")
    result = audit(once, CASES["lora"])
    assert [s.status for s in result.stages] == ["pass"] * len(STAGES), [s.message for s in result.stages]
    bad = ExternalBackend(example_adapter_backend("no_shift").command, one_process=True)
    first = audit(bad, CASES["gqa_padded"]).first_failure()
    assert first is not None and first.diagnosis.code == "labels_not_shifted"


def test_the_request_links_the_checkpoint_instead_of_copying_it(tmp_path):
    from mlx_parity.harness.protocol.client import write_request

    case = CASES["mha_sharded"]  # six shards and an index
    write_request(case, tmp_path / "req")
    src = sorted(f.name for f in case.checkpoint.iterdir())
    linked = sorted(f.name for f in (tmp_path / "req" / "checkpoint").iterdir())
    assert linked == src
    for name in src:
        a, b = case.checkpoint / name, tmp_path / "req" / "checkpoint" / name
        assert b.is_symlink() or b.stat().st_ino == a.stat().st_ino  # the same file, not a copy
        assert b.read_bytes() == a.read_bytes()


@pytest.mark.parametrize(
    "mutant, fixture",
    [("no_shift", "gqa_padded"), ("bias_correction_flipped", "mha_sharded"), ("weights_not_loaded", "gqa_padded")],
)
def test_mutant_through_the_protocol_fails_with_its_diagnosis(mutant, fixture):
    from mlx_parity.harness.backends.mutants import MUTANTS

    m = MUTANTS[mutant]
    first = audit(example_adapter_backend(mutant), CASES[fixture]).first_failure()
    assert first is not None and first.name == m.expected_stage
    assert first.diagnosis.code == m.expected_diagnosis


@pytest.mark.parametrize(
    "mode, stage, expected",
    [
        ("crash", "forward", "exited with status 3: thread 'main' panicked"),
        ("garbage", "loss", "is unreadable"),
        ("nan", "gradients", "non-finite values"),
        ("shape", "forward", "shape"),
    ],
)
def test_a_broken_stage_is_reported_and_the_audit_carries_on(mode, stage, expected):
    result = audit(broken(mode, stage), CASES["head"], ("weight_mapping", stage, "shifted_slices"))
    by = {s.name: s for s in result.stages}
    assert by[stage].status == "fail" and expected in by[stage].message, by[stage].message
    assert by["weight_mapping"].status == "pass" and by["shifted_slices"].status == "pass"


def test_a_port_that_initialises_unseeded_is_named_and_its_weights_not_used_to_explain():
    """Two loads of the same request in two processes differ: the port breaks the protocol's determinism, and
    its reported weights are not the ones its other processes computed with."""
    result = audit(broken("unseeded", "weight_mapping"), CASES["gqa_padded"], ("weight_mapping",))
    (stage,) = result.stages
    assert stage.status == "fail" and stage.diagnoses[0].code == "nondeterministic_load"
    assert stage.diagnoses[0].evidence["differ"] == ["model.layers.0.mlp.down_proj.bias"]
    steady = audit(
        broken("nan", "weight_mapping"), CASES["gqa_padded"], ("weight_mapping",)
    )  # wrong the same way twice
    assert steady.stages[0].status == "fail"
    assert "nondeterministic_load" not in {d.code for d in steady.stages[0].diagnoses}


def test_a_port_without_lora_adapters_is_told_so_not_that_it_leaves_modules_out():
    result = audit(broken("nolora", "weight_mapping"), CASES["lora"], ("weight_mapping",))
    (d,) = result.stages[0].diagnoses
    assert d.code == "lora_adapters_missing" and "lora_init" in d.summary
    assert all(n.endswith((".lora_a", ".lora_b")) for n in d.evidence["unused"])


def test_pieces_a_port_declares_it_cannot_compute_are_not_checked_and_the_rest_are_judged():
    """A fused attention kernel has no scores or probabilities: declared (`not_computed`), the other pieces
    pass and the stage says which were not checked; left out silently, each is a failure."""
    declared = audit(broken("fused", "isolated_forward"), CASES["gqa_padded"], ("isolated_forward",)).stages[0]
    assert declared.status == "pass", declared.message
    assert not any(t.name.endswith((".scores", ".probs")) for t in declared.tensors)
    assert any(t.name.endswith(".attn") for t in declared.tensors)
    assert "not checked, the port cannot compute them: 4 tensors (probs: fused attention" in declared.tolerance
    silent = audit(broken("fused-undeclared", "isolated_forward"), CASES["gqa_padded"], ("isolated_forward",))
    assert silent.stages[0].status == "fail" and "absent" in silent.stages[0].message


def test_a_hanging_stage_times_out():
    result = audit(broken("hang", "loss", timeout=20), CASES["head"], ("loss", "shifted_slices"))
    assert result.stages[0].status == "fail" and "timed out after 20 s" in result.stages[0].message
    assert result.stages[1].status == "pass"


def test_a_missing_program_is_unavailable_not_a_crash():
    """audit() reports it as skipped; the CLI and the plugin turn a named backend that cannot run into an error."""
    result = audit(get_backend("cmd:/nonexistent/port --flag"), CASES["head"], ("loss",))
    assert result.verdict == "skip" and "not an executable" in result.stages[0].message
