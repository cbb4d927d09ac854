"""`parity calibrate`: random configurations of a checkpoint, audited, with their margins and false alarms."""

import json
import shutil

import numpy as np
from typer.testing import CliRunner

from mlx_parity.harness.backends import get_backend
from mlx_parity.harness.calibrate import Configuration, Run, fixture_margins, random_configuration, summary, sweep
from mlx_parity.harness.cli import app
from mlx_parity.reference.settings import TrainSettings

from .conftest import CASES


def test_random_configurations_are_valid_seeded_and_cover_every_option():
    draws = [random_configuration(np.random.default_rng([0, i]), 30) for i in range(200)]
    assert draws[7] == random_configuration(np.random.default_rng([0, 7]), 30)
    for d in draws:
        s = TrainSettings.from_dict(d["settings"])  # raises on an invalid one
        assert 1 <= d["layers"] <= 8 and d["batch_size"] % s.accum_steps == 0
        assert (d["dtype"] == "bfloat16") == (s.precision == "bfloat16")
        if s.trainable == "lora":
            assert 1 <= s.lora.layers <= d["layers"]
    settings = [TrainSettings.from_dict(d["settings"]) for d in draws]
    assert {s.trainable for s in settings} == {"full", "lora", "head"}
    assert {s.precision for s in settings} == {"float32", "bfloat16"}
    assert {s.accum_steps for s in settings} == {1, 2, 4}
    assert {s.schedule.kind for s in settings} == {"constant", "warmup_cosine"}
    assert {s.optimizer.bias_correction for s in settings} == {True, False}
    assert None in {s.clip_norm for s in settings} and len({s.clip_norm for s in settings}) > 2
    assert {d["layers"] for d in draws} == set(range(1, 9))


def test_sweep_audits_each_configuration_and_counts_what_a_mutant_does(tmp_path):
    checkpoint = CASES["gqa_padded"].checkpoint
    done = list(sweep(checkpoint, 2, 3, [get_backend("mlx")], ["no_shift"], only=[1], keep=tmp_path))
    (conf,) = done  # only the second configuration, kept where asked
    assert conf.index == 1 and conf.error is None and conf.seconds_to_build > 0
    layers = json.loads((checkpoint / "config.json").read_text())["num_hidden_layers"]
    drawn = random_configuration(np.random.default_rng([3, 1]), layers)
    assert (
        json.loads((tmp_path / "config1" / "settings.json").read_text())["trainable"] == drawn["settings"]["trainable"]
    )
    correct, mutant = conf.runs
    assert correct.backend == "mlx" and correct.verdict == "pass" and not correct.failed
    assert set(correct.margins) >= {"forward", "loss", "gradients", "optimizer", "trajectory"}
    assert mutant.backend == "mutant:no_shift" and mutant.cell == "named" and "shifted_slices" in mutant.failed
    s = summary(done)
    assert s["false_alarms"] == [] and s["mutants"] == {"mutant:no_shift": {"named": 1}}
    assert s["worst_margin"]["mlx"]["gradients"] == [correct.margins["gradients"], 1, correct.worst["gradients"]]
    assert correct.worst["gradients"].startswith("grad.")


def test_summary_counts_a_failing_correct_backend_as_a_false_alarm():
    run = Run("torch", "fail", {"gradients": 1.6, "loss": 0.1}, ["gradients"], worst={"gradients": "grad.w"})
    s = summary([Configuration(4, 0, {}, runs=[run])])
    assert s["false_alarms"] == [{"configuration": 4, "backend": "torch", "stage": "gradients"}]
    assert s["worst_margin"]["torch"]["gradients"] == [1.6, 4, "grad.w"]


def test_cli_refuses_an_unknown_mutant_and_writes_the_fixtures_margins_and_mutants(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["calibrate", "--checkpoint", str(tmp_path), "-m", "no_such_bug"])
    assert r.exit_code != 0 and "unknown mutant" in r.output
    r = runner.invoke(app, ["calibrate", "--checkpoint", str(tmp_path), "--configs", "3", "--only", "3"])
    assert r.exit_code != 0 and "configurations are 0 to 2" in r.output
    shutil.copytree(CASES["head"].path, tmp_path / "fixtures" / "head")
    out = tmp_path / "cal.json"
    fixtures = ["--fixtures-dir", str(tmp_path / "fixtures"), "-m", "no_shift"]
    r = runner.invoke(app, ["calibrate", "-b", "mlx", *fixtures, "--json", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["summary"]["configurations"] == 1 and data["summary"]["false_alarms"] == []
    assert data["summary"]["mutants"] == {"mutant:no_shift": {"named": 1}}
    assert data["configurations"][0]["options"] == {"fixture": "head"}
    assert "false alarms: 0" in r.output


def test_a_backend_that_does_not_train_in_a_fixtures_precision_is_not_run_there(tmp_path):
    """A float32-only port (the candle one) refuses bfloat16 with `.unsupported`: in a sweep that is no false
    alarm, it is said as not implemented."""
    for name in ("head", "bf16_lora"):
        shutil.copytree(CASES[name].path, tmp_path / name)
    float32_only = get_backend("mlx")
    float32_only.precisions = ("float32",)
    done = {c.options["fixture"]: c for c in fixture_margins(tmp_path, [float32_only])}
    assert done["bf16_lora"].runs == [] and done["bf16_lora"].not_implemented == ["mlx"]
    assert [r.verdict for r in done["head"].runs] == ["pass"] and done["head"].not_implemented == []
    assert summary(list(done.values()))["false_alarms"] == []


def test_a_data_parallel_mutant_runs_on_its_ranks_or_is_not_applicable(tmp_path):
    """A data-parallel bug shows only on several ranks: run on one, `parity calibrate` counted it as passed
    (found on a kept SmolLM2 configuration). It runs on its ranks, and where the batch does not divide into
    them it is not applicable, never passed."""
    for name in ("gqa_padded", "gqa_single"):
        shutil.copytree(CASES[name].path, tmp_path / name)
    done = {c.options["fixture"]: c for c in fixture_margins(tmp_path, [], ["dp_gradients_summed"])}
    (ran,) = done["gqa_padded"].runs
    assert ran.cell == "named" and "data_parallel" in ran.failed, ran
    (refused,) = done["gqa_single"].runs
    assert refused.cell == "not applicable" and "does not divide" in refused.verdict


def test_a_cause_a_mutant_does_not_have_is_counted_as_stated_besides_its_own(tmp_path):
    """A wrong cause costs more trust than a missing one: calibrate says on how many configurations a mutant's audit
    stated a cause it does not have (a sweep's flipped bias correction was also called an AdamW eps)."""
    wrong = Run("mutant:bias_correction_flipped", "fail", {}, ["isolated_optimizer"], cell="localised")
    wrong.other_causes = ["isolated_optimizer:adam_eps"]
    right = Run("mutant:bias_correction_flipped", "fail", {}, ["isolated_schedule"], cell="named")
    s = summary([Configuration(0, 0, {}, runs=[wrong]), Configuration(1, 0, {}, runs=[right])])
    assert s["mutants"] == {"mutant:bias_correction_flipped": {"localised": 1, "named": 1, "other causes stated": 1}}
    shutil.copytree(CASES["head"].path, tmp_path / "head")
    (head,) = fixture_margins(tmp_path, [], ["no_shift"])
    assert head.runs[0].cell == "named" and head.runs[0].other_causes == []
