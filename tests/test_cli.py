"""The `parity` command: exit codes, JSON, the table, and `parity train` on its embedded default."""

import json
import re
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from mlx_parity.harness.case import FIXTURES_DIR
from mlx_parity.harness.cli import app
from mlx_parity.reference.train_cli import run_training

runner = CliRunner()


def test_audit_json_has_the_documented_keys(tmp_path):
    out = tmp_path / "out.json"
    r = runner.invoke(app, ["audit", "--fixture", "head", "--backend", "mlx", "--backend", "torch", "--json", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert [(x["fixture"], x["backend"], x["verdict"]) for x in data["results"]] == [
        ("head", "mlx", "pass"),
        ("head", "torch", "pass"),
    ]
    stages = data["results"][0]["stages"]
    assert [s["name"] for s in stages] == [
        "weight_mapping",
        "forward",
        "shifted_slices",
        "loss",
        "gradients",
        "optimizer",
        "trajectory",
        "checkpoint",
        "isolated_forward",
        "isolated_loss",
        "isolated_optimizer",
        "isolated_schedule",
    ]
    assert all(s["status"] == "pass" and s["tolerance"] and s["tensors"] for s in stages)
    t = stages[1]["tensors"][0]
    assert {"name", "max_abs", "max_rel", "where", "mismatched", "tolerance"} <= set(t)
    assert "2/2 audits passed" in r.output


def test_audit_exit_1_names_the_failure(tmp_path):
    r = runner.invoke(app, ["audit", "-f", "gqa_padded", "-b", "mutant:no_shift"])
    assert r.exit_code == 1
    assert "stage shifted_slices" in r.output and "shifted.mask: shape (4, 16), expected (4, 15)" in r.output


def test_audit_exit_2_for_bad_input():
    assert runner.invoke(app, ["audit", "-f", "nope"]).exit_code == 2
    assert runner.invoke(app, ["audit", "-b", "jax"]).exit_code == 2
    r = runner.invoke(app, ["audit", "-f", "head", "-s", "everything"])
    assert r.exit_code == 2 and "unknown stage" in r.output


def test_audit_fails_on_a_tampered_golden(tmp_path):
    root = tmp_path / "fx"
    shutil.copytree(FIXTURES_DIR / "head", root / "head")
    from safetensors.numpy import load_file, save_file

    g = load_file(str(root / "head" / "golden.safetensors"))
    g["loss.ce"] = np.array(g["loss.ce"] + 0.01, dtype=np.float32)
    save_file(g, str(root / "head" / "golden.safetensors"))
    r = runner.invoke(app, ["audit", "--fixtures-dir", str(root), "-b", "mlx"])
    assert r.exit_code == 1 and "loss.ce" in r.output


def test_train_default_loss_falls(tmp_path):
    first, last = run_training(
        checkpoint=None,
        data=None,
        out=tmp_path / "run",
        settings_path=None,
        steps=12,
        batch_size=8,
        seq_len=48,
        save_every=6,
        resume=None,
        seed=0,
        console=__import__("rich").console.Console(quiet=True),
    )
    assert last < first - 0.5
    assert (tmp_path / "run" / "step-000006" / "optimizer.safetensors").exists()
    # resuming continues the same run: updates 7..12 from the step-6 checkpoint equal the uninterrupted ones
    _, resumed_last = run_training(
        checkpoint=None,
        data=None,
        out=tmp_path / "run2",
        settings_path=None,
        steps=12,
        batch_size=8,
        seq_len=48,
        save_every=100,
        resume=tmp_path / "run" / "step-000006",
        seed=0,
        console=__import__("rich").console.Console(quiet=True),
    )
    assert resumed_last == last


def test_train_refuses_a_non_empty_output(tmp_path):
    (tmp_path / "x").write_text("keep me")
    r = runner.invoke(app, ["train", "--out", str(tmp_path), "--steps", "1"])
    assert r.exit_code == 2 and "not empty" in r.output
    assert (tmp_path / "x").read_text() == "keep me"


def test_train_rejects_bad_data_with_its_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(
        '{"text": "ok", "auth_weight": 0.5, "prov_entropy": 1}\n{"text": "bad", "auth_weight": 1.5, "prov_entropy": 1}\n'
    )
    r = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "o"), "--steps", "1"])
    assert r.exit_code == 2 and "d.jsonl:2" in r.output and "auth_weight 1.5" in r.output


def _copy(tmp_path, name="head", manifest=False):
    root = tmp_path / "fx"
    shutil.copytree(FIXTURES_DIR / name, root / name)
    if manifest:
        shutil.copy(FIXTURES_DIR / "manifest.json", root / "manifest.json")
    return root


