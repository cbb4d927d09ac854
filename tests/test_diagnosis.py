"""Diagnosis rules beyond the mutant catalogue: a load report's prefix pattern, swapped keys, and the
localisation of a failure no rule explains."""

import dataclasses
import shutil

import numpy as np
from safetensors.numpy import load_file, save_file

from mlx_parity.harness.audit import audit, judge
from mlx_parity.harness.audit import diagnose_stage as diagnose
from mlx_parity.harness.backends import get_backend
from mlx_parity.harness.case import Case
from mlx_parity.harness.stages import StageOutput

from .conftest import CASES, audited


def copy_case(tmp_path, name="gqa_padded") -> Case:
    shutil.copytree(CASES[name].path, tmp_path / name)
    return Case(tmp_path / name)


def test_prefixed_checkpoint_keys_are_named_as_a_prefix(tmp_path):
    case = copy_case(tmp_path)
    f = case.checkpoint / "model.safetensors"
    save_file({f"base.{k}": v for k, v in load_file(str(f)).items()}, str(f))
    # the goldens still expect the real names; the reference loads non-strictly and reports
    stage = audit(get_backend("mlx"), case, ("weight_mapping",)).stages[0]
    assert stage.status == "fail"
    assert stage.diagnosis.code == "key_mapping" and stage.diagnosis.evidence["prefix"] == "base."


def test_swapped_parameters_are_named(tmp_path):
    case = CASES["gqa_padded"]
    out = get_backend("mlx").run(case, ("weight_mapping",))["weight_mapping"]
    a, b = "weights.model.layers.0.mlp.gate_proj.weight", "weights.model.layers.0.mlp.up_proj.weight"
    out.tensors[a], out.tensors[b] = out.tensors[b], out.tensors[a]
    result = judge("weight_mapping", out, case)
    d = diagnose(result, out, case)[0]
    assert d.code == "key_mapping"
    assert d.evidence["holds"]["model.layers.0.mlp.gate_proj.weight"] == "model.layers.0.mlp.up_proj.weight"


def test_tied_embeddings_are_named_beside_an_ignored_inv_freq_key():
    """A port with its own lm_head on a tied config whose load report also lists RoPE's unused inv_freq
    buffer (which the reference ignores too): the tie is the cause, not a key mapping."""
    case = CASES["tied"]
    out = get_backend("mlx").run(case, ("weight_mapping",))["weight_mapping"]
    out.tensors["weights.lm_head.weight"] = out.tensors["weights.model.embed_tokens.weight"] * 0.5
    out.meta["load_report"] = {
        "missing": ["lm_head.weight"],
        "unexpected": ["model.layers.0.self_attn.rotary_emb.inv_freq"],
    }
    found = diagnose(judge("weight_mapping", out, case), out, case)
    assert [d.code for d in found] == ["tied_embeddings_ignored"]


def test_a_parameter_of_another_shape_is_named_not_a_crash():
    """A weight stored [in, out] (the checkpoint's transposed): once a ValueError inside np.corrcoef."""
    case = CASES["gqa_padded"]
    out = get_backend("mlx").run(case, ("weight_mapping",))["weight_mapping"]
    name = "weights.model.layers.0.mlp.down_proj.weight"
    out.tensors[name] = out.tensors[name].T.copy()
    d = diagnose(judge("weight_mapping", out, case), out, case)[0]
    assert d.code == "parameter_shape" and "transposed" in d.summary
    assert d.evidence["port_vs_checkpoint_shape"]["model.layers.0.mlp.down_proj.weight"][0] == list(
        out.tensors[name].shape
    )


def test_an_unexplained_failure_is_still_localised():
    case = CASES["gqa_padded"]
    out = get_backend("mlx").run(case, ("gradients",))["gradients"]
    name = "grad.model.layers.1.mlp.up_proj.weight"
    out.tensors[name] = out.tensors[name].copy()
    out.tensors[name][3, 5] += 0.5
    result = judge("gradients", out, case)
    d = diagnose(result, out, case)[0]
    assert d.code == "unexplained"
    assert d.evidence["tensor"] == name and d.evidence["where"] == [3, 5] and "layer 1" in d.summary


