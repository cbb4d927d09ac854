"""`parity fixtures create`: a fixture from a user's checkpoint (its first layers, a renumbered slice of its
vocabulary, text through its own tokenizer), written only when every framework agrees, hashed into its
folder's own manifest and audited from there; what it cannot do is refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from mlx_parity.harness.cli import app
from mlx_parity.harness.errors import CaseError, FixtureError
from mlx_parity.harness.fixtures.create import create
from mlx_parity.harness.fixtures.manifest import MANIFEST, check_hashes

from .conftest import CASES

runner = CliRunner()
WORDS = ["the", "cell", "makes", "energy", "paris", "is", "a", "city", "rust", "fast", "safe", "and", "moon"]


def checkpoint_with_tokenizer(tmp_path, fixture="qwen2"):
    """A bundled checkpoint plus a word-level tokenizer.json over its vocabulary (built offline with `tokenizers`)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    src = tmp_path / "src"
    shutil.copytree(CASES[fixture].checkpoint, src)
    vocab = {"<unk>": 0} | {w: 7 * (i + 1) for i, w in enumerate(WORDS)}  # spread over the 96 ids
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(src / "tokenizer.json"))
    return src


def test_text_through_the_tokenizer_and_a_renumbered_vocabulary(tmp_path):
    src = checkpoint_with_tokenizer(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text("the cell makes energy\nparis is a city\nrust is fast and safe\n")
    r = runner.invoke(
        app,
        [
            "fixtures",
            "create",
            "mine",
            "--checkpoint",
            str(src),
            "--fixtures-dir",
            str(tmp_path / "fx"),
            "--layers",
            "1",
            "--vocab",
            "20",
            "--text",
            str(text),
            "--batch-size",
            "3",
            "--seq-len",
            "6",
        ],
    )
    assert r.exit_code == 0, r.output
    path = tmp_path / "fx" / "mine"
    cfg = json.loads((path / "checkpoint" / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["vocab_size"], cfg["model_type"]) == (1, 20, "qwen2")
    source = json.loads((path / "case.json").read_text())["source"]
    kept = np.array(source["kept_token_ids"])
    # every word of the text is kept, under its rank among the kept ids
    words = [7 * (WORDS.index(w) + 1) for w in "the cell makes energy".split()]
    batch = load_file(str(path / "batch.safetensors"))
    assert list(kept[batch["input_ids"][0, :4]]) == words and batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0]
    stored = load_file(str(path / "checkpoint" / "model.safetensors"))
    original = load_file(str(src / "model.safetensors"))
    assert np.array_equal(stored["model.embed_tokens.weight"], original["model.embed_tokens.weight"][kept])
    assert not any(k.startswith("model.layers.1.") for k in stored)
    assert np.array_equal(
        stored["model.layers.0.self_attn.q_proj.bias"], original["model.layers.0.self_attn.q_proj.bias"]
    )
    assert not (path / "checkpoint" / "tokenizer.json").exists()  # renumbered ids are not the tokenizer's any more
    assert check_hashes(tmp_path / "fx") == []
    r = runner.invoke(app, ["audit", "--fixtures-dir", str(tmp_path / "fx"), "-b", "mlx", "-b", "torch"])
    assert r.exit_code == 0, r.output


def test_token_ids_a_bfloat16_copy_and_a_second_fixture_in_the_same_manifest(tmp_path):
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([[5, 9, 3, 70, 12], [1, 2, 3]]))
    fx = tmp_path / "fx"
    create(
        "one", CASES["mha_sharded"].checkpoint, fx, layers=1, token_ids=ids, batch_size=2, seq_len=5, dtype="bfloat16"
    )
    create(
        "two",
        CASES["tied"].checkpoint,
        fx,
        token_ids=ids,
        batch_size=2,
        seq_len=5,
        settings=_settings(tmp_path, {"trainable": "head", "steps": 2}),
    )
    manifest = json.loads((fx / MANIFEST).read_text())
    assert sorted(manifest["fixtures"]) == ["one", "two"] and check_hashes(fx) == []
    assert json.loads((fx / "one" / "checkpoint" / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((fx / "two" / "settings.json").read_text())["trainable"] == "head"
    (fx / "two" / "batch.safetensors").write_bytes(b"tampered")
    assert any("two/batch.safetensors" in p for p in check_hashes(fx))


def _settings(tmp_path, d):
    f = tmp_path / "settings.json"
    f.write_text(json.dumps(d))
    return f


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"vocab": 2}, "distinct tokens"),
        ({"layers": 9}, "has 2 layers"),
        ({"dtype": "float8"}, "--dtype float8"),
        ({"text": None, "token_ids": None}, "exactly one of --text"),
        ({"settings": {"trainable": "everything"}}, "settings"),
    ],
)
def test_what_cannot_be_built_is_refused_by_name(tmp_path, kwargs, message):
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([[5, 9, 3], [1, 2, 3]]))
    args = {"token_ids": ids, "batch_size": 2, "seq_len": 3} | kwargs
    if isinstance(args.get("settings"), dict):
        args["settings"] = _settings(tmp_path, args["settings"])
    with pytest.raises(FixtureError, match=message):
        create("x", CASES["gqa_padded"].checkpoint, tmp_path / "fx", **args)
    assert not (tmp_path / "fx" / "x").exists()


