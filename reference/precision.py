"""Training precisions: float32, and bfloat16 the way mlx-lm trains a bfloat16 model (docs/training-step.md).

Under bfloat16 every checkpoint tensor is a bfloat16 parameter and the forward runs in bfloat16; LoRA
adapters stay float32, the logits go to the loss in float32, and each gradient, AdamW moment and update
keeps its parameter's dtype. This module is the one place that knows which parameter has which dtype.
"""

from __future__ import annotations

import mlx.core as mx

PRECISIONS = ("float32", "bfloat16")
ADAPTER_SUFFIXES = (".lora_a", ".lora_b")


def model_dtype(precision: str) -> mx.Dtype:
    """The dtype of the checkpoint's parameters and of the forward pass."""
    return mx.bfloat16 if precision == "bfloat16" else mx.float32


def parameter_dtype(name: str, precision: str) -> str:
    """The dtype a trainable parameter is stored and updated in, by name: adapters are always float32."""
    return "float32" if name.endswith(ADAPTER_SUFFIXES) else precision