def test_a_stage_error_is_its_diagnosis():
    case = CASES["head"]
    out = StageOutput(error="RuntimeError: boom\nstack")
    result = judge("loss", out, case)
    assert diagnose(result, out, case)[0].code == "stage_error"


def test_a_scaled_learning_rate_is_named():
    from mlx_parity.harness.backends.mutants import Mutant, MutantBackend, _opt

    m = Mutant(
        "lr_x2",
        "lr doubled",
        "optimizer",
        ("gqa_padded",),
        "learning_rate",
        settings=lambda s: _opt(lr=s.optimizer.lr * 2)(s),
    )
    first = audit(MutantBackend(m), CASES["gqa_padded"]).first_failure()
    assert first.name == "optimizer" and first.diagnosis.code == "learning_rate"
    assert abs(first.diagnosis.evidence["update_ratio"] - 2.0) < 0.01


def test_a_trajectory_whose_first_loss_differs_is_not_filed_after_an_update():
    """Loss 0 is computed before any update: a difference there is no "difference after the first update"."""
    case = CASES["trajectory_long"]
    loss = case.golden["trajectory.loss"].copy()
    loss[0] *= 1.01
    out = StageOutput({k: v for k, v in case.golden.items() if k.startswith("trajectory.")} | {"trajectory.loss": loss})
    d = diagnose(judge("trajectory", out, case), out, case)[0]
    assert d.code == "unexplained" and "before any update" in d.summary
    loss = case.golden["trajectory.loss"].copy()
    loss[2] *= 1.01
    out.tensors["trajectory.loss"] = loss
    d = diagnose(judge("trajectory", out, case), out, case)[0]
    assert d.code == "trajectory_divergence" and d.evidence["first_divergent_update"] == 2


def test_a_port_without_the_lora_parameters_is_a_trainable_set_not_a_silent_fallback():
    """A port that trains lm_head where the settings train LoRA adapters reports none of the reference's
    updates: that is another trainable set (once named `no_update`, "a silent fallback")."""
    case = CASES["lora"]
    g = case.golden
    head = case.initial_weights["weights.lm_head.weight"]
    out = StageOutput(
        {k: v for k, v in g.items() if k.startswith("optimizer.") and "lora" not in k}
        | {f"optimizer.{m}.lm_head.weight": np.full(head.shape, 1e-3, np.float32) for m in ("delta", "m", "v")}
    )
    d = diagnose(judge("optimizer", out, case), out, case)[0]
    assert d.code == "trainable_set_mismatch" and d.evidence["extra"] == ["lm_head.weight"]


def test_a_renamed_module_and_added_biases_are_two_causes():
    """Attention under `attention.*` where the checkpoint says `self_attn.*` (never loaded), and a bias on
    lm_head that the checkpoint has none of: the rename is named with its two names, the bias apart."""
    case = CASES["gqa_padded"]
    out = get_backend("mlx").run(case, ("weight_mapping",))["weight_mapping"]
    rng = np.random.default_rng(0)
    renamed = [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in "qkvo"]
    for k in renamed:
        v = out.tensors.pop(f"weights.{k}")
        out.tensors[f"weights.{k.replace('self_attn', 'attention')}"] = rng.standard_normal(v.shape).astype(np.float32)
    out.tensors["weights.lm_head.bias"] = rng.standard_normal(64).astype(np.float32)
    out.meta["load_report"] = {
        "missing": [k.replace("self_attn", "attention") for k in renamed] + ["lm_head.bias"],
        "unexpected": renamed,
    }
    found = diagnose(judge("weight_mapping", out, case), out, case)
    assert [d.code for d in found] == ["key_mapping", "parameters_not_in_checkpoint"]
    assert (found[0].evidence["port"], found[0].evidence["checkpoint"]) == ("attention", "self_attn")
    assert found[1].evidence["not_in_checkpoint"] == ["lm_head.bias"]


