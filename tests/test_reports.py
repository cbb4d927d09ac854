"""Reports: JSON with the documented keys and diagnoses, Markdown and HTML with the right plots."""

import json

from typer.testing import CliRunner

from mlx_parity.harness.cli import app
from mlx_parity.harness.report import results_json
from mlx_parity.harness.report_page import plots, render_html

from .conftest import audited

runner = CliRunner()


def test_json_schema_carries_diagnosis():
    r = audited("mutant:padding_counted", "gqa_padded")
    data = results_json([r])
    assert data["schema_version"] == 3
    loss = next(s for s in data["results"][0]["stages"] if s["name"] == "loss")
    assert loss["status"] == "fail" and loss["diagnosis"]["code"] == "padding_counted"
    assert {"code", "summary", "evidence"} <= set(loss["diagnosis"])
    json.dumps(data)  # serialisable


def test_failing_forward_report_shows_the_per_layer_plot():
    r = audited("mutant:rmsnorm_eps_hardcoded", "small_eps_bias")
    captions = [c for c, _ in plots(r)]
    assert any("forward pass" in c for c in captions) and any("gradients" in c for c in captions)
    assert all(png.startswith(b"\x89PNG") for _, png in plots(r))


def test_failing_trajectory_report_shows_divergence():
    r = audited("mutant:bias_correction_frozen", "gqa_padded")
    assert any("trajectory" in c for c, _ in plots(r))
    page = render_html([r])
    assert "data:image/png;base64," in page and "bias_correction_step" in page


def test_passing_audit_has_no_failure_plots():
    r = audited("mlx", "head")
    assert [c for c, _ in plots(r) if "gradients" in c or "trajectory" in c] == []


def test_cli_writes_markdown_with_plot_files(tmp_path):
    out = tmp_path / "report.md"
    res = runner.invoke(app, ["audit", "-f", "gqa_padded", "-b", "mutant:optimizer_disconnected", "--report", str(out)])
    assert res.exit_code == 1
    text = out.read_text()
    assert "optimizer_not_connected" in text and "report_files/" in text
    assert list((tmp_path / "report_files").glob("*.png"))


def test_cli_rejects_an_unknown_report_format(tmp_path):
    res = runner.invoke(app, ["audit", "-f", "head", "--report", str(tmp_path / "r.pdf")])
    assert res.exit_code == 2
