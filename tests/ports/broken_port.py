#!/usr/bin/env python3
"""A port that misbehaves at one stage, for the robustness tests: broken_port.py MODE STAGE REQUEST RESPONSE.

MODE: crash (exit 3 with a message), hang (sleep), garbage (bytes that are not safetensors),
nan (NaN in the first tensor), shape (drop the last axis of every tensor), unseeded (one more
parameter, initialised from an unseeded generator: different in every process), nolora (no LoRA
adapters among its parameters), fused (no attention scores or probabilities among its forward's pieces,
declared as not computed: a fused attention kernel), fused-undeclared (the same, not declared). Other
stages behave like the reference, through the example adapter.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

mode, bad_stage, request, response = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
stage = json.loads((request / "request.json").read_text())["stages"][0]
adapter = Path(__file__).resolve().parents[2] / "examples" / "reference_adapter.py"
if stage == bad_stage and mode == "crash":
    print("thread 'main' panicked at src/train.rs:42: called `Option::unwrap()` on a `None` value", file=sys.stderr)
    sys.exit(3)
if stage == bad_stage and mode == "hang":
    time.sleep(600)
subprocess.run([sys.executable, str(adapter), str(request), str(response)], check=True)
if stage == bad_stage:
    f = response / f"{stage}.safetensors"
    if mode == "garbage":
        f.write_bytes(b"\x00\x01not a safetensors file")
    elif mode == "nolora":
        t = load_file(str(f))
        save_file({k: v for k, v in t.items() if not k.endswith((".lora_a", ".lora_b"))}, str(f))
    elif mode == "unseeded":
        t = load_file(str(f))
        t["weights.model.layers.0.mlp.down_proj.bias"] = (
            np.random.default_rng().uniform(-0.1, 0.1, 4).astype(np.float32)
        )
        save_file(t, str(f))
    elif mode in ("fused", "fused-undeclared"):
        t = load_file(str(f))
        save_file({k: v for k, v in t.items() if not k.endswith((".scores", ".probs"))}, str(f))
        if mode == "fused":
            why = "fused attention: the kernel gives the output only"
            (response / f"{stage}.json").write_text(json.dumps({"not_computed": {"scores": why, "probs": why}}))
    elif mode in ("nan", "shape"):
        t = load_file(str(f))
        first = sorted(t)[0]
        if mode == "nan":
            t[first] = t[first].astype(np.float32)
            t[first].flat[0] = np.nan
        else:
            t = {k: (v[..., :-1].copy() if v.ndim else v) for k, v in t.items()}
        save_file(t, str(f))
