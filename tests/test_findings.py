"""Findings, not cascades: each bug of a port is one finding at the smallest piece that shows it, and the
failures that follow from it are marked inherited, even when several bugs hide each other end to end."""

from __future__ import annotations

import dataclasses

from mlx_parity.harness.audit import StageResult, audit
from mlx_parity.harness.backends import get_backend
from mlx_parity.harness.backends.mutants import MUTANTS, Mutant, MutantBackend, _opt
from mlx_parity.harness.diagnosis import Diagnosis
from mlx_parity.harness.findings import NOT_IMPLEMENTED, analyse
from mlx_parity.harness.stages import STAGES

from .conftest import CASES, audit_once, audited


def _summary(result):
    found, inherited = result.findings()
    return [(f.stage, f.code) for f in found], {i.stage: i.from_stages for i in inherited}


def test_a_forward_bug_is_one_finding_and_the_rest_inherit_it():
    found, inherited = _summary(audited("mutant:rope_theta_hardcoded", "mha_sharded"))
    assert found == [("isolated_forward", "rope_base")]
    assert inherited == {"forward": ["isolated_forward"]} | {
        s: ["isolated_forward"] for s in ("loss", "gradients", "optimizer", "trajectory", "checkpoint")
    }


def _scaled_mlp(model) -> None:
    """An MLP whose output is 1.5× the reference's: no convention a port can get wrong explains it."""
    import mlx.nn as nn

    for layer in model.model.layers:
        layer.mlp.activation = lambda gate, up: 1.5 * nn.silu(gate) * up


def test_a_forward_bug_without_the_isolated_check_says_no_cause_was_solved():
    """A port that answers the eight stages only, with a bug no convention reproduces: the forward
    localises the layer and says that no cause was solved, never that the isolated check (which did not
    run) names one."""
    scaled = dataclasses.replace(MUTANTS["mlp_gelu"], name="scaled_mlp", model_hook=_scaled_mlp)
    r = audit_once(MutantBackend(scaled), CASES["mha_sharded"], STAGES)
    found, _ = r.findings()
    assert [(f.stage, f.code) for f in found] == [("forward", "forward_divergence")]
    assert "does not answer the isolated forward check" in found[0].summary


def test_a_loss_bug_is_found_in_the_isolated_loss_and_explains_the_end_to_end_failures():
    found, inherited = _summary(audited("mutant:distrust_lambda_one", "lora"))
    assert found == [("isolated_loss", "distrust_lambda")]
    assert inherited["loss"] == ["isolated_loss"] and inherited["trajectory"] == ["isolated_loss"]


def test_a_bug_no_isolated_check_holds_is_found_where_it_first_shows():
    """Accumulation summed: the isolated optimizer (given gradients, no accumulation) passes, so the
    end-to-end optimizer stage is the finding."""
    found, inherited = _summary(audited("mutant:accumulation_sum", "accum_head"))
    assert found == [("optimizer", "accumulation_scaling")]
    assert inherited == {"trajectory": ["optimizer"], "checkpoint": ["optimizer"]}


def test_two_bugs_at_once_are_two_findings():
    """RoPE base hard-coded and AdamW eps wrong: end to end the forward bug masks the optimizer's;
    the isolated checks name each."""
    both = dataclasses.replace(MUTANTS["rope_theta_hardcoded"], name="rope+eps", settings=_opt(eps=1e-7))
    found, _ = _summary(audit(MutantBackend(both), CASES["mha_sharded"]))
    assert found == [("isolated_forward", "rope_base"), ("isolated_optimizer", "adam_eps")]


def test_three_bugs_at_once_are_three_findings():
    three = Mutant(
        "rope+lambda+resume",
        "three bugs",
        "forward",
        ("tied",),
        "rope_base",
        config=lambda c: dataclasses.replace(c, rope_theta=10000.0),
        settings=lambda s: dataclasses.replace(s, loss=dataclasses.replace(s.loss, lam=0.0)),
        reset_optimizer_on_resume=True,
    )
    found, _ = _summary(audit(MutantBackend(three), CASES["tied"]))
    assert [f[0] for f in found] == ["checkpoint", "isolated_forward", "isolated_loss"]
    assert dict(found)["isolated_loss"] == "distrust_lambda" and dict(found)["checkpoint"] == "resume_state_lost"


def test_one_cause_seen_by_two_checks_is_one_finding():
    found, _ = _summary(audited("mutant:no_shift", "gqa_padded"))
    assert found == [("shifted_slices", "labels_not_shifted")]


def test_a_correct_backend_has_no_findings():
    assert analyse(audited("torch", "head").stages) == ([], [])


def test_a_trainable_set_is_not_inherited_from_an_unrelated_key_mismatch():
    """gate_proj and up_proj swapped in the key map, and only lm_head and the final norm trained: two bugs.
    The trainable set differs in tensors that all loaded, so it does not follow from the swap."""
    both = dataclasses.replace(
        MUTANTS["trains_head_only"], name="swap+head", loader=MUTANTS["gate_up_swapped_keys"].loader
    )
    found, _ = _summary(audit(MutantBackend(both), CASES["gqa_padded"]))
    assert ("weight_mapping", "key_mapping") in found and ("gradients", "trainable_set_mismatch") in found


