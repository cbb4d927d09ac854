"""The independent PyTorch twin as a backend: in float32 an audited port like any other, in float64 the
truth that verdicts rest on (harness/fixtures/truth.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import twin_data_parallel
from ..device import current
from ..torch_twin import TwinTrainer
from .base import TrainerBackend, TrainerSession, python_module


class TorchSession(TrainerSession):
    def __init__(self, trainer, report: dict, grad_offset=None):
        super().__init__(trainer, report)
        self.precision = np.float64 if trainer.dtype == torch.float64 else np.float32
        trainer.grad_offset = grad_offset

    def to_numpy(self, x) -> np.ndarray:
        """bfloat16 (which numpy lacks) as the float32 holding its values exactly."""
        x = x.detach().cpu()
        return np.array((x.float() if x.dtype == torch.bfloat16 else x).numpy(), order="C")

    def forward(self, input_ids):
        logits, hidden = self.t.forward(input_ids)
        return self.to_numpy(logits), [self.to_numpy(h) for h in hidden]

    def shifted(self, input_ids, attention_mask):
        ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64))
        mask = torch.as_tensor(np.asarray(attention_mask, dtype=np.float32))
        return ids[:, 1:].cpu().numpy().astype(np.int32), mask[:, 1:].cpu().numpy()


def on_device(trainer: TwinTrainer) -> TwinTrainer:
    """The twin's model and AdamW state on this process's device (`harness/device.py`): on a GPU,
    tensors read from safetensors files (LoRA adapters, a checkpoint's moments) start on the CPU."""

    if current().name == "gpu":
        trainer.model.to("cuda")  # moves each Parameter's data in place: the trainable set keeps its references
        trainer.m = {k: v.to("cuda") for k, v in trainer.m.items()}
        trainer.v = {k: v.to("cuda") for k, v in trainer.v.items()}
    return trainer


class TorchBackend(TrainerBackend):
    name = "torch"

    def __init__(self, dtype: torch.dtype = torch.float32, grad_offset=None):
        """`grad_offset` (by parameter name) is added to the gradient of every update; a list of them, one per
        update in turn: float64 only."""
        self.dtype = dtype
        offsets = None if grad_offset is None else [grad_offset] if isinstance(grad_offset, dict) else list(grad_offset)
        self.grad_offset = (
            None if offsets is None else [{k: torch.as_tensor(v, dtype=dtype) for k, v in o.items()} for o in offsets]
        )
        if dtype != torch.float32:
            self.name = f"torch-{str(dtype).removeprefix('torch.')}"
        else:  # the twin's rank trains in its own precision only
            self.ranks = python_module("torch", "mlx_parity.harness.twin_data_parallel")

    def open(self, case, strict: bool = True) -> TorchSession:
        trainer, report = TwinTrainer.from_pretrained(
            case.checkpoint, case.settings, case.lora_init, strict=strict, dtype=self.dtype
        )
        return TorchSession(on_device(trainer), report.to_dict(), self.grad_offset)

    def resume(self, case, path: Path) -> TorchSession:
        return TorchSession(on_device(TwinTrainer.load_checkpoint(path)), {}, self.grad_offset)

    def rank_outputs(self, case):
        if self.ranks is None:
            return super().rank_outputs(case)
        dist.init_process_group("gloo")  # torchrun's environment: none is an error
        try:  # the twin's step reduces over the initialised group
            outputs = twin_data_parallel.run(
                case.checkpoint, case.batch, case.settings, case.settings.steps, case.lora_init
            )
            return dist.get_rank(), outputs
        finally:
            dist.destroy_process_group()

    @property
    def nondeterministic(self) -> bool:
        """On a GPU the checkpoint stage measures the run-to-run spread (`harness/tolerances.py` judges by it)."""
        return current().nondeterministic
