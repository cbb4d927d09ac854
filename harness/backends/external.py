"""Any port as a backend: an external program speaking the request/response protocol (docs/protocol.md).

`--backend "cmd:<command line>"`. For each stage the harness runs `<command line> REQUEST_DIR
RESPONSE_DIR` in its own process with a time limit, so a crash, hang or garbage in one stage is that
stage's finding and the others are still judged; `cmd-once:` asks for every stage in one process.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..protocol.client import read_response, response_limit, set_stages, write_request
from ..stages import ISOLATED_STAGES, STAGES, StageOutput
from .base import Backend, Ranks

DEFAULT_TIMEOUT_S = 300.0
EXAMPLE_ADAPTER = Path(__file__).resolve().parents[2] / "examples" / "reference_adapter.py"


class ExternalBackend(Backend):
    """A port behind the protocol. By default each stage runs in a fresh process (a stage cannot lean on
    state another left behind); `one_process` sends every stage in one request, so a port that asks for it
    loads the checkpoint once (`cmd-once:`), with the time limit of all its stages together."""

    def __init__(
        self,
        command: str,
        timeout: float = DEFAULT_TIMEOUT_S,
        name: str | None = None,
        one_process: bool = False,
        launcher: str = "mlx",
    ):
        self.command = command
        self.argv = shlex.split(command)
        self.timeout = timeout
        self.one_process = one_process
        self.name = name or f"{'cmd-once' if one_process else 'cmd'}:{command}"
        self.launcher = launcher

    @property
    def ranks(self) -> Ranks:
        """Its data-parallel ranks: the adapter started once per rank by `launcher`, each answering the
        data_parallel request (docs/protocol.md); a port that trains on one process answers it unsupported."""
        return Ranks(self.launcher, tuple(self.argv), protocol=True)

    def unavailable(self) -> str | None:
        if not self.argv:
            return "empty command"
        exe = self.argv[0]
        if shutil.which(exe) is None and not Path(exe).exists():
            return f"{exe!r} is not an executable on PATH or a file"
        return None

    def run(self, case, stages=STAGES) -> dict[str, StageOutput]:
        results = {}
        self.limit = response_limit(case)
        with tempfile.TemporaryDirectory(prefix="parity-cmd-") as tmp:
            request = Path(tmp) / "request"
            write_request(case, request, isolated=any(s in ISOLATED_STAGES for s in stages))
            if self.one_process and stages:
                response = Path(tmp) / "response"
                response.mkdir()
                set_stages(request, case, list(stages))
                return self._run_stages(list(stages), request, response)
            for stage in stages:
                response = Path(tmp) / f"response-{stage}"
                response.mkdir()
                set_stages(request, case, [stage])
                results[stage] = self._run_stage(stage, request, response)
        return results

    def _run_stage(self, stage: str, request: Path, response: Path) -> StageOutput:
        return self._run_stages([stage], request, response)[stage]

    def _run_stages(self, stages: list[str], request: Path, response: Path) -> dict[str, StageOutput]:
        start, limit = time.monotonic(), self.timeout * len(stages)
        what = "this stage" if len(stages) == 1 else "these stages"
        try:
            proc = subprocess.run(
                [*self.argv, str(request), str(response)],
                capture_output=True,
                text=True,
                timeout=limit,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return {s: StageOutput(error=f"timed out after {limit:g} s (the port hangs at {what})") for s in stages}
        except OSError as e:
            return {s: StageOutput(error=f"could not start {self.argv[0]!r}: {e}") for s in stages}
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
            how = (
                f"killed by signal {-proc.returncode}"
                if proc.returncode < 0
                else f"exited with status {proc.returncode}"
            )
            return {s: StageOutput(error=f"the port {how}: {tail}") for s in stages}
        seconds = round((time.monotonic() - start) / len(stages), 3)
        outputs = {s: read_response(response, s, getattr(self, "limit", None)) for s in stages}
        for out in outputs.values():
            out.meta["seconds"] = seconds
        return outputs


def example_adapter_backend(mutant: str | None = None) -> ExternalBackend:
    """The worked example adapter (the MLX reference behind the protocol), optionally with a mutant."""
    cmd = f"{shlex.quote(sys.executable)} {shlex.quote(str(EXAMPLE_ADAPTER))}" + (
        f" --mutant {mutant}" if mutant else ""
    )
    return ExternalBackend(cmd, name="cmd:example-adapter" + (f"[{mutant}]" if mutant else ""))
