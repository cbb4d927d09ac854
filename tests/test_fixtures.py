"""Fixtures: hashes match the manifest, regeneration reproduces them, tampering and overwrites are caught."""

import json
import shutil

import pytest

from harness.case import FIXTURES_DIR
from harness.fixtures import FixtureError, generate, verify


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
    assert total < 16 * 2**20, f"{total / 2**20:.1f} MB of fixtures"


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


def test_changed_goldens_are_not_overwritten_without_force(copy):
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
