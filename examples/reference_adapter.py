#!/usr/bin/env python3
"""A worked example of the external-program protocol (docs/protocol.md): the MLX reference as a port.

    parity audit --backend "cmd:python examples/reference_adapter.py"
    parity audit --backend "cmd:python examples/reference_adapter.py --mutant no_shift" -f gqa_padded

Usage: reference_adapter.py [--mutant NAME] REQUEST_DIR RESPONSE_DIR

What any adapter does, in any language:
1. read REQUEST_DIR/request.json: {"stages": [STAGE], "checkpoint", "batch", "lora_init", "settings"};
2. load REQUEST_DIR/checkpoint (Hugging Face config.json + safetensors) with the port's own loader,
   and the batch from REQUEST_DIR/batch.safetensors;
3. run the one stage asked for, from a fresh load;
4. write RESPONSE_DIR/<stage>.safetensors with the stage's named tensors (the table in
   docs/protocol.md), RESPONSE_DIR/weight_mapping.json with the load report, or
   RESPONSE_DIR/<stage>.error if the port knows it failed; exit 0.
Here steps 2-4 are the reference's: `mlx_parity.harness.protocol.server.serve` runs its stages and writes the files.
"""

import argparse
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mutant", help="inject one of mlx_parity.harness.backends.mutants' porting bugs")
    ap.add_argument("request", type=Path)
    ap.add_argument("response", type=Path)
    args = ap.parse_args()

    from mlx_parity.harness.backends import get_backend
    from mlx_parity.harness.protocol.server import serve

    serve(get_backend(f"mutant:{args.mutant}" if args.mutant else "mlx"), args.request, args.response)
    return 0


if __name__ == "__main__":
    sys.exit(main())