def test_added_biases_and_left_out_norms_are_two_facts_not_a_key_mapping():
    """A port with biases the checkpoint lacks and without Qwen3's q/k norms: no unused tensor has the shape of
    an unfilled parameter, so neither is the other renamed. A same-shaped pair stays a mapping problem."""
    case = CASES["qwen3"]
    out = get_backend("mlx").run(case, ("weight_mapping",))["weight_mapping"]
    norms = [k.removeprefix("weights.") for k in out.tensors if k.endswith(("q_norm.weight", "k_norm.weight"))]
    norm_shape = out.tensors[f"weights.{norms[0]}"].shape
    for k in norms:
        out.tensors.pop(f"weights.{k}")
    hidden = out.tensors["weights.model.norm.weight"].shape[0]
    out.tensors["weights.lm_head.bias"] = np.ones(7 * hidden, np.float32)  # no checkpoint tensor has this shape
    out.meta["load_report"] = {"missing": ["lm_head.bias"], "unexpected": norms}
    found = diagnose(judge("weight_mapping", out, case), out, case)
    assert [d.code for d in found] == ["parameters_not_in_checkpoint", "checkpoint_tensors_unused"]
    assert sorted(found[1].evidence["unused"]) == sorted(norms) and "q_norm.weight" in found[1].summary
    out.tensors["weights.lm_head.bias"] = np.ones(norm_shape, np.float32)  # could be a q_norm under another name
    assert "key_mapping" in [d.code for d in diagnose(judge("weight_mapping", out, case), out, case)]


def test_a_learning_rate_is_placed_on_the_schedule_where_it_matches_a_step():
    """A first update at the warmup's peak (as a port whose step counter runs ahead would take it): the
    summary gives the port's rate and the schedule step that has it."""
    from mlx_parity.harness.backends.mutants import Mutant, MutantBackend

    m = Mutant(
        "lr_at_peak",
        "warmup skipped",
        "optimizer",
        ("clip_accum_warmup",),
        "learning_rate",
        settings=lambda s: dataclasses.replace(s, schedule=dataclasses.replace(s.schedule, warmup_init=s.optimizer.lr)),
    )
    r = audit(MutantBackend(m), CASES["clip_accum_warmup"], ("optimizer",))
    d = r.stages[0].diagnosis
    assert d.code == "learning_rate" and d.evidence["schedule_step_of_port_lr"] == 2
    assert "the schedule's rate at step 2" in d.summary


def test_a_trainable_set_mismatch_states_no_update_cause_where_the_shared_tensors_agree():
    """A head-only port updates the head exactly as the reference: the set is the cause, and no AdamW eps is
    solved from an update that does not differ (the estimator's own bias on a fixture would read as one)."""
    for fixture in ("gqa_single", "small_eps_bias"):
        codes = {f.code for f in audited("mutant:trains_head_only", fixture).findings()[0]}
        assert codes == {"trainable_set_mismatch"}, (fixture, codes)


def test_clipping_missing_is_named_only_where_the_moments_are_the_inverse_of_the_references_clip_factor():
    """Clipped tensor by tensor, each moment is scaled differently: never 'not clipped' (bf16_full, where the
    reference's bfloat16 norm makes the float64 one useless); missing clipping is still named there."""
    per_tensor = {f.code for f in audited("mutant:clipping_per_tensor", "bf16_full").findings()[0]}
    assert "clipping_missing" not in per_tensor and "gradient_scale" not in per_tensor, per_tensor
    assert "clipping_missing" in {f.code for f in audited("mutant:clipping_missing", "bf16_full").findings()[0]}


