"""The harness's side of the request/response protocol (docs/protocol.md): the request folder it writes for
a port and the response it reads back, checked against the schema. harness/backends/external.py runs the port."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from .. import pieces
from ..stages import StageOutput
from .schemas import problems
from .tensors import save_tensors

PROTOCOL = "mlx-parity/1"


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


def set_stages(folder: Path, case, stages: list[str], world_size: int = 1, launcher: str | None = None) -> None:
    """request.json; with `world_size` > 1 (the data_parallel request, docs/protocol.md) the launcher that
    started the ranks, whose environment names each rank and the rendezvous."""
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
    if world_size > 1:
        request |= {"world_size": world_size, "launcher": launcher}
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
