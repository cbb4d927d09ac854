"""`--device` / `--tf32` (harness/device.py): option parsing and refusals, the TF32 bound, and the resume
check against measured run-to-run nondeterminism, with synthetic numbers (the GPU paths themselves run
on a GPU machine: docs/gpu.md)."""

import numpy as np
import pytest
from typer.testing import CliRunner

from mlx_parity.harness import device as D
from mlx_parity.harness.audit import audit, judge
from mlx_parity.harness.backends.mutants import MUTANTS, MutantBackend
from mlx_parity.harness.bench.gpu import gpu_precisions
from mlx_parity.harness.bench.report import gpu_markdown
from mlx_parity.harness.bench.stats import gpu_table
from mlx_parity.harness.cli import app
from mlx_parity.harness.fixtures.truth import precision_case
from mlx_parity.harness.stages import StageOutput
from mlx_parity.harness.tolerances import TruthBound, precision_tolerance, run_to_run_bounds, tolerance

from .conftest import CASES

runner = CliRunner()


# --- options and refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,expected", [("cpu", "cpu"), ("gpu", "gpu"), ("cuda", "gpu"), ("GPU", "gpu"), ("", "cpu")]
)
def test_parse_devices(name, expected):
    assert D.parse(name).name == expected


def test_parse_refuses_unknown_device_and_tf32_on_cpu():
    with pytest.raises(D.DeviceError, match="unknown device 'tpu'"):
        D.parse("tpu")
    with pytest.raises(D.DeviceError, match="--tf32 applies to --device gpu only"):
        D.parse("cpu", tf32=True)


def test_precision_follows_tf32_on_the_gpu_only():
    assert D.parse("gpu").precision == "float32"
    assert D.parse("gpu", tf32=True).precision == "tf32"
    assert D.parse("cpu").precision == "float32"
    assert D.parse("gpu").nondeterministic and not D.parse("cpu").nondeterministic


def test_gpu_runs_in_process_backends_only():
    D.check_backends(D.parse("gpu"), ["mlx", "torch", "mutant:no_shift"])
    D.check_backends(D.parse("cpu"), ["cmd:./port", "mlx-rs"])
    with pytest.raises(D.DeviceError, match="cmd:./port, mlx-rs choose their own device"):
        D.check_backends(D.parse("gpu"), ["mlx", "cmd:./port", "mlx-rs"])


@pytest.mark.parametrize(
    "args,message",
    [
        (["audit", "--device", "tpu"], "unknown device 'tpu'"),
        (["audit", "--tf32"], "--tf32 applies to --device gpu only"),
        (["audit", "--device", "gpu", "-b", "cmd:./port"], "choose their own device"),
        (["bench", "--device", "tpu"], "unknown device 'tpu'"),
        (["bench", "--tf32"], "--tf32 applies to --device gpu only"),
        (["bench", "--device", "gpu", "-b", "mlx-rs"], "not benched on the GPU"),
    ],
)
def test_cli_refusals_exit_2(args, message):
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split())


def test_cli_refuses_gpu_without_one(monkeypatch):
    """Where neither MLX nor torch has a GPU (this machine: MLX's CPU wheel), --device gpu says why and stops."""
    monkeypatch.setattr(D, "gpu_unavailable", lambda fw: f"{fw} has no GPU here")
    for cmd in (["audit", "--device", "gpu", "-f", "head"], ["bench", "--device", "gpu"]):
        r = runner.invoke(app, cmd)
        assert r.exit_code == 2, r.output
        assert "mlx has no GPU here" in r.output and "torch has no GPU here" in r.output


def test_activate_refuses_a_mode_that_is_not_in_effect(monkeypatch):
    """TF32 asked off but the measured matmul error shows TF32 operands: refused, never judged as float32."""
    monkeypatch.setattr(D, "gpu_unavailable", lambda fw: None)
    monkeypatch.setattr(
        D, "measure_matmul", lambda fw, n=512, seed=0: {"rel_error": 3e-4, "tf32": True, "device": "gpu"}
    )
    monkeypatch.setattr(D, "_CURRENT", D.Device())
    import mlx.core as mx

    monkeypatch.setattr(mx, "set_default_device", lambda d: None)
    with pytest.raises(D.DeviceError, match="TF32 on .* but TF32 off was asked for"):
        D.activate(D.parse("gpu"), ["mlx"])
    assert D.current().name == "cpu"


def test_measure_matmul_sees_float32_on_the_cpu():
    m = D.measure_matmul("mlx", n=128)
    assert m["rel_error"] < 1e-6 and not m["tf32"]


# --- the TF32 judgement ---------------------------------------------------------------------------------