def test_an_optimizer_that_never_reaches_the_parameters_is_named_by_the_schedule_check():
    """After a warmup from a learning rate of 0 the first update is zero in the reference too, so only the
    N-update check sees that nothing moves (found on random SmolLM2 configurations by `parity calibrate`)."""
    case = CASES["gqa_padded"]
    moved = {k: np.zeros_like(v) for k, v in case.golden.items() if k.startswith("isolated.schedule.delta.")}
    for step, code in ((case.settings.steps, "optimizer_not_connected"), (0, "no_update")):
        out = StageOutput(moved | {"isolated.schedule.step": np.array(step, np.int64)})
        result = judge("isolated_schedule", out, case)
        assert result.status == "fail" and diagnose(result, out, case)[0].code == code


class _WarmupFromZero:
    """A case whose reference's first update is zero, as after a warmup from a learning rate of 0."""

    def __init__(self, case):
        self.source = case
        self.golden = case.golden | {
            k: np.zeros_like(v) for k, v in case.golden.items() if k.startswith("optimizer.delta.")
        }

    def __getattr__(self, name):
        return getattr(self.source, name)


def test_unmoved_parameters_name_no_optimizer_cause_where_the_references_did_not_move_either():
    """Moments off by an upstream gradient difference and no parameter moved: 'not connected' where the reference's
    parameters moved, and no such cause where its first update was zero too (a wrong cause `parity calibrate` found
    stated for forward bugs on SmolLM2 configurations with a warmup from 0)."""
    from mlx_parity.harness.diagnosis.optimizer import optimizer

    case = CASES["gqa_padded"]
    g = case.golden
    out = StageOutput(
        {k: np.zeros_like(v) for k, v in g.items() if k.startswith("optimizer.delta.")}
        | {
            k: (v * np.float32(1.3)).astype(v.dtype)
            for k, v in g.items()
            if k.startswith(("optimizer.m.", "optimizer.v."))
        }
        | {"optimizer.step": np.array(1, np.int64)}
    )
    result = judge("optimizer", out, case)
    assert result.status == "fail"

    def codes(found):
        return {d.code for d in (found if isinstance(found, list) else [found] if found else [])}

    assert "optimizer_not_connected" in codes(optimizer(result, out, case))
    assert not codes(optimizer(result, out, _WarmupFromZero(case))) & {"optimizer_not_connected", "no_update"}
    # no state at all where the reference's moments hold its gradients: the step never ran, even at a rate of 0
    # (a silent fallback on a random SmolLM2 configuration was localised, never named)
    stateless = StageOutput(
        {k: v for k, v in out.tensors.items() if not k.startswith(("optimizer.m.", "optimizer.v."))}
        | {"optimizer.step": np.array(0, np.int64)}
    )
    result = judge("optimizer", stateless, case)
    assert result.status == "fail"
    assert codes(optimizer(result, stateless, _WarmupFromZero(case))) == {"no_update"}


def _float32_adamw(case, m, v, lr_scale=1.0):
    """The contract's first AdamW update in float32 from given moments: Δθ as θ_after − θ."""
    o, f = case.settings.optimizer, np.float32
    out = {}
    for name in m:
        p = case.initial_weights[f"weights.{name}"].astype(f)
        lr = f(o.lr * lr_scale)
        c1, c2 = f(lr / f(1 - f(o.betas[0]))), f(1 / np.sqrt(f(1 - f(o.betas[1]))))
        if not o.bias_correction:
            c1, c2 = lr, f(1)
        after = p * f(1 - lr * f(o.weight_decay)) - c1 * m[name] / (np.sqrt(v[name]) * c2 + f(o.eps))
        out[f"optimizer.delta.{name}"] = (after - p).astype(f)
    return out