def test_audit_refuses_a_golden_with_nan(tmp_path):
    from safetensors.numpy import load_file, save_file

    root = _copy(tmp_path)
    f = root / "head" / "golden.safetensors"
    g = load_file(str(f))
    g["forward.logits"][0, 0, 0] = np.nan
    save_file(g, str(f))
    r = runner.invoke(app, ["audit", "--fixtures-dir", str(root), "-b", "mlx"])
    assert r.exit_code == 2, r.output
    assert "non-finite values in forward.logits" in r.output


def test_audit_refuses_a_truncated_golden_in_one_line(tmp_path):
    root = _copy(tmp_path)
    f = root / "head" / "golden.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    r = runner.invoke(app, ["audit", "--fixtures-dir", str(root), "-b", "mlx"])
    assert r.exit_code == 2, r.output
    assert "not a readable safetensors file" in r.output and "Traceback" not in r.output


def test_audit_checks_hashes_against_the_manifest(tmp_path):
    root = _copy(tmp_path, manifest=True)
    (root / "head" / "settings.json").write_text((root / "head" / "settings.json").read_text() + " ")
    r = runner.invoke(app, ["audit", "--fixtures-dir", str(root), "-f", "head", "-b", "mlx"])
    assert r.exit_code == 2 and "head/settings.json: sha256" in r.output


def test_audit_says_when_it_cannot_check_hashes(tmp_path):
    r = runner.invoke(app, ["audit", "--fixtures-dir", str(_copy(tmp_path)), "-b", "mlx", "-s", "loss"])
    assert r.exit_code == 0 and "fixture files are not hash-checked" in r.output


def test_audit_of_a_named_backend_that_cannot_run_exits_2():
    r = runner.invoke(app, ["audit", "-f", "head", "-b", "cmd:/nonexistent/adapter"])
    assert r.exit_code == 2 and "cannot run" in r.output and "/nonexistent/adapter" in r.output


def test_audit_table_shows_the_margin():
    r = runner.invoke(app, ["audit", "-f", "head", "-b", "torch", "-s", "loss"])
    assert r.exit_code == 0
    assert re.search(r"pass 0\.\d\d", r.output), r.output
    assert "largest error / bound" in r.output


def test_text_in_square_brackets_is_printed_as_is():
    from rich.console import Console

    from mlx_parity.harness.audit import AuditResult, StageResult
    from mlx_parity.harness.diagnosis import Diagnosis
    from mlx_parity.harness.report import print_results

    console = Console(record=True, width=200)
    stage = StageResult(
        "weight_mapping",
        "fail",
        message="missing: [model.norm.weight]",
        diagnosis=Diagnosis("unexplained", "keys [a] and [b]", {"missing": ["lm_head.weight"]}),
    )
    print_results(console, [AuditResult("head", "cmd:port [v2]", [stage])])
    text = console.export_text()
    assert "missing: [model.norm.weight]" in text and "keys [a] and [b]" in text
    assert "missing = [lm_head.weight]" in text and "cmd:port [v2]" in text


def test_train_reads_text_with_the_checkpoints_tokenizer_or_says_it_cannot(tmp_path):
    from rich.console import Console
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from mlx_parity.reference.data import FileTokenizer, make_batch, tokenizer_for

    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURES_DIR / "head" / "checkpoint", ckpt)
    quiet = Console(quiet=True)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        run_training(
            checkpoint=ckpt,
            data=None,
            out=tmp_path / "a",
            settings_path=None,
            steps=1,
            batch_size=2,
            seq_len=8,
            save_every=1,
            resume=None,
            seed=0,
            console=quiet,
        )
    assert not (tmp_path / "a").exists()  # refused before anything was written
    words = {"[UNK]": 5, "the": 6, "cat": 7}
    tok = Tokenizer(WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(ckpt / "tokenizer.json"))
    t = tokenizer_for(ckpt)
    assert isinstance(t, FileTokenizer)
    batch = make_batch([{"text": "the cat sat", "auth_weight": 0.5, "prov_entropy": 1.0}], 5, t)
    assert batch["input_ids"][0, :3].tolist() == [6, 7, 5] and batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0]]
    run_training(
        checkpoint=ckpt,
        data=None,
        out=tmp_path / "b",
        settings_path=None,
        steps=1,
        batch_size=2,
        seq_len=8,
        save_every=1,
        resume=None,
        seed=0,
        console=quiet,
    )
    saved = tmp_path / "b" / "step-000001"
    assert (saved / "tokenizer.json").exists() and isinstance(tokenizer_for(saved), FileTokenizer)