def test_a_checkpoint_without_a_tokenizer_needs_token_ids_and_an_unknown_family_is_refused(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("a b c\nd e f\n")
    with pytest.raises(FixtureError, match="tokenizer.json.*--token-ids"):
        create("x", CASES["gqa_padded"].checkpoint, tmp_path / "fx", text=text, batch_size=2)
    src = tmp_path / "gemma"
    shutil.copytree(CASES["gqa_padded"].checkpoint, src)
    cfg = json.loads((src / "config.json").read_text()) | {"model_type": "gemma"}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FixtureError, match="model_type 'gemma'"):
        create("x", src, tmp_path / "fx", text=text, batch_size=2)


def test_the_bundled_folder_and_an_existing_fixture_are_not_overwritten(tmp_path):
    from mlx_parity.harness.case import FIXTURES_DIR

    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([[5, 9, 3], [1, 2, 3]]))
    with pytest.raises(FixtureError, match="parity fixtures generate"):
        create("x", CASES["gqa_padded"].checkpoint, FIXTURES_DIR, token_ids=ids, batch_size=2)
    (tmp_path / "fx" / "x").mkdir(parents=True)
    with pytest.raises(FixtureError, match="--force"):
        create("x", CASES["gqa_padded"].checkpoint, tmp_path / "fx", token_ids=ids, batch_size=2)


def test_audit_on_goldens_computed_now_from_a_checkpoint(tmp_path):
    """`parity audit --checkpoint --data`: the goldens and truth are built for the audit and kept nowhere; a
    correct backend passes and a buggy port fails, named."""
    import tempfile

    src = checkpoint_with_tokenizer(tmp_path, "mistral")
    text = tmp_path / "text.txt"
    text.write_text("the cell makes energy and\nparis is a city\n")
    before = set(Path(tempfile.gettempdir()).glob("parity-live-*"))
    args = ["audit", "--checkpoint", str(src), "--data", str(text), "--layers", "1"]
    r = runner.invoke(app, args + ["-b", "mlx", "-b", "torch", "-b", "mutant:no_shift"])  # one case built for all
    assert r.exit_code == 1 and "2/3 audits passed" in r.output and "labels_not_shifted" in r.output, r.output
    bf16 = _settings(tmp_path, {"precision": "bfloat16", "trainable": "full"})
    r = runner.invoke(
        app, args + ["--settings", str(bf16), "-b", "mlx", "-b", "torch", "-b", "mutant:float32_where_bfloat16"]
    )
    assert r.exit_code == 1 and "2/3 audits passed" in r.output and "precision_mismatch" in r.output, r.output
    assert set(Path(tempfile.gettempdir()).glob("parity-live-*")) == before  # nothing kept
    r = runner.invoke(app, ["audit", "--checkpoint", str(src), "-b", "mlx"])
    assert r.exit_code == 2 and "--data" in r.output


def test_a_live_audit_of_a_whole_checkpoint_links_it_and_runs_only_the_transformers_check(tmp_path):
    """With nothing cut, the live case links the user's checkpoint (a real model is not copied) and measures
    transformers' forward, said as it goes; the backends are judged by the audit itself, not audited twice."""
    from mlx_parity.harness.fixtures.create import live_case

    src = checkpoint_with_tokenizer(tmp_path, "mistral")
    text = tmp_path / "text.txt"
    text.write_text("the cell makes energy and\nparis is a city\n")
    said = []
    with live_case(src, text=text, progress=said.append) as case:
        assert (case.path / "checkpoint").is_symlink() and case.checkpoint.resolve() == src.resolve()
        margins = json.loads((case.path / "agreement.json").read_text())["margins"]
        assert set(margins) == {"transformers"} and margins["transformers"]["forward"] <= 1
        assert case.golden and case.truth
    assert any(s.startswith("transformers' forward against the float64 truth: margin") for s in said), said
    assert (src / "model.safetensors").exists()  # the link is gone with the case, the checkpoint is not


def test_a_linked_fixture_keeps_its_weights_out_and_refuses_a_changed_source(tmp_path, monkeypatch):
    """--link-checkpoint: the fixture holds the cut's recipe and hashes, not its weights; the cut is made again
    from the source into the cache and audited; a moved or altered source is refused by name."""
    from mlx_parity.harness.case import Case

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src = tmp_path / "src"
    shutil.copytree(CASES["gqa_padded"].checkpoint, src)
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([[5, 9, 3, 70, 12], [1, 2, 3, 4]]))
    fx = tmp_path / "fx"
    path = create(
        "linked", src, fx, layers=1, vocab=40, token_ids=ids, batch_size=2, seq_len=5, dtype="bfloat16", link=True
    )
    assert not (path / "checkpoint").exists() and (path / "checkpoint.json").exists()
    assert check_hashes(fx) == []
    shutil.rmtree(tmp_path / "cache")  # the cut is made again from the source when audited
    r = runner.invoke(app, ["audit", "--fixtures-dir", str(fx), "-b", "mlx", "-b", "torch"])
    assert r.exit_code == 0, r.output
    cut = Case(path).checkpoint
    assert json.loads((cut / "config.json").read_text())["num_hidden_layers"] == 1
    shutil.rmtree(cut)
    weights = load_file(str(src / "model.safetensors"))
    weights["model.layers.0.mlp.up_proj.weight"][0, 0] += 0.5
    from safetensors.numpy import save_file

    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CaseError, match="not the one the fixture was built on.*mlp.up_proj"):
        _ = Case(path).checkpoint
    shutil.rmtree(src)
    with pytest.raises(CaseError, match="which is not there"):
        _ = Case(path).checkpoint
