"""A case: one fixture folder, the input every backend receives and the goldens it is judged by.

Layout of `fixtures/<name>/`:
  checkpoint/            Hugging Face config.json + model.safetensors (or shards with an index)
  batch.safetensors      input_ids, attention_mask, auth_weight, prov_entropy
  settings.json          trainer settings (docs/training-step.md)
  lora_init.safetensors  initial adapters, for trainable = lora
  golden.safetensors     expected stage outputs, produced by the MLX reference and confirmed by the torch twin
  truth.safetensors      the float64 truth of every golden float tensor (`offset.*` = truth - golden), and how far updates move
                         when gradients move by their bound (`sens.*`): what verdicts are judged against
  case.json              description and the bug classes the case is built to expose
  agreement.json         margins measured when the goldens were built (torch twin, transformers); informative
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from mlx_parity.reference.precision import model_dtype
from mlx_parity.reference.settings import TrainSettings
from mlx_parity.reference.weights import IGNORED_KEYS, checkpoint_files

from .errors import CaseError
from .linked_checkpoint import LINK_FILE, LinkError, resolve
from .truth import Truth, needs_truth

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES_DIR = REPO_ROOT / "fixtures"


class CheckpointWeights(Mapping):
    """`weights.<name>` -> a checkpoint tensor as numpy, float weights as the parameter a port loads them into
    (float32; under bfloat16 training rounded to bfloat16 first), as float32 (numpy cannot hold bfloat16: MLX
    reads it). Read from the file on each access (MLX loads lazily, one tensor at a time) and not kept: a real
    model's weights are never held in full here."""

    def __init__(self, checkpoint: Path, adapters: dict[str, np.ndarray] | None, precision: str = "float32"):
        import mlx.core as mx

        self._file: dict[str, Path] = {}
        try:
            for f in checkpoint_files(checkpoint):
                for k in mx.load(str(f), format="safetensors"):  # the header only: nothing is read yet
                    if not IGNORED_KEYS.search(k):
                        self._file[f"weights.{k}"] = f
        except (OSError, ValueError, RuntimeError) as e:
            raise CaseError(f"{checkpoint}: {e}") from None
        self._adapters = {f"weights.{k}": v for k, v in (adapters or {}).items()}
        self._precision = precision

    def __getitem__(self, key: str) -> np.ndarray:
        if key in self._adapters:
            return self._adapters[key]
        import mlx.core as mx

        v = mx.load(str(self._file[key]), format="safetensors")[key.removeprefix("weights.")]
        if not mx.issubdtype(v.dtype, mx.floating):
            return np.array(v)
        return np.array(v.astype(model_dtype(self._precision)).astype(mx.float32))

    def __iter__(self):
        return iter([*self._file, *(k for k in self._adapters if k not in self._file)])

    def __len__(self) -> int:
        return len(self._file.keys() | self._adapters.keys())


def _load(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CaseError(f"{path} is missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CaseError(f"{path} is not a readable safetensors file: {e}") from None


def _finite(path: Path, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Goldens with NaN or Inf would judge nothing (every comparison with NaN is false): refuse them."""
    for k, v in tensors.items():
        if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all():
            raise CaseError(
                f"{path} holds {int((~np.isfinite(v)).sum())} non-finite values in {k}: refusing to judge against it"
            )
    return tensors


@dataclass(frozen=True)
class Case:
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @cached_property
    def checkpoint(self) -> Path:
        """The fixture's checkpoint folder; for a fixture linked to the user's checkpoint (checkpoint.json),
        its cut, made again from the source and checked against the recorded hashes (harness/linked_checkpoint.py)."""
        if not (self.path / LINK_FILE).exists():
            return self.path / "checkpoint"
        try:
            return resolve(self.path)
        except LinkError as e:
            raise CaseError(str(e)) from None

    @property
    def lora_init(self) -> Path | None:
        p = self.path / "lora_init.safetensors"
        return p if p.exists() else None

    @cached_property
    def info(self) -> dict:
        try:
            return json.loads((self.path / "case.json").read_text())
        except FileNotFoundError:
            raise CaseError(f"{self.path} has no case.json: not a fixture") from None
        except (OSError, json.JSONDecodeError) as e:
            raise CaseError(f"{self.path / 'case.json'} is unreadable: {e}") from None

    @cached_property
    def settings_dict(self) -> dict:
        try:
            return json.loads((self.path / "settings.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CaseError(f"{self.path / 'settings.json'} is unreadable: {e}") from None

    @cached_property
    def settings(self) -> TrainSettings:
        try:
            return TrainSettings.from_dict(self.settings_dict)
        except ValueError as e:
            raise CaseError(f"{self.path / 'settings.json'}: {e}") from None

    @cached_property
    def batch(self) -> dict[str, np.ndarray]:
        return _load(self.path / "batch.safetensors")

    @cached_property
    def golden(self) -> dict[str, np.ndarray]:
        return _finite(self.path / "golden.safetensors", _load(self.path / "golden.safetensors"))

    @cached_property
    def initial_weights(self) -> CheckpointWeights:
        """`weights.<name>`: the checkpoint's tensors (and initial adapters), what loading must give and
        θ₀ for judging parameter changes; each read when asked for, so a real model is not held twice."""
        return CheckpointWeights(
            self.checkpoint, None if self.lora_init is None else _load(self.lora_init), self.settings.precision
        )

    @cached_property
    def truth(self) -> Truth:
        f = self.path / "truth.safetensors"
        if not f.exists():
            raise CaseError(f"{f} is missing: a fixture needs its float64 truth (`parity fixtures generate`)")
        stored = _finite(f, _load(f))
        for k in [k for k in stored if k.startswith("spread.")]:  # one-byte codes under a scale: it must be >= 0
            scale = stored.get(f"spread_scale.{k.removeprefix('spread.')}")
            if scale is None or not float(scale) >= 0.0:
                raise CaseError(f"{f}: {k} has no valid spread_scale (got {scale}): refusing to judge against it")
        truth = Truth(stored, self.golden)

        missing = [k for k, v in self.golden.items() if needs_truth(k, v) and f"truth.{k}" not in truth]
        if missing:
            raise CaseError(f"{f} has no truth for {len(missing)} golden tensors, e.g. {missing[0]}")
        return truth

    def check(self) -> None:
        """Load and validate everything an audit reads, so a broken fixture is one clear error up front."""
        self.info, self.settings, self.batch, self.golden, self.truth  # noqa: B018 (cached loads)


def list_cases(root: Path = FIXTURES_DIR) -> list[Case]:
    return [Case(p.parent) for p in sorted(root.glob("*/case.json"))]


def find_case(name: str, root: Path = FIXTURES_DIR) -> Case:
    case = Case(root / name)
    if not (case.path / "case.json").exists():
        known = ", ".join(c.name for c in list_cases(root)) or "none"
        raise CaseError(f"no fixture named {name!r} in {root} (known: {known})")
    return case