def test_precision_tolerance_scales_truth_bounds_and_keeps_exact_ones():
    fwd = tolerance("forward")
    assert precision_tolerance(fwd, "float32") is fwd
    assert precision_tolerance(tolerance("weight_mapping"), "tf32") is tolerance("weight_mapping")
    t = precision_tolerance(fwd, "tf32")
    assert isinstance(t, TruthBound) and "tf32" in t.describe() and "8192" in t.describe()
    ref, truth = np.array([1.0, 2.0, -3.0]), np.array([1.0 + 1e-7, 2.0, -3.0 - 2e-7])
    np.testing.assert_allclose(t.bound(ref, truth), 2.0**13 * fwd.bound(ref, truth))
    with pytest.raises(D.DeviceError, match="no judgement for matmul precision 'fp8'"):
        precision_tolerance(fwd, "fp8")


def test_precision_bound_does_not_scale_the_sensitivity():
    """The sensitivity of a precision case is measured for that precision's gradient error already."""
    t = precision_tolerance(tolerance("optimizer"), "tf32")
    ref, truth, sens = np.array([1e-3, -1e-3]), np.array([1e-3 + 1e-11, -1e-3]), np.array([0.0, 2e-3])
    plain = tolerance("optimizer").bound(ref, truth, sens)
    np.testing.assert_allclose(t.bound(ref, truth, sens), 2.0**13 * (plain - sens) + sens)


def test_precision_case_measures_update_sensitivity_for_tf32_gradients():
    """On a real fixture: gradients moved by the TF32 gradient bound flip Adam updates whose gradient is
    near zero (sensitivity up to 2 lr), far beyond the stored float32 sensitivity; float32 keeps the case."""
    case = CASES["gqa_padded"]
    assert precision_case(case, "float32") is case
    pc = precision_case(case, "tf32")
    assert pc.name == case.name and pc.golden is case.golden
    k = "sens.optimizer.delta.lm_head.weight"
    lr = case.settings.optimizer.lr
    assert np.max(case.truth[k]) < 1e-2 * lr
    assert lr < np.max(pc.truth[k]) <= 2.01 * lr
    assert np.all(pc.truth[k] >= case.truth[k])
    assert precision_case(case, "tf32").truth is pc.truth  # cached per case and precision


def test_tf32_judgement_passes_tf32_noise_and_fails_a_real_bug():
    """On a real fixture: the golden logits perturbed by TF32-sized noise (relative 2e-4) fail the
    float32 bound and pass the TF32 one; logits 5 % off fail both."""
    case = CASES["gqa_padded"]
    logits = case.golden["forward.logits"]
    rng = np.random.default_rng(0)
    noisy = (logits * (1 + 2e-4 * rng.standard_normal(logits.shape))).astype(np.float32)
    out = {k: v for k, v in case.golden.items() if k.startswith("forward.")}
    assert judge("forward", StageOutput(out | {"forward.logits": noisy}), case, "float32").status == "fail"
    ok = judge("forward", StageOutput(out | {"forward.logits": noisy}), case, "tf32")
    assert ok.status == "pass", ok.message
    assert "tf32" in ok.tolerance
    bad = judge("forward", StageOutput(out | {"forward.logits": (logits * 1.05).astype(np.float32)}), case, "tf32")
    assert bad.status == "fail"


def test_tf32_keeps_the_bfloat16_bounds():
    """TF32 (unit roundoff 2^-11) rounds less than bfloat16 storage (2^-8): a bfloat16 stage keeps its own
    bound and sensitivities under `--tf32`, where ×8192 let 11 of 18 bfloat16 mutants pass unseen."""
    for stage in ("forward", "gradients", "optimizer", "trajectory", "isolated_forward"):
        bf16 = tolerance(stage, "bfloat16")
        assert precision_tolerance(bf16, "tf32") is bf16
    case = CASES["bf16_lora"]
    pc = precision_case(case, "tf32")
    assert pc.matmul_precision == "tf32" and pc.truth is case.truth


def test_tf32_judgement_names_a_bfloat16_mutant():
    """Judged as `--tf32` judges a bfloat16 fixture, the LoRA update without weight decay (0.1 % of θ's
    change per update, inside an 8192× bound) still fails the optimizer and is named."""
    m = MUTANTS["weight_decay_missing"]
    r = audit(MutantBackend(m), precision_case(CASES["bf16_lora"], "tf32"), precision="tf32")
    found, _ = r.findings()
    assert r.verdict == "fail"
    assert m.expected_diagnosis in [f.code for f in found]


# --- the resume judgement against run-to-run nondeterminism ---------------------------------------------


