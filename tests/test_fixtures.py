"""Fixtures: hashes match the manifest, regeneration reproduces them, tampering and overwrites are caught."""

import json
import shutil

import numpy as np
import pytest

from mlx_parity.harness.case import FIXTURES_DIR
from mlx_parity.harness.errors import FixtureError
from mlx_parity.harness.fixtures import build
from mlx_parity.harness.fixtures.build import diff_fixture, generate, verify
from mlx_parity.harness.fixtures.manifest import fixture_files, sha256


def test_manifest_hashes_match():
    assert verify(FIXTURES_DIR, regenerate=False) == []


def test_manifest_records_versions_seeds_tolerances():
    m = json.loads((FIXTURES_DIR / "manifest.json").read_text())
    assert m["versions"]["mlx"] == "0.32.2"
    assert {"torch", "transformers", "numpy", "safetensors", "python"} <= set(m["versions"])
    assert "float32/forward" in m["tolerances"]
    for name, entry in m["fixtures"].items():
        assert isinstance(entry["seed"], int) and entry["exposes"], name
        assert "golden.safetensors" in entry["files"] and "checkpoint/config.json" in entry["files"]


def test_fixtures_are_small():
    total = sum(f.stat().st_size for f in FIXTURES_DIR.rglob("*") if f.is_file())
    # 17 fixtures (49.9 MiB): goldens, float64 truth, isolated checks (the forward's pieces: ~0.6 MB each), and
    # the spread (one byte per judged element, 4.9 MiB); every call to the lent GPU machine carries them, within
    # its 64 MiB (scripts/gpu/setup.sh packs its wheels in parts for the room left), so that room is watched too
    assert total < 51 * 2**20, f"{total / 2**20:.1f} MiB of fixtures"


def test_regeneration_reproduces_the_goldens():
    assert verify(FIXTURES_DIR, regenerate=True) == []


@pytest.fixture
def copy(tmp_path):
    root = tmp_path / "fixtures"
    shutil.copytree(FIXTURES_DIR, root)
    return root


def test_tampered_golden_is_detected(copy):
    f = copy / "head" / "golden.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    problems = verify(copy, regenerate=False)
    assert any("head/golden.safetensors: sha256" in p for p in problems)


def test_extra_and_missing_files_are_detected(copy):
    (copy / "head" / "notes.txt").write_text("x")
    (copy / "lora" / "lora_init.safetensors").unlink()
    problems = verify(copy, regenerate=False)
    assert "head/notes.txt: not in the manifest" in problems
    assert "lora/lora_init.safetensors: missing" in problems


def test_changed_goldens_are_not_overwritten_without_force(copy, built_once, monkeypatch):
    monkeypatch.setattr(build, "build_fixture", built_once)
    f = copy / "head" / "golden.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    tampered = f.read_bytes()
    with pytest.raises(FixtureError, match="head would change:\n  ~ golden.safetensors: 1 tensors differ"):
        generate(copy, ["head"])
    assert f.read_bytes() == tampered, "a refused regeneration changed the file"
    messages = generate(copy, ["head"], force=True)
    assert messages[0].startswith("head: replaced (--force)") and "golden.safetensors" in messages[0]
    assert verify(copy, regenerate=False) == []


def _shift_golden(folder, name, delta):
    """Another platform's regeneration: the golden moved by `delta`, the truth (golden + offset) not."""
    from safetensors.numpy import load_file, save_file

    g, t = load_file(str(folder / "golden.safetensors")), load_file(str(folder / "truth.safetensors"))
    g[name] = (g[name].astype(np.float64) + delta).astype(np.float32)
    t[f"offset.{name}"] = (t[f"offset.{name}"].astype(np.float64) - delta).astype(np.float32)
    save_file(g, str(folder / "golden.safetensors"))
    save_file(t, str(folder / "truth.safetensors"), metadata=_truth_metadata(folder))


def _truth_metadata(folder):
    from safetensors import safe_open

    with safe_open(str(folder / "truth.safetensors"), "np") as f:
        return f.metadata()


def test_goldens_from_another_platform_are_judged_not_hashed(tmp_path):
    """Where the platform differs from the manifest's, regenerated goldens pass when they are within the
    bound of the stored truth (another CPU's rounding) and fail when they are not (a real change)."""
    old, near, far = tmp_path / "old", tmp_path / "near", tmp_path / "far"
    for d in (old, near, far):
        shutil.copytree(FIXTURES_DIR / "head", d)
    name = "forward.logits"
    _shift_golden(near, name, 2.0**-23 * np.sign(np.arange(4 * 16 * 96).reshape(4, 16, 96) % 3 - 1))
    _shift_golden(far, name, 1e-3)
    assert diff_fixture(old, near, same_platform=False) == []
    assert diff_fixture(old, near, same_platform=True), "on the same platform any changed bit counts"
    assert any("forward outside the bound" in line for line in diff_fixture(old, far, same_platform=False))