def test_an_update_that_its_own_moments_explain_gets_no_update_cause_and_a_learning_rate_off_is_reproduced():
    """Other gradients upstream (moments 1.3× and 0.7×) but the contract's update of them: nothing in the
    update rule to name, although every Δθ differs from the reference's. The same with lr 0.1 % high: the
    learning rate, named because re-computing the update at the solved rate reproduces the port's."""
    from mlx_parity.harness.diagnosis.optimizer import _update

    case = CASES["gqa_padded"]
    g = case.golden
    names = [k.removeprefix("optimizer.m.") for k in g if k.startswith("optimizer.m.")]
    m = {n: (g[f"optimizer.m.{n}"] * np.float32(1.3)).astype(np.float32) for n in names}
    v = {n: (g[f"optimizer.v.{n}"] * np.float32(0.7)).astype(np.float32) for n in names}
    moments = {f"optimizer.m.{n}": m[n] for n in names} | {f"optimizer.v.{n}": v[n] for n in names}
    deltas = [k for k in g if k.startswith("optimizer.delta.")]
    assert _update(_float32_adamw(case, m, v) | moments, g, case, deltas) == []
    (d,) = _update(_float32_adamw(case, m, v, lr_scale=1.001) | moments, g, case, deltas)
    assert d.code == "learning_rate" and d.evidence["from_port_inputs"] and d.evidence["reproduced_to"] <= 1
    assert abs(d.evidence["port_lr"] / case.settings.optimizer.lr - 1.001) < 1e-5


def _float32_schedule(case, eps=None, eps_under=False, wd=None, coupled=False, lr_scale=1.0):
    """The isolated schedule's N updates of the reference's clipped gradients in float32, written here apart
    from the harness: Δθ under one changed AdamW convention."""
    from mlx_parity.reference.schedule import lr_at

    s, o, f = case.settings, case.settings.optimizer, np.float32
    eps, wd = f(o.eps if eps is None else eps), f(o.weight_decay if wd is None else wd)
    b1, b2 = f(o.betas[0]), f(o.betas[1])
    names = [k.removeprefix("isolated.schedule.delta.") for k in case.golden if k.startswith("isolated.schedule.")]
    grads = {n: case.golden[f"grad.{n}"].astype(f) for n in names if f"grad.{n}" in case.golden}
    norm = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
    scale = f(min(1.0, s.clip_norm / norm)) if s.clip_norm else f(1)
    out = {}
    for n, g in grads.items():
        p0 = case.initial_weights[f"weights.{n}"].astype(f)
        p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
        for k in range(1, s.steps + 1):
            lr = f(lr_at(o, s.schedule, k - 1) * lr_scale)
            gk = g * scale + wd * p if coupled else g * scale
            m, v = b1 * m + (1 - b1) * gk, b2 * v + (1 - b2) * gk * gk
            mh, vh = m / (1 - b1**k), v / (1 - b2**k)
            root = np.sqrt(vh + eps) if eps_under else np.sqrt(vh) + eps
            p = p * (1 - lr * (f(0) if coupled else wd)) - lr * mh / root
        out[f"isolated.schedule.delta.{n}"] = (p - p0).astype(f)
    return out | {"isolated.schedule.step": np.array(s.steps, np.int64)}


