"""The stage registry (harness/stages/) is the one list of stages: the protocol's schema, the Rust kit and
every table of the harness agree with it, and each stage module declares a consistent stage."""

import json
import re
from pathlib import Path

import pytest

from mlx_parity.harness import findings
from mlx_parity.harness.fixtures import truth as truth_building
from mlx_parity.harness.report import SHORT
from mlx_parity.harness.stages import ALL_STAGES, ISOLATED_STAGES, LAUNCHED_STAGES, PREFIX, REGISTRY, STAGES
from mlx_parity.harness.tolerances import TOLERANCES
from mlx_parity.harness.truth import JUDGED_PREFIXES

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "harness" / "protocol" / "schema" / "request.json"
KIT = ROOT / "rust" / "parity-adapter" / "src"


def _rust_list(name: str) -> list[str]:
    """A `const NAME: [&str; N] = [...]` of the Rust kit, wherever in its sources it lives."""
    found = []
    for f in sorted(KIT.rglob("*.rs")):
        m = re.search(rf"const {name}: \[&str; (\d+)\] = \[(.*?)\];", f.read_text(), re.S)
        if m:
            items = re.findall(r'"([a-z_]+)"', m.group(2))
            assert len(items) == int(m.group(1)), f"{f}: {name} declares {m.group(1)} items, lists {len(items)}"
            found.append(items)
    assert len(found) == 1, f"{name} is declared {len(found)} times in {KIT}"
    return found[0]


def test_the_protocol_schema_lists_the_registry_stages_in_order():
    schema = json.loads(SCHEMA.read_text())
    assert schema["properties"]["stages"]["items"]["enum"] == list(ALL_STAGES + LAUNCHED_STAGES)


def test_the_rust_kit_runs_the_registry_stages():
    assert _rust_list("STAGES") == list(STAGES)
    assert _rust_list("ISOLATED_STAGES") == list(ISOLATED_STAGES)
    assert set(_rust_list("READ_ONLY")) == {n for n, s in REGISTRY.items() if s.read_only}


def test_the_eight_stages_come_first_and_the_isolated_checks_are_optional():
    assert STAGES == (
        "weight_mapping",
        "forward",
        "shifted_slices",
        "loss",
        "gradients",
        "optimizer",
        "trajectory",
        "checkpoint",
    )
    assert all(REGISTRY[s].optional for s in ISOLATED_STAGES) and not any(REGISTRY[s].optional for s in STAGES)
    assert ALL_STAGES + LAUNCHED_STAGES == tuple(REGISTRY)


def test_a_launched_stage_is_run_by_ranks_after_what_it_consumes():
    """data_parallel: no session computes it and no golden of a fixture judges it (harness/data_parallel.py)."""
    assert LAUNCHED_STAGES == ("data_parallel",)
    for name in LAUNCHED_STAGES:
        s = REGISTRY[name]
        assert s.compute is None and s.golden_prefix is None and not s.optional and s.diagnose is not None
        assert all(c in STAGES for c in s.consumes) and s.consumes


@pytest.mark.parametrize("name", ALL_STAGES)
def test_each_stage_is_declared_consistently(name):
    s = REGISTRY[name]
    assert s.name == name
    assert all(c in REGISTRY and list(REGISTRY).index(c) < list(REGISTRY).index(name) for c in s.consumes)
    assert s.isolated_by is None or REGISTRY[s.isolated_by].optional
    assert s.repeats is None or REGISTRY[s.repeats].optional
    assert (s.judge is None) == (s.golden_prefix is not None), "a stage is judged by its goldens or by its own rule"
    assert not (s.truth and s.golden_prefix is None), "a stage judged against the truth has goldens"
    assert not (s.sensitive and not s.truth) and not (s.multi_update and not s.sensitive)
    assert s.diagnose is not None, "every stage names its diagnosis rule"
    assert SHORT[name] == s.label
    assert ("float32", s.tolerance) in TOLERANCES and ("bfloat16", s.tolerance) in TOLERANCES


def test_the_tables_derived_from_the_registry():
    assert findings.ISOLATED_BY == {
        "forward": "isolated_forward",
        "loss": "isolated_loss",
        "optimizer": "isolated_optimizer",
        "trajectory": "isolated_schedule",
    }
    assert findings.upstream("checkpoint") == [
        "trajectory",
        "optimizer",
        "gradients",
        "loss",
        "shifted_slices",
        "forward",
        "weight_mapping",
    ]
    assert truth_building.TRUTH_STAGES == tuple(
        n for n in ALL_STAGES if n not in ("weight_mapping", "shifted_slices", "checkpoint")
    )
    assert truth_building.UPDATE_STAGES == ("optimizer", "trajectory")
    # harness/truth.py keeps its prefixes literal (the registry imports what imports it): held to it here
    assert set(JUDGED_PREFIXES) == {"isolated."} | {PREFIX[n] for n in STAGES if REGISTRY[n].truth}
    assert all(PREFIX[n].startswith("isolated.") for n in ISOLATED_STAGES)
