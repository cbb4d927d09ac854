"""A case: one fixture folder, the input every backend receives and the goldens it is judged by.

Layout of `fixtures/<name>/`:
  checkpoint/            Hugging Face config.json + model.safetensors (or shards with an index)
  batch.safetensors      input_ids, attention_mask, auth_weight, prov_entropy
  settings.json          trainer settings (docs/training-step.md)
  lora_init.safetensors  initial adapters, for trainable = lora
  golden.safetensors     expected stage outputs, produced by the MLX reference and confirmed by the torch twin
  case.json              description and the bug classes the case is built to expose
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from reference.settings import TrainSettings

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

    @cached_property
    def settings_dict(self) -> dict:
        return json.loads((self.path / "settings.json").read_text())

    @cached_property
    def settings(self) -> TrainSettings:
        return TrainSettings.from_dict(self.settings_dict)

    @cached_property
    def batch(self) -> dict[str, np.ndarray]:
        return _load(self.path / "batch.safetensors")

    @cached_property
    def golden(self) -> dict[str, np.ndarray]:
        return _load(self.path / "golden.safetensors")


def list_cases(root: Path = FIXTURES_DIR) -> list[Case]:
    return [Case(p.parent) for p in sorted(root.glob("*/case.json"))]


def find_case(name: str, root: Path = FIXTURES_DIR) -> Case:
    case = Case(root / name)
    if not (case.path / "case.json").exists():
        known = ", ".join(c.name for c in list_cases(root)) or "none"
        raise CaseError(f"no fixture named {name!r} in {root} (known: {known})")
    return case
