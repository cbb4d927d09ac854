"""Isolated checks: the loss on the reference's logits and one update on the reference's gradients,
so a bug upstream cannot mask one downstream, and each bug shows where it lives."""

from __future__ import annotations

import pytest

from mlx_parity.harness.audit import audit
from mlx_parity.harness.backends import get_backend
from mlx_parity.harness.protocol.client import read_response
from mlx_parity.harness.stages import ISOLATED_STAGES, StageOutput

from .conftest import CASES, audited
from .test_malformed import Canned, correct_outputs


def _stages(result):
    return {s.name: s for s in result.stages}


@pytest.mark.parametrize("backend", ["mlx", "torch", "mlx-rs"])
def test_correct_backends_pass_the_isolated_checks(backend):
    b = get_backend(backend)
    if b.unavailable():
        pytest.skip(f"{backend}: {b.unavailable()}")
    for name in ("lora", "clip_accum_warmup", "small_eps_bias"):  # the isolated stages of the full audit
        r = _stages(audited(backend, name))
        assert [r[s].status for s in ISOLATED_STAGES] == ["pass"] * len(ISOLATED_STAGES), {
            s: r[s].message for s in ISOLATED_STAGES
        }


def test_a_forward_bug_does_not_mask_the_loss_and_optimizer():
    """RoPE base hard-coded: every end-to-end stage from forward on fails; of the isolated checks only the
    forward's pieces do, at q_rope and k_rope alone."""
    r = _stages(audited("mutant:rope_theta_hardcoded", "mha_sharded"))
    assert r["forward"].status == "fail" and r["optimizer"].status == "fail"
    assert r["isolated_loss"].status == "pass" and r["isolated_optimizer"].status == "pass"
    failing = {t.name.rsplit(".", 1)[-1] for t in r["isolated_forward"].failures}
    assert failing == {"q_rope", "k_rope", "output"}, failing


@pytest.mark.parametrize(
    "mutant, fixture, stage, code",
    [
        ("distrust_lambda_one", "lora", "isolated_loss", "distrust_lambda"),
        ("padding_counted", "gqa_padded", "isolated_loss", "padding_counted"),
        ("adam_eps_mismatch", "gqa_padded", "isolated_optimizer", "adam_eps"),
        ("weight_decay_missing", "small_eps_bias", "isolated_optimizer", "weight_decay_missing"),
        ("clipping_missing", "clip_accum_warmup", "isolated_optimizer", "clipping_missing"),
    ],
)
def test_an_isolated_check_names_the_bug_it_holds(mutant, fixture, stage, code):
    result = audited(f"mutant:{mutant}", fixture)  # its isolated stages, as an audit of those alone gives them
    r = _stages(result)
    assert r[stage].status == "fail" and r[stage].diagnosis.code == code, (r[stage].message, r[stage].diagnosis)
    for other in (s for s in ISOLATED_STAGES if s not in (stage, "isolated_schedule")):
        assert r[other].status == "pass", r[other].message
    # N updates repeat the one judged alone: where they fail too, the one-update finding explains them
    found, inherited = result.findings()
    assert [(f.stage, f.code) for f in found] == [(stage, code)]


def test_unsupported_is_not_checked_for_an_isolated_check_and_a_failure_for_a_core_stage():
    case = CASES["head"]
    outputs = correct_outputs(case)
    outputs["isolated_loss"] = StageOutput(unsupported="no loss from logits")
    result = audit(Canned(outputs), case)
    assert _stages(result)["isolated_loss"].status == "not checked" and result.verdict == "pass"
    outputs["loss"] = StageOutput(unsupported="no loss")
    result = audit(Canned(outputs), case)
    assert _stages(result)["loss"].status == "fail" and result.verdict == "fail"


def test_the_protocols_unsupported_answer(tmp_path):
    (tmp_path / "isolated_loss.unsupported").write_text("this port has no loss-from-logits entry point")
    out = read_response(tmp_path, "isolated_loss")
    assert out.unsupported == "this port has no loss-from-logits entry point" and not out.error