def test_an_update_rule_bug_is_named_beside_another_trainable_set():
    """Head-only training and a learning rate 1.5× too high: the update rule is still solved on the tensors
    both train, from the port's own moments (a different set once ended the optimizer's diagnosis)."""
    both = dataclasses.replace(
        MUTANTS["trains_head_only"],
        name="head+lr",
        settings=lambda s: dataclasses.replace(
            s, trainable="head", optimizer=dataclasses.replace(s.optimizer, lr=1.5 * s.optimizer.lr)
        ),
    )
    found, _ = _summary(audit(MutantBackend(both), CASES["gqa_padded"]))
    codes = {code for _, code in found}
    assert {"trainable_set_mismatch", "learning_rate"} <= codes


def test_a_stage_the_port_does_not_implement_is_a_finding_whatever_failed_before():
    """A port that saves no checkpoint answers `checkpoint` unsupported: no upstream failure explains a
    missing feature, so it is never filed as inherited (it was, behind a forward bug)."""
    stages = [
        StageResult("forward", "fail", diagnoses=[Diagnosis("forward_divergence", "layer 0", {})]),
        StageResult("trajectory", "fail", diagnoses=[Diagnosis("unexplained", "drifts", {})]),
        StageResult(
            "checkpoint",
            "fail",
            message=f"{NOT_IMPLEMENTED}: saves no optimizer state",
            diagnoses=[Diagnosis("error", "the stage failed without output", {})],
        ),
    ]
    found, inherited = analyse(stages)
    assert ("checkpoint", "error") in [(f.stage, f.code) for f in found]
    assert "checkpoint" not in [i.stage for i in inherited] and "trajectory" in [i.stage for i in inherited]
    stages[2] = StageResult(
        "checkpoint", "fail", message="the port reported: cannot resume", diagnoses=[Diagnosis("stage_error", "x", {})]
    )
    found, _ = analyse(stages)
    assert ("checkpoint", "stage_error") in [(f.stage, f.code) for f in found]


def test_a_port_answering_only_the_eight_stages_gets_its_forward_causes():
    """No isolated request: the first divergent layer is re-computed from the port's own input and weights
    (harness/diagnosis/port_layer.py), and two bugs in it (RoPE base, GELU) are both named there."""
    both = dataclasses.replace(MUTANTS["mlp_gelu"], name="base+gelu", config=MUTANTS["rope_theta_hardcoded"].config)
    r = audit_once(MutantBackend(both), CASES["mha_sharded"], STAGES)
    found, _ = r.findings()
    assert {(f.stage, f.code) for f in found} == {("forward", "rope_base"), ("forward", "mlp_activation")}
    assert all(f.evidence["from_port_inputs"] and f.evidence["reproduced_to"] < 1e-4 for f in found)


def test_a_port_answering_only_the_eight_stages_gets_its_update_rule_from_its_own_moments():
    """A forward bug changes every gradient, yet the update is re-computed from the port's own m and v, so the
    optimizer's own bug (bias correction flipped) is named beside the forward's, not inherited from it."""
    both = dataclasses.replace(
        MUTANTS["bias_correction_flipped"], name="base+bias_correction", config=MUTANTS["rope_theta_hardcoded"].config
    )
    found, inherited = audit_once(MutantBackend(both), CASES["mha_sharded"], STAGES).findings()
    assert {(f.stage, f.code) for f in found} == {("forward", "rope_base"), ("optimizer", "bias_correction")}
    assert all(f.evidence["from_port_inputs"] for f in found)
    assert "optimizer" not in {i.stage for i in inherited}


def test_the_reference_on_a_port_that_did_not_load_its_weights_names_no_forward_convention():
    """Random weights explain the forward: re-computed with the port's own weights, the reference's layer
    reproduces it, so no convention is named (weight_mapping holds the cause)."""
    r = audit_once(get_backend("mutant:weights_not_loaded"), CASES["gqa_padded"], STAGES)
    found, _ = r.findings()
    assert [f.code for f in found] == ["weights_not_loaded"]


def test_no_eps_is_named_where_the_configured_eps_reproduces_the_norm_too():
    """Weights never loaded, in bfloat16: the norms' rows imply some eps within bfloat16's loose fit, but the
    configured eps reproduces them as well, so no eps is named (it was, beside the real cause)."""
    found, _ = _summary(audited("mutant:weights_not_loaded", "bf16_full"))
    assert [code for _, code in found] == ["weights_not_loaded"]


def test_inheritance_is_claimed_only_where_an_isolated_check_ran():
    """Labels not shifted: the loss's isolated check ran, so the loss follows from it; the gradients have
    no isolated check, so they only may follow from it, and say so."""
    _, inherited = audited("mutant:no_shift", "gqa_padded").findings()
    by_stage = {i.stage: i for i in inherited}
    assert by_stage["loss"].isolated and by_stage["loss"].describe().startswith("follows from")
    assert not by_stage["gradients"].isolated
    assert by_stage["gradients"].describe() == "may follow from shifted_slices, isolated_loss (not isolated)"
