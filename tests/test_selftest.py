"""`parity selftest`: every mutant caught with its diagnosis, no false alarm, the documented JSON."""

import json

from typer.testing import CliRunner

from harness.cli import app


def test_selftest_passes_and_writes_its_json(tmp_path):
    out = tmp_path / "selftest.json"
    res = CliRunner().invoke(app, ["selftest", "--no-protocol", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["false_alarms"] == 0 and data["passed"] is True
    assert len(data["mutants"]) >= 20
    for m in data["mutants"]:
        assert {"name", "expected_stage", "detected_stage", "diagnosis", "caught"} <= set(m)
        assert m["caught"], m
        assert m["named_as_finding"], m  # the bug is a finding of its own, not only the first failure
    assert "mutant runs caught" in res.output
