"""The reference MLX trainer: the source of truth every port is audited against.

Reads like mlx-lm: `config` (a Hugging Face config.json), `model` (the Llama module tree, named like the
checkpoint), `weights` (the checkpoint name map and strict loading), `loss` (shifted slices,
cross-entropy, the Empirical Distrust term), `schedule`, `trainer` (value_and_grad, clipping,
accumulation, AdamW, checkpoints) and `data` (the byte tokenizer and JSONL batches).
"""

from .blas import activate as _activate_blas  # first: a fast BLAS must be in place before mlx.core loads

_activate_blas()
