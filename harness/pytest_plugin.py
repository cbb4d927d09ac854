"""pytest plugin (entry point `parity`): audit a port from its own test suite.

One test item per backend, fixture and stage, so a port's CI (and its JUnit report) shows which stage
broke, and `-k forward` selects one:

    def test_port_stage(parity_stage):
        parity_stage.assert_passes()

Or one test for whole audits:

    def test_port_trains_like_the_reference(parity):
        parity.assert_passes()

    pytest --parity-backend "cmd:./target/release/my-port-adapter" --parity-fixture gqa_padded

There is no default backend: a suite that forgets `--parity-backend` fails, it never audits the
reference in the port's place. A failure names the stage, the tensor, the largest error, where it
is, the diagnosis, and the `parity audit` command that reproduces it.

The plugin loads in every pytest run of an environment that has mlx-parity installed, so it imports the
harness (and MLX) only when a parity test is collected or run.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

NO_BACKEND = 'no backend to audit: pass --parity-backend (mlx, torch, mlx-rs, mutant:NAME or "cmd:<command line>")'


def pytest_addoption(parser):
    group = parser.getgroup("parity", "mlx-parity audits")
    group.addoption(
        "--parity-backend",
        action="append",
        default=None,
        help='backend to audit (repeatable, required): mlx, torch, mlx-rs, mutant:NAME, "cmd:<command line>"',
    )
    group.addoption(
        "--parity-fixture", action="append", default=None, help="fixture name (repeatable; default: all bundled)"
    )
    group.addoption("--parity-fixtures-dir", default=None, help="folder of fixtures (default: the bundled ones)")
    group.addoption("--parity-timeout", type=float, default=300.0, help="seconds per stage for cmd: backends")
    group.addoption(
        "--parity-world-size",
        type=int,
        default=1,
        help="also train on N ranks and judge the data_parallel stage (as `parity audit --world-size N`)",
    )
    group.addoption(
        "--parity-launcher",
        default="mlx",
        help="with --parity-world-size: what starts a cmd: port's ranks, mlx (mlx.launch) or torch (torchrun)",
    )


class ParityAuditFailed(AssertionError):
    pass


def _audit_once(config, backend: str, fixture: str):
    """Audits are cached per session: every stage item of one (backend, fixture) shares one run. Through the
    same session as `parity audit` (harness/session.py): hashes, case and backend checks included."""
    from mlx_parity.harness.session import AuditInputError, open_session  # only when a parity test runs

    cache = config.stash.setdefault(_CACHE, {})
    key = (backend, fixture)
    if key not in cache:
        try:
            session = open_session(
                fixtures=[fixture],
                backends=[backend],
                fixtures_dir=config.getoption("--parity-fixtures-dir"),
                timeout=config.getoption("--parity-timeout"),
                world_size=config.getoption("--parity-world-size"),
                launcher=config.getoption("--parity-launcher"),
            )
        except AuditInputError as e:
            raise ParityAuditFailed(str(e)) from None
        cache[key] = session.run()[0]
    return cache[key]


def _cases(config, fixtures: list[str] | None) -> list[str]:
    """The fixture names asked for, or every fixture of the folder."""
    if fixtures:
        return fixtures
    from mlx_parity.harness.case import FIXTURES_DIR, list_cases  # only when a parity test is collected

    root = config.getoption("--parity-fixtures-dir")
    return [c.name for c in list_cases(Path(root) if root else FIXTURES_DIR)]


def reproduce(config, backend: str, fixture: str) -> str:
    """The command that runs this audit again, with every failing tensor and a report page."""
    root = config.getoption("--parity-fixtures-dir")
    where = f" --fixtures-dir {shlex.quote(str(root))}" if root else ""
    world = config.getoption("--parity-world-size")
    if world > 1:
        where += f" --world-size {world} --launcher {shlex.quote(config.getoption('--parity-launcher'))}"
    return f"reproduce: parity audit -b {shlex.quote(backend)} -f {shlex.quote(fixture)}{where} -v --report parity-report.html"


_CACHE = pytest.StashKey[dict]()


class Parity:
    """The `parity` fixture: run whole audits and assert they pass, with a message worth reading."""

    def __init__(self, config):
        self.config = config
        self.backends = config.getoption("--parity-backend")
        self.fixtures = config.getoption("--parity-fixture")
        self.fixtures_dir = config.getoption("--parity-fixtures-dir")

    def audit(self, backends: list[str] | None = None, fixtures: list[str] | None = None):
        chosen = backends or self.backends
        if not chosen:
            raise ParityAuditFailed(NO_BACKEND)
        names = _cases(self.config, fixtures or self.fixtures)
        if not names:
            raise ParityAuditFailed(f"no fixtures in {self.fixtures_dir or 'the bundled folder'}")
        return [_audit_once(self.config, b, f) for b in chosen for f in names]

    def assert_passes(self, backends: list[str] | None = None, fixtures: list[str] | None = None):
        __tracebackhide__ = True
        results = self.audit(backends, fixtures)
        failed = [r for r in results if r.verdict != "pass"]
        if failed:
            raise ParityAuditFailed(
                "\n".join(explain(r) + "\n  " + reproduce(self.config, r.backend, r.fixture) for r in failed)
            )
        return results


class StageCheck:
    """The `parity_stage` fixture: one stage of one fixture for one backend."""

    def __init__(self, config, backend: str | None, fixture: str | None, stage: str | None):
        self.config, self.backend, self.fixture, self.stage = config, backend, fixture, stage

    def assert_passes(self):
        __tracebackhide__ = True
        if self.backend is None:
            raise ParityAuditFailed(NO_BACKEND)
        result = _audit_once(self.config, self.backend, self.fixture)
        from mlx_parity.harness.findings import NOT_IMPLEMENTED  # loaded by the audit above
        from mlx_parity.harness.stages import LAUNCHED_STAGES

        stage = next(s for s in result.stages if s.name == self.stage)
        if stage.status == "not checked" and stage.name in LAUNCHED_STAGES and NOT_IMPLEMENTED not in stage.message:
            pytest.skip(f"{self.backend} on {self.fixture}: {stage.name} does not apply: {stage.message}")
        if stage.status != "pass":
            raise ParityAuditFailed(
                explain_stage(result, stage) + "\n  " + reproduce(self.config, self.backend, self.fixture)
            )
        return stage


def pytest_generate_tests(metafunc):
    if "parity_stage" not in metafunc.fixturenames:
        return
    from mlx_parity.harness.stages import ALL_STAGES, LAUNCHED_STAGES  # only when a parity test is collected

    config = metafunc.config
    backends = config.getoption("--parity-backend")
    if not backends:
        metafunc.parametrize("parity_stage", [(None, None, None)], ids=["no-backend"], indirect=True)
        return
    names = _cases(config, config.getoption("--parity-fixture"))
    stages = ALL_STAGES + (LAUNCHED_STAGES if config.getoption("--parity-world-size") > 1 else ())
    params = [(b, f, s) for b in backends for f in names for s in stages]
    metafunc.parametrize("parity_stage", params, ids=[f"{b}-{f}-{s}" for b, f, s in params], indirect=True)


@pytest.fixture
def parity_stage(request) -> StageCheck:
    backend, fixture, stage = getattr(request, "param", (None, None, None))
    return StageCheck(request.config, backend, fixture, stage)


def explain_stage(result, st) -> str:
    from mlx_parity.harness.report import format_evidence  # only when a parity test fails

    lines = [
        f"{result.backend} on {result.fixture}: stage {st.name} {'fails' if st.status == 'fail' else 'was skipped'}"
    ]
    w = st.worst()
    if w is not None:
        lines.append(f"  tensor {w.describe()}")  # the text `parity audit -v` prints for it
    else:
        lines.append(f"  {st.message}")
    found, inherited = result.findings()
    follows = next((i for i in inherited if i.stage == st.name), None)
    own = [f for f in found if f.stage == st.name]
    if follows:  # the audit's verdict on this failure: it follows from findings elsewhere, not a cause of its own
        lines.append(f"  inherited: {follows.describe()}")
        for f in (f for f in found if f.stage in follows.from_stages):
            lines.append(f"  finding at {f.stage} ({f.code}): {f.summary}")
    elif own:
        for f in own:
            lines.append(f"  diagnosis ({f.code}): {f.summary}")
            if f.evidence:
                lines.append(f"  evidence: {format_evidence(f.evidence)}")
    elif st.diagnosis:
        lines.append(f"  diagnosis ({st.diagnosis.code}): {st.diagnosis.summary}")
        if st.diagnosis.evidence:
            lines.append(f"  evidence: {format_evidence(st.diagnosis.evidence)}")
    return "\n".join(lines)


def explain(result) -> str:
    """Every distinct finding of a failing audit, and which failures follow from them."""
    found, inherited = result.findings()
    if not found:
        st = result.first_failure()
        return (
            explain_stage(result, st)
            if st
            else f"{result.backend} on {result.fixture}: skipped ({result.stages[0].message})"
        )
    by_name = {s.name: s for s in result.stages}
    text = "\n".join(explain_stage(result, by_name[stage]) for stage in dict.fromkeys(f.stage for f in found))
    if inherited:
        text += "\n  inherited: " + "; ".join(f"{i.stage} ({i.describe()})" for i in inherited)
    return text


@pytest.fixture
def parity(request) -> Parity:
    return Parity(request.config)
