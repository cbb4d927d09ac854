"""The independent PyTorch twin as a backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..torch_twin import TwinTrainer
from .base import TrainerBackend, TrainerSession


class TorchSession(TrainerSession):
    def to_numpy(self, x) -> np.ndarray:
        return np.array(x.detach().numpy(), order="C")

    def forward(self, input_ids):
        logits, hidden = self.t.forward(input_ids)
        return logits.numpy(), [h.numpy() for h in hidden]

    def shifted(self, input_ids, attention_mask):
        ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64))
        mask = torch.as_tensor(np.asarray(attention_mask, dtype=np.float32))
        return ids[:, 1:].numpy().astype(np.int32), mask[:, 1:].numpy()


class TorchBackend(TrainerBackend):
    name = "torch"

    def open(self, case, strict: bool = True) -> TorchSession:
        trainer, report = TwinTrainer.from_pretrained(case.checkpoint, case.settings, case.lora_init, strict=strict)
        return TorchSession(trainer, report.to_dict())

    def resume(self, case, path: Path) -> TorchSession:
        return TorchSession(TwinTrainer.load_checkpoint(path), {})
