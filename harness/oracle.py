"""Hugging Face transformers' own model class for the checkpoint's model_type (LlamaForCausalLM,
MistralForCausalLM, Qwen2ForCausalLM) as a third, trusted forward oracle."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .compare import TensorResult, compare
from .tolerances import stage_rms, tolerance


def transformers_forward(checkpoint: Path, input_ids: np.ndarray, precision: str = "float32") -> dict[str, np.ndarray]:
    """Logits and the residual stream after layers 0..L-2 (transformers' last hidden state is normed), with
    the model loaded in the training precision's dtype (bfloat16: `dtype=torch.bfloat16`, as users load it)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()

    model = AutoModelForCausalLM.from_pretrained(
        str(checkpoint), attn_implementation="eager", dtype=getattr(torch, precision)
    )
    model.eval()
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(input_ids, dtype=np.int64)), output_hidden_states=True)
    # hidden_states[0] is the embedding output, [i + 1] the output of layer i, the last one is normed.
    result = {"forward.logits": out.logits.float().numpy()}
    result.update({f"forward.hidden.{i}": h.float().numpy() for i, h in enumerate(out.hidden_states[1:-1])})
    return result


def check_forward(
    checkpoint: Path,
    input_ids: np.ndarray,
    mask: np.ndarray,
    reference: dict[str, np.ndarray],
    truth: dict[str, np.ndarray],
    precision: str = "float32",
) -> list[TensorResult]:
    """Judge transformers' forward pass as a port: against the float64 truth, at the forward stage's
    bound set by the reference's own error in `precision`, at real (unpadded) tokens."""
    tol = tolerance("forward", precision)
    m = mask.astype(bool)[..., None]
    rms = stage_rms((reference[k], truth[k], m) for k in reference)
    return [
        compare(name, value, reference[name], tol, truth=truth[name], stage_rms=rms, mask=m)
        for name, value in transformers_forward(checkpoint, input_ids, precision).items()
    ]