def test_n_update_conventions_are_named_where_replaying_them_reproduces_the_port():
    """No weight decay, decay coupled into the gradient, eps 10× or under the square root, a learning rate
    0.1 % high: each named from the N-update check alone (after a warmup from 0 the one-update check sees a
    zero update, so on random SmolLM2 configurations these were localised, never named). The contract's
    own conventions in float32 pass, so nothing is named from noise."""
    case = CASES["small_eps_bias"]
    assert judge("isolated_schedule", StageOutput(_float32_schedule(case)), case).status == "pass"
    # the port's one-update moments, as the audit hands them on: the gradient its optimizer saw is the reference's
    moments = {k: v for k, v in case.golden.items() if k.startswith(("isolated.optimizer.m.", "isolated.optimizer.v."))}
    for change, code in (
        ({"wd": 0.0}, "weight_decay_missing"),
        ({"coupled": True}, "weight_decay_coupled"),
        ({"eps": 1e-7}, "adam_eps"),
        ({"eps_under": True}, "adam_eps_placement"),
        ({"lr_scale": 1.001}, "learning_rate"),
    ):
        # coupled decay moves the moments by wd·θ: that port reports none here
        out = StageOutput(_float32_schedule(case, **change) | ({} if "coupled" in change else moments))
        result = judge("isolated_schedule", out, case)
        assert result.status == "fail", change
        found = diagnose(result, out, case)
        assert [d.code for d in found] == [code], (change, [(d.code, d.evidence) for d in found])
        assert found[0].evidence["reproduced_to"] <= 1
    # without its moments another eps is a gradient scale as well (Adam's update of s·g with eps is g's with
    # eps/s: a clipping missing read as an eps on a random SmolLM2 configuration), so neither is named
    out = StageOutput(_float32_schedule(case, eps=1e-7))
    assert [d.code for d in diagnose(judge("isolated_schedule", out, case), out, case)] == ["unexplained"]
    # and a gradient scaled before the optimizer, which its moments show, is no update convention
    scaled = {
        k: (v * np.float32(0.5)).astype(v.dtype) if ".m." in k else (v * np.float32(0.25)).astype(v.dtype)
        for k, v in moments.items()
    }
    out = StageOutput(_float32_schedule(case, eps=2e-8) | scaled)
    assert [d.code for d in diagnose(judge("isolated_schedule", out, case), out, case)] == ["unexplained"]
    # one tensor's update 1 % off: no convention reproduces it, so none is named
    out = _float32_schedule(case)
    name = "isolated.schedule.delta.model.layers.0.mlp.up_proj.weight"
    out[name] = out[name] * np.float32(1.01)
    result = judge("isolated_schedule", StageOutput(out), case)
    assert result.status == "fail"
    assert [d.code for d in diagnose(result, StageOutput(out), case)] == ["unexplained"]


class _Betas:
    """A case whose AdamW has other betas, its first update's goldens made here in float32 from its gradients."""

    def __init__(self, case, betas):
        o = dataclasses.replace(case.settings.optimizer, betas=betas)
        self.source, self.settings = case, dataclasses.replace(case.settings, optimizer=o)
        names = [k.removeprefix("optimizer.m.") for k in case.golden if k.startswith("optimizer.m.")]
        f, (b1, b2) = np.float32, betas
        m = {n: (f(1 - b1) * case.golden[f"grad.{n}"]).astype(f) for n in names}
        v = {n: (f(1 - b2) * case.golden[f"grad.{n}"] ** 2).astype(f) for n in names}
        self.moments = {f"optimizer.m.{n}": m[n] for n in names} | {f"optimizer.v.{n}": v[n] for n in names}
        self.golden = case.golden | self.moments | _float32_adamw(self, m, v)

    def __getattr__(self, name):
        return getattr(self.source, name)


def test_a_bias_correction_flip_that_equals_an_eps_change_names_neither_at_the_first_update():
    """With β2 = 1 − (1−β1)² (0.9 and 0.99) the first update without bias correction is the corrected one with
    eps 10× larger: the numbers cannot tell them apart, so neither is named there (a random SmolLM2
    configuration named AdamW eps for a flipped bias correction); the N-update check does, where they differ.
    Where the betas make the flip a scale as well (0.9 and 0.999), it is still named."""
    from mlx_parity.harness.diagnosis.optimizer import _update

    for betas, expected in (((0.9, 0.99), []), ((0.9, 0.999), ["bias_correction"])):
        case = _Betas(CASES["gqa_padded"], betas)
        uncorrected = _Betas(CASES["gqa_padded"], betas)
        uncorrected.settings = dataclasses.replace(
            case.settings, optimizer=dataclasses.replace(case.settings.optimizer, bias_correction=False)
        )
        names = [k.removeprefix("optimizer.m.") for k in case.moments if k.startswith("optimizer.m.")]
        m = {n: case.moments[f"optimizer.m.{n}"] for n in names}
        v = {n: case.moments[f"optimizer.v.{n}"] for n in names}
        deltas = [k for k in case.golden if k.startswith("optimizer.delta.")]
        port = _float32_adamw(uncorrected, m, v) | case.moments
        assert not all(np.allclose(port[k], case.golden[k], rtol=1e-3, atol=0) for k in deltas), betas
        assert [d.code for d in _update(port, case.golden, case, deltas)] == expected, betas