def test_spreads_are_measured_not_compared_but_their_layout_is(tmp_path):
    """A regenerated spread is another sample of the noise: its values may differ anywhere, but a spread
    that is missing, drawn by other runs (the truth file's metadata says which) or stored in another layout is a
    change."""
    from safetensors.numpy import load_file, save_file

    old, values, layout, drawn = (tmp_path / d for d in ("old", "values", "layout", "drawn"))
    for d in (old, values, layout, drawn):
        shutil.copytree(FIXTURES_DIR / "head", d)
    meta = _truth_metadata(old)
    assert meta["spread"].endswith(
        "float64 twin runs under random rounding of forward, loss, gradients, isolated_forward, isolated_loss, "
        "optimizer, trajectory, isolated_optimizer, isolated_schedule: 4"
    )
    t = load_file(str(values / "truth.safetensors"))
    name = next(k for k in t if k.startswith("spread."))
    save_file(t, str(drawn / "truth.safetensors"), metadata={"spread": "reference runs on inputs moved by an ulp: 4"})
    t[name] = (t[name] // 2).astype(t[name].dtype)
    save_file(t, str(values / "truth.safetensors"), metadata=meta)
    t[name] = t[name].astype(np.uint16)
    save_file(t, str(layout / "truth.safetensors"), metadata=meta)
    assert diff_fixture(old, values, same_platform=False) == []
    for changed in (layout, drawn):
        assert any("drawn otherwise or stored in another layout" in line for line in diff_fixture(old, changed, False))


def test_a_killed_generate_leaves_the_old_set(copy, built_once, monkeypatch):
    """generate --force builds the whole set in a staging copy: killed half way, nothing has changed."""
    before = fixture_files(copy)
    before["manifest.json"] = sha256(copy / "manifest.json")
    real, calls = built_once, []

    def dies_on_the_second(spec, out):
        calls.append(spec.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(spec, out)
        (out / "settings.json").write_text((out / "settings.json").read_text() + " ")  # a changed fixture

    monkeypatch.setattr(build, "build_fixture", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        generate(copy, ["head", "gqa_single"], force=True)  # built in this order; head is built once already
    after = fixture_files(copy)
    after["manifest.json"] = sha256(copy / "manifest.json")
    assert after == before
    assert verify(copy, regenerate=False) == []


def test_fixtures_vary_every_convention_a_port_could_hard_code():
    """A port that hard-codes MLX's or transformers' defaults must fail some fixture: each convention
    takes more than one value across the bundled set."""
    from mlx_parity.harness.case import list_cases

    seen = {
        k: set()
        for k in (
            "rope_theta",
            "head_dim_is_hidden_over_heads",
            "rms_norm_eps",
            "lambda",
            "alpha",
            "bias_correction",
            "layout",
            "gqa_batch_size",
            "accum_with_padding",
        )
    }
    for case in list_cases():
        cfg = json.loads((case.checkpoint / "config.json").read_text())
        rope = cfg.get("rope_parameters") or {}
        seen["rope_theta"].add(rope.get("rope_theta", cfg.get("rope_theta")))
        seen["head_dim_is_hidden_over_heads"].add(cfg["head_dim"] == cfg["hidden_size"] // cfg["num_attention_heads"])
        seen["rms_norm_eps"].add(cfg["rms_norm_eps"])
        seen["layout"].add("rope_parameters" in cfg)
        s = case.settings
        seen["lambda"].add(s.loss.lam)
        seen["alpha"].add(s.loss.alpha)
        seen["bias_correction"].add(s.optimizer.bias_correction)
        if cfg["num_key_value_heads"] < cfg["num_attention_heads"]:
            seen["gqa_batch_size"].add(min(len(case.batch["input_ids"]), 2))
        seen["accum_with_padding"].add(s.accum_steps > 1 and bool((case.batch["attention_mask"] == 0).any()))
    assert all(len(v) > 1 for v in seen.values()), {k: v for k, v in seen.items() if len(v) < 2}
    assert {1, 2} <= seen["gqa_batch_size"] and True in seen["accum_with_padding"]
