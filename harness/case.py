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
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from mlx_parity.reference.settings import TrainSettings

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES_DIR = REPO_ROOT / "fixtures"


class CaseError(ValueError):
    """A fixture folder that is absent, incomplete or unreadable."""


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
            raise CaseError(f"{path} holds {int((~np.isfinite(v)).sum())} non-finite values in {k}: refusing to judge against it")
    return tensors


@dataclass(frozen=True)
class Case:
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"

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
    def initial_weights(self) -> dict[str, np.ndarray]:
        """`weights.<name>`: the checkpoint's tensors (and initial adapters), what loading must give and
        θ₀ for judging parameter changes."""
        import mlx.core as mx

        from mlx_parity.reference.weights import IGNORED_KEYS, read_checkpoint

        try:  # through MLX, which reads bfloat16 (numpy does not): float weights as the float32 a port loads them into
            stored = read_checkpoint(self.checkpoint)
        except (OSError, ValueError) as e:
            raise CaseError(f"{self.checkpoint}: {e}") from None
        tensors = {k: np.array(v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v)
                   for k, v in stored.items() if not IGNORED_KEYS.search(k)}
        if self.lora_init is not None:
            tensors.update(_load(self.lora_init))
        return {f"weights.{k}": v for k, v in tensors.items()}

    @cached_property
    def truth(self) -> dict[str, np.ndarray]:
        f = self.path / "truth.safetensors"
        if not f.exists():
            raise CaseError(f"{f} is missing: a fixture needs its float64 truth (`parity fixtures generate`)")
        from .truth import needs_truth, read_truth

        truth = read_truth(_finite(f, _load(f)), self.golden)

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
