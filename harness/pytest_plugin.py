"""pytest plugin (entry point `parity`): audit a port from its own test suite.

    def test_port_trains_like_the_reference(parity):
        parity.assert_passes()                      # backends and fixtures from the command line

    pytest --parity-backend "cmd:./target/release/my-port-adapter" --parity-fixture gqa_padded

A failure names the stage, the tensor, the largest difference, where it is, and the diagnosis.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("parity", "mlx-parity audits")
    group.addoption("--parity-backend", action="append", default=None,
                    help="backend to audit (repeatable): mlx, torch, mlx-rs, mutant:NAME, \"cmd:<command line>\"")
    group.addoption("--parity-fixture", action="append", default=None, help="fixture name (repeatable; default: all bundled)")
    group.addoption("--parity-fixtures-dir", default=None, help="folder of fixtures (default: the bundled ones)")
    group.addoption("--parity-timeout", type=float, default=300.0, help="seconds per stage for cmd: backends")


class ParityAuditFailed(AssertionError):
    pass


class Parity:
    """The `parity` fixture: run audits and assert they pass, with a message worth reading."""

    def __init__(self, config):
        self.backends = config.getoption("--parity-backend")
        self.fixtures = config.getoption("--parity-fixture")
        self.fixtures_dir = config.getoption("--parity-fixtures-dir")
        self.timeout = config.getoption("--parity-timeout")

    def audit(self, backends: list[str] | None = None, fixtures: list[str] | None = None, stages=None):
        from pathlib import Path

        from harness.audit import audit
        from harness.backends import get_backend
        from harness.case import FIXTURES_DIR, find_case, list_cases
        from harness.stages import STAGES

        root = Path(self.fixtures_dir) if self.fixtures_dir else FIXTURES_DIR
        names = fixtures or self.fixtures
        cases = [find_case(n, root) for n in names] if names else list_cases(root)
        chosen = backends or self.backends or ["mlx"]
        return [audit(get_backend(b, self.timeout), c, stages or STAGES) for b in chosen for c in cases]

    def assert_passes(self, backends: list[str] | None = None, fixtures: list[str] | None = None, stages=None):
        results = self.audit(backends, fixtures, stages)
        failed = [r for r in results if r.verdict != "pass"]
        if failed:
            raise ParityAuditFailed("\n".join(explain(r) for r in failed))
        return results


def explain(result) -> str:
    from harness.report import format_evidence

    st = result.first_failure()
    if st is None:
        return f"{result.backend} on {result.fixture}: skipped ({result.stages[0].message})"
    lines = [f"{result.backend} on {result.fixture}: stage {st.name} fails"]
    w = st.worst()
    if w is not None:
        lines.append(f"  tensor {w.name}: " + (w.problem or f"max abs diff {w.max_abs:.3g}, max rel diff {w.max_rel:.3g} at {w.where}, "
                                                            f"{w.mismatched}/{w.total} elements outside {w.tolerance}"))
    else:
        lines.append(f"  {st.message}")
    if st.diagnosis:
        lines.append(f"  diagnosis ({st.diagnosis.code}): {st.diagnosis.summary}")
        if st.diagnosis.evidence:
            lines.append(f"  evidence: {format_evidence(st.diagnosis.evidence)}")
    return "\n".join(lines)


@pytest.fixture
def parity(request) -> Parity:
    return Parity(request.config)
