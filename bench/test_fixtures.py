"""What a fixture costs to build and to keep: the time of each phase (the reference's goldens, the float64
truth, the spread's perturbed reference runs, the agreement audits) and the size of each file, for bundled
fixtures of three kinds and, with `make real`'s checkpoint, cuts of SmolLM2-135M's first layers (LoRA, and full
training with every option on).

    python -m pytest bench -m fixtures --benchmark-json fixtures.json   # extra_info: seconds per phase, MiB
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from mlx_parity.harness.fixtures.build import build_fixture
from mlx_parity.harness.fixtures.create import create
from mlx_parity.harness.fixtures.real_model import default_cache
from mlx_parity.harness.fixtures.specs import SPECS

BUNDLED = ("gqa_padded", "lora", "bf16_lora")


def _phases(progress: list[tuple[float, str]], end: float) -> dict[str, float]:
    """Seconds per phase from the builder's progress lines (each line starts a phase; the last ends at `end`)."""
    names = {"inputs": "inputs", "goldens": "goldens", "truth": "truth", "spread": "spread", "agreement": "agreement"}
    out: dict[str, float] = {}
    for (t, what), (t_next, _) in zip(progress, progress[1:] + [(end, "")]):
        phase = next((v for k, v in names.items() if what.startswith(k)), "other")
        out[phase] = round(out.get(phase, 0.0) + t_next - t, 2)
    return out


def _sizes(folder: Path) -> dict[str, float]:
    mib = {f.name: f.stat().st_size / 2**20 for f in folder.glob("*.safetensors")}
    mib["checkpoint"] = sum(f.stat().st_size for f in (folder / "checkpoint").glob("*")) / 2**20
    mib["total"] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20
    return {k: round(v, 2) for k, v in mib.items()}


def _timed(benchmark, build, folder: Path) -> None:
    progress: list[tuple[float, str]] = []
    start = {}

    def run():
        start["t"] = time.perf_counter()
        progress.append((start["t"], "inputs"))  # the checkpoint, batch and settings, until the first phase
        build(lambda what: progress.append((time.perf_counter(), what)))

    benchmark.pedantic(run, rounds=1, iterations=1)
    end = time.perf_counter()
    benchmark.extra_info.update(
        {"seconds": round(end - start["t"], 2), "phases": _phases(progress, end), "mib": _sizes(folder)}
    )


@pytest.mark.fixtures
@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_fixture(benchmark, tmp_path, name):
    spec = next(s for s in SPECS if s.name == name)
    out = tmp_path / name
    _timed(benchmark, lambda say: build_fixture(spec, out, progress=say), out)
    assert (out / "truth.safetensors").exists()


# Full training with every option on (issue 20's 6-layer configuration): the largest fixture per layer, since every
# parameter has a gradient, moments and updates, each stored per element with its truth, sensitivity and spread.
FULL = {
    "trainable": "full",
    "accum_steps": 2,
    "clip_norm": 1.0,
    "optimizer": {"betas": [0.9, 0.95], "weight_decay": 0.1},
    "schedule": {"kind": "warmup_cosine", "warmup_steps": 1, "warmup_init": 1e-4, "decay_steps": 3, "end_lr": 1e-5},
    "loss": {"lambda": 0.6, "alpha": 2.3},
}


@pytest.mark.fixtures
@pytest.mark.parametrize(("layers", "training"), [(2, "lora"), (6, "lora"), (6, "full")])
def test_real_cut(benchmark, tmp_path, layers, training):
    checkpoint = default_cache() / "checkpoint"
    if not (checkpoint / "config.json").exists():
        pytest.skip(f"no SmolLM2 checkpoint in {checkpoint.parent}: `make real` builds it (offline)")
    ids = tmp_path / "tokens.json"
    ids.write_text(json.dumps([[(7 * i + 3 * j) % 4000 + 1 for j in range(32)] for i in range(4)]))
    settings = None
    if training == "full":
        settings = tmp_path / "settings.json"
        settings.write_text(json.dumps(FULL))
    name = f"cut{layers}{training}"
    folder = {}

    def build(say):
        folder["path"] = create(
            name,
            checkpoint,
            tmp_path / "fixtures",
            layers=layers,
            vocab=1024 if training == "lora" else 4096,
            token_ids=ids,
            settings=settings,
            require_agreement=False,
            progress=say,
        )

    _timed(benchmark, build, tmp_path / "fixtures" / name)
    assert (folder["path"] / "truth.safetensors").exists()
