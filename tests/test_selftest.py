"""`parity selftest`: its core on fewer cells, every bug combination, DESIGN.md's list, no false alarm.

The matrix's costly part is already the suite's: test_mutants audits every mutant on every fixture that exposes
it, test_audit, test_mlx_rs and test_rust_adapter every correct backend on every fixture and the Rust port's
injected bugs. Here the self-test reads those audits (shared through the session: conftest.audit_once) with its
own functions, runs one fixture's column of the matrix, and its command writes the JSON on that column."""

import functools
import json

import pytest
from typer.testing import CliRunner

from mlx_parity.harness import selftest
from mlx_parity.harness.audit import audit
from mlx_parity.harness.backends.mutants import MUTANTS
from mlx_parity.harness.cli import app
from mlx_parity.harness.selftest import COMBINATIONS, DESIGN_BUGS, DESIGN_TOGETHER, cell, matrix, other_causes, together
from mlx_parity.harness.stages import ALL_STAGES, StageOutput

from .conftest import CASES, audit_once, audited
from .test_malformed import Canned

COLUMN = "gqa_padded"  # the fixture that exposes the most mutants (20 of 36); some of the others pass it


@pytest.fixture
def shared(monkeypatch):
    """The self-test's audits through the session's cache: the matrix's (on several ranks for a data-parallel
    bug), the combinations' and the Rust ports' injections, each run once however many tests read it."""
    monkeypatch.setattr(selftest, "audit", audit_once)
    monkeypatch.setattr(selftest, "audit_world", lambda backend, case, world=1: audit_once(backend, case, world=world))


def test_a_cell_reads_named_localised_passed_and_not_applicable():
    no_shift = audited("mutant:no_shift", COLUMN)
    assert cell(no_shift, "labels_not_shifted") == "named"
    assert cell(no_shift, "rope_base") == "localised"  # the audit fails without naming that cause
    assert cell(audited("mlx", COLUMN), "labels_not_shifted") == "passed"
    cannot_build = Canned({s: StageOutput(error="this bug needs LoRA adapters") for s in ALL_STAGES})
    assert cell(audit(cannot_build, CASES[COLUMN]), "lora_scale") == "not applicable"


def test_other_causes_are_the_stated_causes_besides_the_injected_ones():
    findings = [
        "shifted_slices:labels_not_shifted",
        "loss:unexplained",
        "forward:piece_divergence",
        "optimizer:no_update",
    ]
    assert other_causes(findings, {"labels_not_shifted"}) == ["optimizer:no_update"]
    assert other_causes(findings, {"labels_not_shifted", "no_update"}) == []


def test_a_cause_said_less_specifically_is_not_another_cause():
    """Where no bias correction and one frozen at t = 1 are the same update, the schedule check says only that the
    bias correction differs: true of a frozen one, while a step stated for a flipped one is a wrong cause."""
    assert other_causes(["isolated_schedule:bias_correction"], {"bias_correction_step"}) == []
    assert other_causes(["isolated_schedule:bias_correction_step"], {"bias_correction"}) == [
        "isolated_schedule:bias_correction_step"
    ]
    assert other_causes(["isolated_schedule:bias_correction"], {"adam_eps"}) == ["isolated_schedule:bias_correction"]


def test_one_column_of_the_matrix(shared):
    rows = matrix(cases=[CASES[COLUMN]])
    assert [r["mutant"] for r in rows] == list(MUTANTS)
    for row in rows:
        assert set(row["cells"]) == {COLUMN}
        exposing = COLUMN in row["exposing_fixtures"]
        assert row["cells"][COLUMN] in (("named",) if exposing else ("named", "localised", "passed")), row
        assert row["named_where_exposed"] and set(row["exposing_fixtures"]) & {COLUMN} <= set(row["exposed_by"])
        assert row["other_causes"] == {}, f"{row['mutant']}: a cause it does not have is stated"
    assert {r["mutant"] for r in rows if COLUMN in r["exposed_by"]} >= {
        m.name for m in MUTANTS.values() if COLUMN in m.fixtures
    }


