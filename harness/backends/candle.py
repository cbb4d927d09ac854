"""The candle port (rust/parity-candle) through its adapter binary on the parity-adapter kit: a second Rust
port, on another framework's kernels and autograd, audited exactly as a user's port would be (`candle-bin`).
`candle-bin:INJECTION` starts it with one of its porting bugs (rust/parity-candle/src/inject.rs)."""

from __future__ import annotations

import shlex
from pathlib import Path

from .external import DEFAULT_TIMEOUT_S, ExternalBackend

# injection -> (stage that must catch it, expected diagnosis, a fixture that exposes it)
CANDLE_INJECTIONS = {
    "no_shift": ("shifted_slices", "labels_not_shifted", "gqa_padded"),
    "rope_interleaved": ("isolated_forward", "rope_pairing", "gqa_padded"),
    "gqa_tiled": ("isolated_forward", "gqa_head_mapping", "gqa_padded"),
    "norm_eps_fixed": ("isolated_forward", "rmsnorm_eps", "small_eps_bias"),
    "bias_correction_flipped": ("isolated_optimizer", "bias_correction", "gqa_padded"),
    "clip_per_tensor": ("isolated_optimizer", "clipping_per_tensor", "clip_accum_warmup"),
}
CANDLE_BINARY = Path(__file__).resolve().parents[2] / "rust" / "target" / "release" / "parity-candle-adapter"


class CandleBinaryBackend(ExternalBackend):
    precisions = ("float32",)  # it answers a bfloat16 request unsupported, and fails those fixtures saying so

    def __init__(self, inject: str | None = None, timeout: float = DEFAULT_TIMEOUT_S):
        command = shlex.quote(str(CANDLE_BINARY)) + (f" --inject {shlex.quote(inject)}" if inject else "")
        super().__init__(command, timeout=timeout, name="candle-bin" + (f":{inject}" if inject else ""))

    def unavailable(self) -> str | None:
        if CANDLE_BINARY.exists():
            return None
        return f"the candle adapter binary ({CANDLE_BINARY.name}) is not built: run `make rust`"
