"""The mlx-rs port through its Rust adapter binary (rust/parity-mlx-rs/src/bin, on the parity-adapter
kit): the protocol as a Rust port author runs it. Every stage on every fixture, the injected bugs
named, and the answers the kit writes accepted by the harness's client and its schemas. Skipped only
where no Rust toolchain exists; where one does, the binary must be built (the README's test command
builds it)."""

import pytest

from mlx_parity.harness.backends.mlx_rs import ADAPTER_BINARY, RUST_INJECTIONS
from mlx_parity.harness.protocol.client import read_response, set_stages, write_request

from .conftest import CASES, audited, skip_without_cargo

skip_without_cargo("the Rust adapter")


@pytest.fixture(scope="module", autouse=True)
def built():
    assert ADAPTER_BINARY.exists(), f"cargo exists but {ADAPTER_BINARY} is not built: run `make rust`"


@pytest.mark.parametrize("fixture", sorted(CASES))
def test_every_stage_passes_through_the_binary(fixture):
    result = audited("mlx-rs-bin", fixture)
    failing = [f"{s.name}: {s.message}" for s in result.stages if s.status != "pass"]
    assert not failing, failing


@pytest.mark.parametrize("inject", sorted(RUST_INJECTIONS))
def test_an_injected_bug_is_named_through_the_binary(inject):
    stage, code, fixtures = RUST_INJECTIONS[inject]
    found, _ = audited(f"mlx-rs-bin:{inject}", fixtures[0]).findings()
    assert (stage, code) in [(f.stage, f.code) for f in found], found


def test_the_binary_refuses_a_wrong_invocation_and_answers_each_stage_in_files(tmp_path):
    import subprocess

    assert subprocess.run([str(ADAPTER_BINARY)], capture_output=True).returncode == 2
    case = CASES["lora"]
    write_request(case, tmp_path / "req", isolated=True)
    set_stages(tmp_path / "req", case, ["weight_mapping", "isolated_forward"])
    (tmp_path / "resp").mkdir()
    subprocess.run(
        [str(ADAPTER_BINARY), str(tmp_path / "req"), str(tmp_path / "resp")], check=True, capture_output=True
    )
    wm = read_response(tmp_path / "resp", "weight_mapping")
    assert not wm.error and set(wm.meta["load_report"]) == {"missing", "unexpected", "mismatched", "ignored"}
    assert any(k.endswith(".lora_a") for k in wm.tensors)
    pieces = read_response(tmp_path / "resp", "isolated_forward")
    assert not pieces.error and "isolated.forward.layer.1.q_rope" in pieces.tensors
