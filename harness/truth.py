"""The float64 truth a verdict rests on, as a fixture stores it (harness/fixtures/truth.py builds it).

For every float tensor of the goldens it stores the truth as its offset from the golden,
`offset.<name>` = truth - golden in float32 (the offset is the reference's own rounding error, so
float32 keeps it to 7 digits at half the size of float64 truth). For the optimizer and
trajectory outputs it also stores `sens.<name>`: how far the float64 update moves when every gradient
moves by the gradient stage's own bound (run once with +bound, once with -bound, the larger change
kept). That is the conditioning of each element: an Adam update whose gradient is at noise level (or
analytically zero) moves by up to lr, one with a large gradient hardly at all. A port whose gradients
pass may therefore differ there by that much, and no more (harness/tolerances.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

TRUTH_FILE = "truth.safetensors"
JUDGED_PREFIXES = ("forward.", "loss.", "grad.", "optimizer.", "trajectory.", "isolated.")


def needs_truth(name: str, golden: np.ndarray) -> bool:
    """Computed float tensors are judged against the truth; integers and the shifted slices are exact."""
    return name.startswith(JUDGED_PREFIXES) and np.issubdtype(golden.dtype, np.floating)


class Truth(Mapping):
    """`truth.<name>` (float64, golden + offset, made when read and not kept: a real model's truth would
    double the goldens' memory in float64) and `sens.<name>`, from a stored truth file."""

    def __init__(self, stored: dict[str, np.ndarray], golden: dict[str, np.ndarray]):
        self._offset = {
            f"truth.{k.removeprefix('offset.')}": v
            for k, v in stored.items()
            if k.startswith("offset.") and k.removeprefix("offset.") in golden
        }
        self._sens = {k: v for k, v in stored.items() if k.startswith("sens.")}
        self._golden = golden

    def __getitem__(self, key: str) -> np.ndarray:
        if key in self._sens:
            return self._sens[key]
        return self._golden[key.removeprefix("truth.")].astype(np.float64) + self._offset[key]

    def __iter__(self):
        return iter([*self._offset, *self._sens])

    def __len__(self) -> int:
        return len(self._offset) + len(self._sens)

    def __or__(self, other: Mapping) -> dict:
        return dict(self) | dict(other)