def _runs(seed=0, noise=1e-9, lost_state=False):
    """Synthetic uninterrupted, repeated and resumed runs: Δθ ~ 1e-2 on θ ~ 0.1, losses ~ 5; the GPU's
    run-to-run noise is `noise`; a resume that lost AdamW's moments is off by ~lr = 1e-3."""
    rng = np.random.default_rng(seed)
    u = {
        "checkpoint.delta.w": (1e-2 * rng.standard_normal((32, 16))).astype(np.float32),
        "checkpoint.delta.b": (1e-2 * rng.standard_normal(16)).astype(np.float32),
        "checkpoint.loss": np.array([5.0, 4.9, 4.8, 4.7], np.float32),
    }

    def jitter(d):
        return {k: (v + noise * rng.standard_normal(v.shape)).astype(np.float32) for k, v in d.items()}

    resumed = jitter(u)
    if lost_state:
        resumed = {
            k: (v + 1e-3 * np.sign(rng.standard_normal(v.shape))).astype(np.float32) if "delta" in k else v
            for k, v in resumed.items()
        }
    return u, jitter(u), resumed


def test_run_to_run_bound_keeps_an_ulp_floor_when_the_repeat_is_bit_identical():
    """A bit-identical repeat on a GPU is no proof of determinism (seen on an H100): the floor is 8× 8 ulp
    of the tensor's scale (the parameter's, for a Δθ), far below a lost state's ~lr."""
    u, _, _ = _runs()
    b = run_to_run_bounds(u, {k: v.copy() for k, v in u.items()}, {"checkpoint.delta.w": 0.1})
    assert b["checkpoint.delta.w"].spread == 0.0
    assert b["checkpoint.delta.w"].allow == pytest.approx(8 * 8 * 2.0**-24 * 0.1)
    assert b["checkpoint.loss"].allow == pytest.approx(8 * 8 * 2.0**-24 * 5.0)
    assert "ulp" in b["checkpoint.loss"].describe()
    _, _, lost = _runs(lost_state=True)
    assert (
        np.abs(lost["checkpoint.delta.w"].astype(np.float64) - u["checkpoint.delta.w"]).max()
        > 100 * b["checkpoint.delta.w"].allow
    )


def test_run_to_run_bound_adds_each_elements_sensitivity():
    u, _, _ = _runs()
    b = run_to_run_bounds(u, u)["checkpoint.delta.b"]
    sens = np.linspace(0.0, 1e-3, 16)
    np.testing.assert_allclose(b.bound(u["checkpoint.delta.b"], sensitivity=sens), b.allow + sens)


def test_run_to_run_bound_covers_nondeterminism_and_catches_lost_state():
    u, rep, resumed = _runs()
    b = run_to_run_bounds(u, rep, {"checkpoint.delta.w": 0.1, "checkpoint.delta.b": 0.1})
    for k in u:
        assert np.abs(resumed[k].astype(np.float64) - u[k]).max() <= b[k].allow, k
    _, _, lost = _runs(lost_state=True)
    assert any(np.abs(lost[k].astype(np.float64) - u[k]).max() > b[k].allow for k in u if "delta" in k)


def test_run_to_run_bound_gives_a_tensor_that_repeated_exactly_the_stage_noise():
    u, rep, _ = _runs()
    rep["checkpoint.delta.b"] = u["checkpoint.delta.b"].copy()  # this tensor happened to repeat bit for bit
    b = run_to_run_bounds(u, rep)
    assert b["checkpoint.delta.b"].spread == 0.0 and b["checkpoint.delta.b"].allow > 0.0


def _checkpoint_output(case, resumed_offset=0.0, repeat_noise=None, rng=None):
    """The checkpoint stage's output built from a fixture's own goldens: both runs = the golden trajectory."""
    t = {}
    for k, v in case.golden.items():
        if k.startswith("trajectory.delta.") or k == "trajectory.loss":
            name = k.replace("trajectory.", "")
            t[f"checkpoint.{name}"] = (v + resumed_offset).astype(v.dtype)
            t[f"checkpoint.uninterrupted.{name}"] = v.copy()
            if repeat_noise is not None:
                t[f"checkpoint.repeat.{name}"] = (v + repeat_noise * rng.standard_normal(v.shape)).astype(v.dtype)
    return StageOutput(t)


def test_checkpoint_stage_judges_resume_against_the_repeat_on_a_gpu():
    case, rng = CASES["gqa_padded"], np.random.default_rng(1)
    # a resume off by one float32 rounding: exact on the CPU fails, the GPU's measured spread covers it
    off = _checkpoint_output(case, resumed_offset=2e-9, repeat_noise=1e-9, rng=rng)
    assert judge("checkpoint", _checkpoint_output(case, 2e-9), case).status == "fail"
    gpu = judge("checkpoint", off, case, run_to_run=True)
    assert gpu.status == "pass", gpu.message
    assert "run-to-run spread" in gpu.tolerance
    # a resume that loses AdamW's state (off by ~lr) still fails against the same spread
    lost = _checkpoint_output(case, resumed_offset=1e-3, repeat_noise=1e-9, rng=rng)
    bad = judge("checkpoint", lost, case, run_to_run=True)
    assert bad.status == "fail"
    assert any("resumed vs own uninterrupted run" in t.name for t in bad.failures)


