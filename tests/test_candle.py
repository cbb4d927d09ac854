"""The candle port (rust/parity-candle) through its adapter binary: a second Rust port on another framework's
kernels and autograd, written from docs/training-step.md. Every stage passes on every fixture trained in
float32; the bfloat16-trained fixtures fail with the port's own reason and nothing else; each injected porting
bug is named. Skipped only where no Rust toolchain exists; where one does, the binary must be built (the
README's test command builds it)."""

import pytest

from mlx_parity.harness.backends.candle import CANDLE_BINARY, CANDLE_INJECTIONS

from .conftest import CASES, audited, skip_without_cargo

skip_without_cargo("the candle port")


@pytest.fixture(scope="module", autouse=True)
def built():
    assert CANDLE_BINARY.exists(), f"cargo exists but {CANDLE_BINARY} is not built: run `make rust`"


FLOAT32 = sorted(n for n, c in CASES.items() if c.settings.precision == "float32")
BFLOAT16 = sorted(n for n, c in CASES.items() if c.settings.precision == "bfloat16")


@pytest.mark.parametrize("fixture", FLOAT32)
def test_every_stage_passes_on_a_float32_fixture(fixture):
    result = audited("candle-bin", fixture)
    failing = [f"{s.name}: {s.message}" for s in result.stages if s.status != "pass"]
    assert not failing, failing


@pytest.mark.parametrize("fixture", BFLOAT16)
def test_bfloat16_training_fails_with_the_port_s_reason_and_no_other_cause(fixture):
    result = audited("candle-bin", fixture)
    assert result.verdict == "fail"
    found, _ = result.findings()
    assert found and all(f.code == "error" and "float32 only" in f.summary for f in found), found


@pytest.mark.parametrize("inject", sorted(CANDLE_INJECTIONS))
def test_an_injected_bug_is_named(inject):
    stage, code, fixture = CANDLE_INJECTIONS[inject]
    found, _ = audited(f"candle-bin:{inject}", fixture).findings()
    assert (stage, code) in [(f.stage, f.code) for f in found], found
