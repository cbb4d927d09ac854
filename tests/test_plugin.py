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


def test_plugin_options_are_registered(pytestconfig):
    assert pytestconfig.getoption("--parity-timeout") == pytest.approx(300.0)
