"""The real install, as a user gets it (scripts/wheel-check.sh): the wheel built, installed into a fresh venv
without torch or transformers, auditing every bundled fixture and a port through the protocol from outside the
repository, and a buggy port failing with its cause named. Run here, in one pytest worker beside the others'
tests, rather than alone before the suite, where its 51 s were spent while nothing else ran."""

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_installs_and_audits_a_port_without_torch():
    run = subprocess.run(
        ["bash", "scripts/wheel-check.sh"], cwd=REPO, capture_output=True, text=True, timeout=900, check=False
    )
    assert run.returncode == 0, f"wheel-check exited {run.returncode}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert "ok: the wheel audits a port with neither torch nor transformers installed" in run.stderr
