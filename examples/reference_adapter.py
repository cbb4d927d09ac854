#!/usr/bin/env python3
"""A worked example of the external-program protocol (docs/protocol.md): the MLX reference as a port.

    parity audit --backend "cmd:python examples/reference_adapter.py"
    parity audit --backend "cmd:python examples/reference_adapter.py --mutant no_shift" -f gqa_padded

Usage: reference_adapter.py [--mutant NAME] REQUEST_DIR RESPONSE_DIR

A Rust port's adapter does the same: read REQUEST_DIR/request.json, load REQUEST_DIR/checkpoint and
the batch, run the stages listed, and write RESPONSE_DIR/<stage>.safetensors with the named tensors
(and RESPONSE_DIR/weight_mapping.json with the load report).
"""

import argparse
import json
import sys
from pathlib import Path

from safetensors.numpy import load_file, save_file


class Request:
    """The request folder, shaped like the harness's fixture case so the reference can run it."""

    def __init__(self, folder: Path):
        from reference.settings import TrainSettings

        self.path = folder
        self.spec = json.loads((folder / "request.json").read_text())
        self.name = self.spec["fixture"]
        self.checkpoint = folder / self.spec["checkpoint"]
        self.batch = load_file(str(folder / self.spec["batch"]))
        self.lora_init = folder / self.spec["lora_init"] if self.spec.get("lora_init") else None
        self.settings_dict = self.spec["settings"]
        self.settings = TrainSettings.from_dict(self.settings_dict)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mutant", help="inject one of harness.mutants' porting bugs")
    ap.add_argument("request", type=Path)
    ap.add_argument("response", type=Path)
    args = ap.parse_args()

    from harness.backends.mlx_backend import MLXBackend
    from harness.stages import compute

    backend = MLXBackend()
    if args.mutant:
        from harness.mutants import MUTANTS, MutantBackend

        backend = MutantBackend(MUTANTS[args.mutant])
    request = Request(args.request)
    for stage, out in compute(backend, request, request.spec["stages"]).items():
        if out.error:
            (args.response / f"{stage}.error").write_text(out.error)
            continue
        save_file({k: v for k, v in out.tensors.items()}, str(args.response / f"{stage}.safetensors"))
        if out.meta:
            (args.response / f"{stage}.json").write_text(json.dumps(out.meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
