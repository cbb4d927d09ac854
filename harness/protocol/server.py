"""Serve an in-process backend over the external-program protocol (docs/protocol.md).

    python -m mlx_parity.harness.protocol.server BACKEND REQUEST_DIR RESPONSE_DIR

Used to run a backend in its own process, one stage at a time and with a time limit, exactly as a
foreign port is run: the worked example adapter and the isolated mlx-rs extension go through it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.numpy import load_file

from mlx_parity.reference.settings import TrainSettings

from ..backends import get_backend
from ..stages import LAUNCHED_STAGES, Unsupported
from .tensors import save_tensors

(DATA_PARALLEL,) = LAUNCHED_STAGES


class Request:
    """A request folder, shaped like a fixture case so any backend's `run` accepts it."""

    def __init__(self, folder: Path):

        self.path = folder
        self.spec = json.loads((folder / "request.json").read_text())
        self.name = self.spec["fixture"]
        self.checkpoint = folder / self.spec["checkpoint"]
        self.batch = load_file(str(folder / self.spec["batch"]))
        self.lora_init = folder / self.spec["lora_init"] if self.spec.get("lora_init") else None
        self.settings_dict = self.spec["settings"]
        self.settings = TrainSettings.from_dict(self.settings_dict)
        inputs = self.spec.get("isolated_inputs")
        self.golden = (
            load_file(str(folder / inputs)) if inputs else {}
        )  # the reference's forward pieces, logits and gradients


def serve(backend, request_dir: Path, response_dir: Path) -> None:
    """Run the requested stages and write `<stage>.safetensors` (+ `.json` metadata, or `.error`); as one rank
    of a data-parallel request, `data_parallel.rank<r>.safetensors`."""
    request = Request(request_dir)
    if request.spec["stages"] == [DATA_PARALLEL]:
        try:
            rank, tensors = backend.rank_outputs(request)
        except Unsupported as e:
            (response_dir / f"{DATA_PARALLEL}.unsupported").write_text(str(e))
            return
        save_tensors(tensors, response_dir / f"{DATA_PARALLEL}.rank{rank}.safetensors")
        return
    for stage, out in backend.run(request, request.spec["stages"]).items():
        if out.unsupported:
            (response_dir / f"{stage}.unsupported").write_text(out.unsupported)
            continue
        if out.error:
            (response_dir / f"{stage}.error").write_text(out.error)
            continue
        save_tensors(out.tensors, response_dir / f"{stage}.safetensors")
        if out.meta:
            (response_dir / f"{stage}.json").write_text(json.dumps(out.meta))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("backend", help="mlx, torch, mlx-rs, mutant:NAME")
    ap.add_argument("request", type=Path)
    ap.add_argument("response", type=Path)
    args = ap.parse_args(argv)

    serve(get_backend(args.backend, in_process=True), args.request, args.response)
    return 0


if __name__ == "__main__":
    sys.exit(main())
