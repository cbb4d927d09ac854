"""The mlx-rs port (`rust/`, the `parity_mlx_rs` extension) as a backend.

`mlx-rs` runs each stage in its own process through `mlx_parity.harness.protocol.server`, with the same time limit as a
`cmd:` port, so a crash in Rust code is that stage's finding, not the audit's end. `mlx-rs:INJECTION`
runs the port with one of its built-in porting bugs switched on (the seed's four "before" failures).
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from .base import TrainerBackend, TrainerSession
from .external import DEFAULT_TIMEOUT_S, ExternalBackend

# injection -> (stage that must catch it, expected diagnosis, fixtures that expose it)
RUST_INJECTIONS = {
    "weights_not_loaded": ("weight_mapping", "weights_not_loaded", ("gqa_padded",)),
    "no_shift": ("shifted_slices", "labels_not_shifted", ("gqa_padded",)),
    "forward_only": ("gradients", "zero_gradients", ("gqa_padded",)),
    "optimizer_disconnected": ("optimizer", "optimizer_not_connected", ("gqa_padded",)),
}
NOT_BUILT = "the mlx-rs extension (parity_mlx_rs) is not built: run `make rust`"
ADAPTER_BINARY = Path(__file__).resolve().parents[2] / "rust" / "target" / "release" / "parity-mlx-rs-adapter"


def extension_built() -> bool:
    return importlib.util.find_spec("parity_mlx_rs") is not None


class MlxRsSession(TrainerSession):
    def to_numpy(self, x) -> np.ndarray:
        return np.array(x, order="C")

    def forward(self, input_ids):
        logits, hidden = self.t.forward(np.ascontiguousarray(input_ids, dtype=np.int32))
        return logits, list(hidden)

    def pieces(self, input_ids, given):
        """Every piece of the forward pass ({name: float32 array}), each from the given values of its
        inputs (`harness/pieces.py`); `given=None` gives the port's own chain."""
        if given is not None:
            given = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in given.items()}
        out = self.t.pieces(np.ascontiguousarray(input_ids, dtype=np.int32), given)
        return {k: np.asarray(v) for k, v in out.items()}

    def shifted(self, input_ids, attention_mask):
        return self.t.shifted(
            np.ascontiguousarray(input_ids, dtype=np.int32), np.ascontiguousarray(attention_mask, dtype=np.int32)
        )


class MlxRsInProcess(TrainerBackend):
    """The extension in this process (what `mlx_parity.harness.protocol.server` serves to the isolated backend)."""

    def __init__(self, inject: str | None = None):
        self.inject = inject
        self.name = "mlx-rs" + (f":{inject}" if inject else "")

    def unavailable(self) -> str | None:
        return None if extension_built() else NOT_BUILT

    def open(self, case, strict: bool = True) -> MlxRsSession:
        import parity_mlx_rs

        settings = dict(case.settings_dict)
        if self.inject:
            settings["inject"] = self.inject
        lora = str(case.lora_init) if case.lora_init else None
        trainer = parity_mlx_rs.Trainer(str(case.checkpoint), json.dumps(settings), lora, strict)
        return MlxRsSession(trainer, dict(trainer.load_report()))

    def resume(self, case, path: Path) -> MlxRsSession:
        import parity_mlx_rs

        return MlxRsSession(parity_mlx_rs.Trainer.from_checkpoint(str(path)), {})


class MlxRsBinaryBackend(ExternalBackend):
    """The port's own Rust adapter binary (rust/parity-mlx-rs/src/bin, on the parity-adapter kit):
    the protocol exactly as a Rust port author runs it, no Python in the port's process."""

    def __init__(self, inject: str | None = None, timeout: float = DEFAULT_TIMEOUT_S):
        command = shlex.quote(str(ADAPTER_BINARY)) + (f" --inject {shlex.quote(inject)}" if inject else "")
        super().__init__(command, timeout=timeout, name="mlx-rs-bin" + (f":{inject}" if inject else ""))

    def unavailable(self) -> str | None:
        return (
            None
            if ADAPTER_BINARY.exists()
            else f"the mlx-rs adapter binary ({ADAPTER_BINARY.name}) is not built: run `make rust`"
        )


class MlxRsBackend(ExternalBackend):
    """The extension, one isolated process per stage."""

    def __init__(self, inject: str | None = None, timeout: float = DEFAULT_TIMEOUT_S):
        name = "mlx-rs" + (f":{inject}" if inject else "")
        super().__init__(
            f"{shlex.quote(sys.executable)} -m mlx_parity.harness.protocol.server {name}", timeout=timeout, name=name
        )

    def unavailable(self) -> str | None:
        return None if extension_built() else NOT_BUILT
