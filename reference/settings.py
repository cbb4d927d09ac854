"""Trainer settings: the JSON every backend receives (docs/training-step.md), parsed and checked once."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .loss import LossSettings
from .precision import PRECISIONS

TRAINABLE_SETS = ("full", "lora", "head")


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class OptimizerSettings:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    bias_correction: bool = True  # the PyTorch convention; MLX's own AdamW defaults to False

    def __post_init__(self):
        b1, b2 = self.betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise SettingsError(f"betas must be in [0, 1), got {self.betas}")
        if self.lr < 0 or self.eps < 0 or self.weight_decay < 0:
            raise SettingsError("lr, eps and weight_decay must be >= 0")


@dataclass(frozen=True)
class ScheduleSettings:
    kind: str = "constant"  # or "warmup_cosine"
    warmup_steps: int = 0
    warmup_init: float = 0.0
    decay_steps: int = 1
    end_lr: float = 0.0

    def __post_init__(self):
        if self.kind not in ("constant", "warmup_cosine"):
            raise SettingsError(f"schedule.kind must be 'constant' or 'warmup_cosine', got {self.kind!r}")
        if self.warmup_steps < 0 or self.decay_steps < 1:
            raise SettingsError("schedule needs warmup_steps >= 0 and decay_steps >= 1")


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 4
    layers: int = 1
    scale: float = 2.0


@dataclass(frozen=True)
class TrainSettings:
    trainable: str = "full"
    lora: LoraSettings = field(default_factory=LoraSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    clip_norm: float | None = None
    accum_steps: int = 1
    loss: LossSettings = field(default_factory=LossSettings)
    steps: int = 4
    checkpoint_at: int = 2
    precision: str = "float32"  # or "bfloat16": mlx-lm's training of a bfloat16 model (reference/precision.py)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise SettingsError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.trainable not in TRAINABLE_SETS:
            raise SettingsError(f"trainable must be one of {TRAINABLE_SETS}, got {self.trainable!r}")
        if self.accum_steps < 1:
            raise SettingsError(f"accum_steps must be >= 1, got {self.accum_steps}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise SettingsError(f"clip_norm must be > 0 or null, got {self.clip_norm}")
        if not 0 < self.checkpoint_at < self.steps:
            raise SettingsError(
                f"checkpoint_at must be in 1..steps-1, got {self.checkpoint_at} with steps={self.steps}"
            )

    @classmethod
    def from_dict(cls, d: dict) -> TrainSettings:
        known = {
            "trainable",
            "lora",
            "optimizer",
            "schedule",
            "clip_norm",
            "accum_steps",
            "loss",
            "steps",
            "checkpoint_at",
            "precision",
        }
        unknown = set(d) - known
        if unknown:
            raise SettingsError(f"unknown settings keys: {sorted(unknown)}")
        try:
            opt = dict(d.get("optimizer", {}))
            if "betas" in opt:
                opt["betas"] = tuple(opt["betas"])
            return cls(
                trainable=d.get("trainable", "full"),
                lora=LoraSettings(**d.get("lora", {})),
                optimizer=OptimizerSettings(**opt),
                schedule=ScheduleSettings(**d.get("schedule", {})),
                clip_norm=d.get("clip_norm"),
                accum_steps=int(d.get("accum_steps", 1)),
                loss=LossSettings.from_dict(d.get("loss", {})),
                steps=int(d.get("steps", 4)),
                checkpoint_at=int(d.get("checkpoint_at", 2)),
                precision=d.get("precision", "float32"),
            )
        except TypeError as e:
            raise SettingsError(f"bad settings: {e}") from None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["loss"] = {"alpha": self.loss.alpha, "lambda": self.loss.lam}
        d["optimizer"]["betas"] = list(self.optimizer.betas)
        if self.precision == "float32":  # the default stays unsaid: float32 settings read as they always have
            del d["precision"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
