"""The pytest plugin, as a port's own test suite would use it."""

import pytest

pytest_plugins = ["pytester"]

PORT_TEST = """
def test_port(parity):
    parity.assert_passes()
"""


def test_plugin_passes_a_correct_backend(pytester):
    pytester.makepyfile(PORT_TEST)
    result = pytester.runpytest("-p", "parity", "--parity-backend", "mlx", "--parity-fixture", "head")
    result.assert_outcomes(passed=1)


def test_plugin_failure_names_stage_tensor_and_diagnosis(pytester):
    pytester.makepyfile(PORT_TEST)
    result = pytester.runpytest("--parity-backend", "mutant:no_shift", "--parity-fixture", "gqa_padded")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "stage shifted_slices fails" in out
    assert "tensor shifted.mask: shape (4, 16), expected (4, 15)" in out
    assert "diagnosis (labels_not_shifted)" in out
    assert "reproduce: parity audit -b mutant:no_shift -f gqa_padded -v --report parity-report.html" in out
    assert "harness/pytest_plugin.py" not in out, "the plugin's own frames are hidden from the traceback"


def test_plugin_checks_fixture_hashes_like_the_cli(pytester, tmp_path):
    """The plugin audits through the CLI's session: a fixture that differs from its manifest is refused."""
    import shutil

    from mlx_parity.harness.case import FIXTURES_DIR

    root = tmp_path / "fixtures"
    shutil.copytree(FIXTURES_DIR, root, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "head" / "settings.json").write_text((root / "head" / "settings.json").read_text() + " ")
    pytester.makepyfile(PORT_TEST)
    result = pytester.runpytest(
        "--parity-backend", "mlx", "--parity-fixture", "head", "--parity-fixtures-dir", str(root)
    )
    result.assert_outcomes(failed=1)
    assert "head/settings.json: sha256" in result.stdout.str()


def test_plugin_options_are_registered(pytestconfig):
    assert pytestconfig.getoption("--parity-timeout") == pytest.approx(300.0)


STAGE_TEST = """
def test_stage(parity_stage):
    parity_stage.assert_passes()
"""


def test_plugin_without_a_backend_fails_instead_of_auditing_the_reference(pytester):
    pytester.makepyfile(PORT_TEST)
    result = pytester.runpytest("--parity-fixture", "head")
    result.assert_outcomes(failed=1)
    assert "no backend to audit" in result.stdout.str()


def test_plugin_stage_items_without_a_backend_fail(pytester):
    pytester.makepyfile(STAGE_TEST)
    result = pytester.runpytest("--parity-fixture", "head")
    result.assert_outcomes(failed=1)
    assert "no backend to audit" in result.stdout.str()


def test_plugin_gives_one_item_per_fixture_and_stage(pytester):
    pytester.makepyfile(STAGE_TEST)
    result = pytester.runpytest(
        "--parity-backend",
        "mutant:no_shift",
        "--parity-fixture",
        "gqa_padded",
        "-v",
        "--junitxml",
        str(pytester.path / "junit.xml"),
    )
    # weights and forward come before the bug; the isolated forward, optimizer and schedule checks, on the reference's inputs, pass
    result.assert_outcomes(passed=5, failed=7)
    out = result.stdout.str()
    assert "test_stage[mutant:no_shift-gqa_padded-shifted_slices] FAILED" in out
    assert "test_stage[mutant:no_shift-gqa_padded-forward] PASSED" in out
    # the five end-to-end items after it carry the audit's verdict: they follow from the finding, not "unexplained"
    # (counted in the failure bodies only: with CI set, pytest repeats each message in full in its short summary)
    body = [line for line in result.outlines if line.startswith("E ")]
    assert sum("finding at shifted_slices (labels_not_shifted)" in line for line in body) == 5
    assert "diagnosis (unexplained)" not in out
    assert (pytester.path / "junit.xml").read_text().count("<testcase") == 12


def test_plugin_stage_items_select_with_k(pytester):
    pytester.makepyfile(STAGE_TEST)
    result = pytester.runpytest("--parity-backend", "mlx", "--parity-fixture", "head", "-k", "forward")
    result.assert_outcomes(passed=2, deselected=10)  # forward and isolated_forward


def test_plugin_missing_adapter_fails(pytester):
    pytester.makepyfile(PORT_TEST)
    result = pytester.runpytest("--parity-backend", "cmd:/nonexistent/adapter", "--parity-fixture", "head")
    result.assert_outcomes(failed=1)
    assert "cannot run" in result.stdout.str()


def test_plugin_on_several_ranks_has_a_data_parallel_item_that_names_its_cause(pytester):
    """`--parity-world-size 2`: one more item per fixture; a batch that does not divide skips it, saying why."""
    pytester.makepyfile(STAGE_TEST)
    result = pytester.runpytest(
        "--parity-backend", "mutant:dp_gradients_summed", "--parity-world-size", "2",
        "--parity-fixture", "gqa_padded", "--parity-fixture", "gqa_single", "-rs",
    )  # fmt: skip
    result.assert_outcomes(passed=24, failed=1, skipped=1)  # the twelve one-process stages pass on both
    out = result.stdout.str()
    assert "diagnosis (dp_gradients_summed)" in out and "--world-size 2 --launcher mlx" in out
    assert "does not divide into 2 ranks" in out