@pytest.mark.parametrize("fixture", ["gqa_padded", "trajectory_long"])
def test_gpu_resume_check_end_to_end_on_the_cpu(monkeypatch, fixture):
    """The GPU path of the checkpoint stage, run on the CPU (whose repeat is bit-identical, as one H100
    repeat was): the correct reference passes, and the mutant that loses AdamW's state on resume is still
    caught and named at the checkpoint stage."""
    from mlx_parity.harness.audit import audit
    from mlx_parity.harness.backends.mlx_backend import MLXBackend
    from mlx_parity.harness.backends.mutants import MUTANTS, MutantBackend

    monkeypatch.setattr(D, "_CURRENT", D.Device("gpu"))  # nondeterministic, without moving anything to a GPU
    case = CASES[fixture]
    ok = audit(MLXBackend(), case, ["checkpoint"])
    assert ok.verdict == "pass", ok.stages[0].message
    assert "run-to-run spread" in ok.stages[0].tolerance and any(
        "resumed vs own" in t.name for t in ok.stages[0].tensors
    )
    bad = audit(MutantBackend(MUTANTS["resume_loses_optimizer_state"]), case, ["checkpoint"])
    assert bad.verdict == "fail"
    assert any(f.code == "resume_state_lost" for f in bad.findings()[0])


def test_a_port_cannot_loosen_its_own_resume_check():
    """`checkpoint.repeat.*` from a backend the harness does not run on a nondeterministic device is an
    unexpected tensor, and the resume is judged exactly."""
    case, rng = CASES["gqa_padded"], np.random.default_rng(2)
    r = judge("checkpoint", _checkpoint_output(case, resumed_offset=2e-9, repeat_noise=1e-3, rng=rng), case)
    assert r.status == "fail"
    assert any("checkpoint.repeat." in t.name and t.problem and "not expected" in t.problem for t in r.tensors)


def test_cpu_backends_stay_deterministic_and_exact():
    from mlx_parity.harness.backends.mlx_backend import MLXBackend

    assert D.current().name == "cpu" and MLXBackend().nondeterministic is False


# --- the GPU bench's report, on the CPU ----------------------------------------------------------------


def test_gpu_bench_table_and_markdown_from_synthetic_rows():
    rows = [
        {
            "framework": "torch",
            "size": "60M",
            "precision": "fp32",
            "variant": "sdpa",
            "median_s": 0.040,
            "params": 6e7,
            "tokens": 8192,
            "tokens_per_s": 204800.0,
            "tflops": 20.0,
            "share_of_peak": 0.4,
        },
        {
            "framework": "mlx",
            "size": "60M",
            "precision": "fp32",
            "variant": "sdpa",
            "median_s": 0.044,
            "params": 6e7,
            "tokens": 8192,
            "tokens_per_s": 186181.0,
            "tflops": 18.0,
            "share_of_peak": 0.36,
        },
        {
            "framework": "mlx",
            "size": "60M",
            "precision": "fp32",
            "variant": "explicit",
            "error": "MemoryError: out of memory",
        },
    ]
    table = gpu_table(rows)
    assert table[0]["ratio"] == pytest.approx(1.1) and table[0]["best_mlx"] == "sdpa"
    md = gpu_markdown(
        {
            "device": "gpu",
            "gpu": "H100",
            "versions": {},
            "steps": 5,
            "warmup": 2,
            "seconds": 1.0,
            "command": "parity bench --device gpu",
            "peak_tflops": {"fp32": {"torch": 50.0}},
            "table": table,
            "failures": {},
            "skipped": ["mlx/1B/bf16"],
        }
    )
    assert "1.10× (sdpa)" in md and "out of memory" in md and "mlx/1B/bf16: skipped" in md
    assert gpu_precisions(None) == ["fp32", "tf32", "bf16"] and gpu_precisions(True) == ["tf32", "bf16"]


def test_the_judge_runs_no_twin_a_case_comes_prepared_for_its_precision():
    """TF32 sensitivities are measured when the case is prepared (`precision_case`), never inside the audit."""
    from mlx_parity.harness.audit import audit
    from mlx_parity.harness.backends.mlx_backend import MLXBackend

    with pytest.raises(ValueError, match="precision_case"):
        audit(MLXBackend(), CASES["head"], ["loss"], precision="tf32")
