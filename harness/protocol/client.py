"""Any port as a backend: an external program speaking the request/response protocol (docs/protocol.md).

`--backend "cmd:<command line>"`. For each stage the harness runs `<command line> REQUEST_DIR
RESPONSE_DIR` in its own process with a time limit, so a crash, hang or garbage in one stage is that
stage's finding and the others are still judged.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from .. import pieces
from ..backends.base import Backend
from ..stages import ISOLATED_STAGES, STAGES, StageOutput
from .schemas import problems
from .tensors import save_tensors

PROTOCOL = "mlx-parity/1"
DEFAULT_TIMEOUT_S = 300.0
EXAMPLE_ADAPTER = Path(__file__).resolve().parents[2] / "examples" / "reference_adapter.py"


ISOLATED_INPUTS = "isolated_inputs.safetensors"


def write_request(case, folder: Path, isolated: bool = False) -> None:
    """The request folder: the checkpoint, the batch, the adapters, the reference's own inputs for the
    isolated checks (its forward pieces, logits and gradients), and request.json."""
    folder.mkdir(parents=True)
    link_tree(Path(case.checkpoint), folder / "checkpoint")
    save_tensors(case.batch, folder / "batch.safetensors")
    if case.lora_init is not None:
        shutil.copy(case.lora_init, folder / "lora_init.safetensors")
    if isolated:
        given = {pieces.PREFIX + k: v for k, v in pieces.given(case.golden).items()}
        save_tensors(
            {k: v for k, v in case.golden.items() if k == "forward.logits" or k.startswith("grad.")} | given,
            folder / ISOLATED_INPUTS,
        )


def link_tree(src: Path, dst: Path) -> None:
    """The checkpoint's files linked, not copied: a hard link where the file system allows, else a symbolic
    link to the resolved file. A multi-GB checkpoint costs nothing; a port that wrote into it would change the
    fixture's own files, which the next audit's hash check reports."""
    src = src.resolve()
    for f in sorted(src.rglob("*")):
        target = dst / f.relative_to(src)
        if f.is_dir():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        real = f.resolve()
        try:
            os.link(real, target)
        except OSError:
            target.symlink_to(real)


def set_stages(folder: Path, case, stages: list[str]) -> None:
    request = {
        "protocol": PROTOCOL,
        "fixture": case.name,
        "stages": stages,
        "checkpoint": "checkpoint",
        "batch": "batch.safetensors",
        "lora_init": "lora_init.safetensors" if case.lora_init is not None else None,
        "settings": case.settings_dict,
        "isolated_inputs": ISOLATED_INPUTS if (folder / ISOLATED_INPUTS).exists() else None,
    }
    wrong = problems("request", request)
    if wrong:  # the harness's own request: a bug here, not the port's
        raise ValueError(f"request.json breaks harness/protocol/schema/request.json {wrong[0]}")
    tmp = folder / "request.json.partial"
    tmp.write_text(json.dumps(request, indent=2))
    tmp.replace(folder / "request.json")


def response_limit(case) -> int:
    """The largest response file read: a few times everything a stage could honestly hold (all
    weights, or all goldens). A port that writes more is broken, and reading it would only hurt."""
    sizes = sum(f.stat().st_size for f in case.path.rglob("*") if f.is_file())
    sizes += sum(f.stat().st_size for f in Path(case.checkpoint).resolve().rglob("*") if f.is_file())
    return 4 * sizes + 64 * 2**20


def read_response(folder: Path, stage: str, limit: int | None = None) -> StageOutput:
    unsupported = folder / f"{stage}.unsupported"
    if unsupported.exists():
        return StageOutput(
            unsupported=unsupported.read_text(errors="replace").strip()[:2000] or "the port does not implement it"
        )
    err = folder / f"{stage}.error"
    if err.exists():
        return StageOutput(error=f"the port reported: {err.read_text(errors='replace').strip()[:2000]}")
    f = folder / f"{stage}.safetensors"
    if not f.exists():
        return StageOutput(error=f"the port wrote no {f.name}")
    if limit is not None and f.stat().st_size > limit:
        return StageOutput(
            error=f"the port's {f.name} holds {f.stat().st_size:,} bytes, more than the {limit:,} any stage needs: not read"
        )
    try:
        tensors = load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        return StageOutput(error=f"the port's {f.name} is unreadable: {e}")
    meta = {}
    m = folder / f"{stage}.json"
    if m.exists():
        try:
            meta = json.loads(m.read_text(errors="replace"))
        except json.JSONDecodeError as e:
            return StageOutput(error=f"the port's {m.name} is not JSON: {e}")
        wrong = problems("stage-meta", meta)
        if wrong:
            return StageOutput(
                error=f"the port's {m.name} breaks the protocol's schema (harness/protocol/schema/stage-meta.json) {wrong[0]}"
            )
    return StageOutput({k: np.asarray(v) for k, v in tensors.items()}, meta)


class ExternalBackend(Backend):
    """A port behind the protocol. By default each stage runs in a fresh process (a stage cannot lean on
    state another left behind); `one_process` sends every stage in one request, so a port that asks for it
    loads the checkpoint once (`cmd-once:`), with the time limit of all its stages together."""

    def __init__(
        self, command: str, timeout: float = DEFAULT_TIMEOUT_S, name: str | None = None, one_process: bool = False
    ):
        self.command = command
        self.argv = shlex.split(command)
        self.timeout = timeout
        self.one_process = one_process
        self.name = name or f"{'cmd-once' if one_process else 'cmd'}:{command}"

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
