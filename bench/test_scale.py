"""An audit at real scale (SmolLM2-135M, LoRA on its last 4 layers, the fixture `make real` builds): its peak
memory against the model's size, and the time of a `cmd:` port (one process per stage, and `cmd-once:`, one
process for all) against the same audit in process. Each audit runs under its own measuring process: the
peak is the largest resident size of any one process of that audit (the harness, or a port's process).
The live audit (`parity audit --checkpoint --data`) of the whole checkpoint, LoRA on all 30 layers, builds
the goldens and the float64 truth itself: its peak per process against the model's size.

    python -m pytest bench -m scale --benchmark-json scale.json   # about 90 s; extra_info: seconds, peak, ratios
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_parity.harness.backends.external import EXAMPLE_ADAPTER
from mlx_parity.harness.fixtures.real_model import default_cache

ADAPTER = f"{shlex.quote(sys.executable)} {shlex.quote(str(EXAMPLE_ADAPTER))}"
SPELLINGS = {"in-process": "mlx", "cmd": f"cmd:{ADAPTER}", "cmd-once": f"cmd-once:{ADAPTER}"}
# The audit in a child process reporting its own peak: ru_maxrss is KB on Linux, bytes on macOS.
MEASURE = (
    "import resource, subprocess, sys, time, json; t = time.perf_counter(); r = subprocess.run(sys.argv[1:]); "
    "w = time.perf_counter() - t; m = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss; "
    "print(json.dumps({'rc': r.returncode, 'seconds': w, 'peak_bytes': m if sys.platform == 'darwin' else m * 1024}))"
)
_SECONDS: dict[str, float] = {}


def _measure(args: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, sys.executable, "-m", "mlx_parity.harness.cli", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _model_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in (root / "checkpoint").resolve().glob("*.safetensors"))


@pytest.mark.scale
@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_real_model_audit(benchmark, spelling):
    root = default_cache()
    if not (root / "smollm2_lora" / "golden.safetensors").exists():
        pytest.skip(f"the SmolLM2 fixture is not in {root}: `make real` builds it (about 2 minutes, offline)")
    result = {}
    benchmark.pedantic(
        lambda: result.update(_measure(["audit", "--fixtures-dir", str(root), "-b", SPELLINGS[spelling]])),
        rounds=1,
        iterations=1,
    )
    assert result["rc"] == 0, f"the audit of a correct port failed ({spelling}): run it by hand to see why"
    _SECONDS[spelling] = result["seconds"]
    model = _model_bytes(root)
    benchmark.extra_info.update(
        {
            "spelling": spelling,
            "seconds": round(result["seconds"], 2),
            "peak_mb": round(result["peak_bytes"] / 1e6),
            "model_mb": round(model / 1e6),
            "peak_over_model": round(result["peak_bytes"] / model, 2),
            "over_in_process": round(result["seconds"] / _SECONDS["in-process"], 2)
            if "in-process" in _SECONDS
            else None,
        }
    )


@pytest.mark.scale
@pytest.mark.parametrize("spelling", ["in-process", "cmd-once"])
def test_live_audit_of_the_whole_model(benchmark, tmp_path, spelling):
    from mlx_parity.harness.fixtures.real_model import TEXTS

    checkpoint = default_cache() / "checkpoint"
    if not (checkpoint / "config.json").exists():
        pytest.skip(f"SmolLM2-135M is not in {checkpoint.parent}: `make real` converts it (about 2 minutes, offline)")
    data = tmp_path / "text.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": t, "auth_weight": 0.1 * i, "prov_entropy": 1.0 + i}) + "\n" for i, t in enumerate(TEXTS)
        )
    )
    result = {}
    args = ["audit", "--checkpoint", str(checkpoint), "--data", str(data), "-b", SPELLINGS[spelling]]
    benchmark.pedantic(lambda: result.update(_measure(args)), rounds=1, iterations=1)
    assert result["rc"] == 0, f"the live audit of a correct port failed ({spelling}): run it by hand to see why"
    model = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    benchmark.extra_info.update(
        {
            "spelling": f"live {spelling}",
            "seconds": round(result["seconds"], 2),
            "peak_mb": round(result["peak_bytes"] / 1e6),
            "model_mb": round(model / 1e6),
            "peak_over_model": round(result["peak_bytes"] / model, 2),
        }
    )