@pytest.mark.parametrize(
    "fixture, names",
    COMBINATIONS + DESIGN_TOGETHER,
    ids=[f"{f}-{'+'.join(n)}" for f, n in COMBINATIONS + DESIGN_TOGETHER],
)
def test_bugs_together_are_each_named(shared, fixture, names):
    combo = together(fixture, names)
    assert combo["outcome"] == {n: "named" for n in names} and combo["all_named"], combo
    assert {f.split(":")[1] for f in combo["findings"]} >= {MUTANTS[n].expected_diagnosis for n in names}


def test_the_combinations_cover_several_bugs_and_design_md_s_list():
    assert len(COMBINATIONS + DESIGN_TOGETHER) >= 8 and any(len(n) >= 3 for _, n in COMBINATIONS)
    together_ = {m for _, names in DESIGN_TOGETHER for m in names}
    assert set(DESIGN_BUGS.values()) <= together_ and len(DESIGN_TOGETHER) == 3
    assert set(DESIGN_BUGS.values()) <= set(MUTANTS)


@pytest.mark.parametrize("number", sorted(DESIGN_BUGS))
def test_each_bug_of_design_md_s_list_is_named_alone(number):
    m = MUTANTS[DESIGN_BUGS[number]]
    assert m.fixtures
    for f in m.fixtures:
        assert cell(audited(f"mutant:{m.name}", f), m.expected_diagnosis) == "named", (m.name, f)


def test_the_command_passes_and_writes_its_json(shared, monkeypatch, tmp_path):
    """`parity selftest --json` on one column of the matrix (with every combination, DESIGN.md's list, the first
    injected bug of each Rust port, and the correct backends on that fixture). Every injected bug of the Rust
    ports is named in tests/test_mlx_rs.py, test_rust_adapter.py and test_candle.py; here, that the command
    runs and reports them."""
    monkeypatch.setattr(selftest, "run", functools.partial(selftest.run, cases=[CASES[COLUMN]]))
    every_injection = selftest.rust_mutants()
    first_of_each = [job for i, job in enumerate(every_injection) if job[2] not in {j[2] for j in every_injection[:i]}]
    monkeypatch.setattr(selftest, "rust_mutants", lambda: first_of_each)
    out = tmp_path / "selftest.json"
    res = CliRunner().invoke(app, ["selftest", "--no-protocol", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["false_alarms"] == 0 and data["passed"] is True
    assert {"mlx", "torch"} <= set(data["correct_backends"])
    # the matrix: every mutant, named wherever the fixture is built to show it
    assert {r["mutant"] for r in data["matrix"]} == set(MUTANTS)
    for row in data["matrix"]:
        assert set(row["cells"]) == {COLUMN}
        assert all(row["cells"][f] == "named" for f in row["exposing_fixtures"] if f == COLUMN), row
        assert set(row["exposing_fixtures"]) & {COLUMN} <= set(row["exposed_by"])
    # several bugs in one port: each its own finding
    assert len(data["combinations"]) >= 8 and any(len(c["mutants"]) >= 3 for c in data["combinations"])
    for combo in data["combinations"]:
        assert combo["all_named"] and not combo["other_causes"], combo
    assert data["cells_with_other_causes"] == 0 and "causes stated besides the injected ones" in res.output
    # DESIGN.md's list: each alone, and all of them across the together runs
    assert data["design_list_alone"] == {str(n): True for n in DESIGN_BUGS}
    together_ = {m for c in data["combinations"] if c["design_list"] for m in c["mutants"]}
    assert set(DESIGN_BUGS.values()) <= together_ and len(DESIGN_TOGETHER) == 3
    assert {m["via"] for m in data["mutants"]} == {job[2] for job in first_of_each}  # the Rust ports built here
    for m in data["mutants"]:
        assert m["named_as_finding"], m
    assert "combinations with every bug named" in res.output
