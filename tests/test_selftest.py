"""`parity selftest`: every mutant on every fixture, bugs combined, DESIGN.md's list, no false alarm."""

import json

from typer.testing import CliRunner

from mlx_parity.harness.backends.mutants import MUTANTS
from mlx_parity.harness.cli import app
from mlx_parity.harness.fixtures.specs import SPECS
from mlx_parity.harness.selftest import DESIGN_BUGS, DESIGN_TOGETHER


def test_selftest_passes_and_writes_its_json(tmp_path):
    out = tmp_path / "selftest.json"
    res = CliRunner().invoke(app, ["selftest", "--no-protocol", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["false_alarms"] == 0 and data["passed"] is True
    # the matrix: every mutant on every fixture, named wherever it is built to show
    assert {r["mutant"] for r in data["matrix"]} == set(MUTANTS)
    for row in data["matrix"]:
        assert set(row["cells"]) == {s.name for s in SPECS}
        assert all(row["cells"][f] == "named" for f in row["exposing_fixtures"]), row
        assert set(row["exposing_fixtures"]) <= set(row["exposed_by"])
    # several bugs in one port: each its own finding
    assert len(data["combinations"]) >= 8 and any(len(c["mutants"]) >= 3 for c in data["combinations"])
    for combo in data["combinations"]:
        assert combo["all_named"], combo
    # DESIGN.md's list: each alone, and all of them across the together runs
    assert data["design_list_alone"] == {str(n): True for n in DESIGN_BUGS}
    together = {m for c in data["combinations"] if c["design_list"] for m in c["mutants"]}
    assert set(DESIGN_BUGS.values()) <= together and len(DESIGN_TOGETHER) == 3
    for m in data["mutants"]:  # the Rust port's injected bugs, when built
        assert m["named_as_finding"], m
    assert "combinations with every bug named" in res.output
