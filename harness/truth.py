"""The float64 truth a verdict rests on, as a fixture stores it (harness/fixtures/truth.py builds it).

For every float tensor of the goldens it stores the truth as its offset from the golden,
`offset.<name>` = truth - golden in float32 (the offset is the reference's own rounding error, so
float32 keeps it to 7 digits at half the size of float64 truth). For the optimizer and
trajectory outputs it also stores `sens.<name>`: how far the float64 update moves when every gradient
moves by the gradient stage's own bound (run once with +bound, once with -bound, the larger change
kept). That is the conditioning of each element: an Adam update whose gradient is at noise level (or
analytically zero) moves by up to lr, one with a large gradient hardly at all. A port whose gradients
pass may therefore differ there by that much, and no more (harness/tolerances.py). And for every float
tensor `spread.<name>`: the reference's own error measured again on inputs moved by an ulp, the largest of
several such runs at each element (harness/fixtures/spread.py), stored in one byte per element, rounded
up (`store_spread`); older fixtures have none.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

TRUTH_FILE = "truth.safetensors"
JUDGED_PREFIXES = ("forward.", "loss.", "grad.", "optimizer.", "trajectory.", "isolated.")


def needs_truth(name: str, golden: np.ndarray) -> bool:
    """Computed float tensors are judged against the truth; integers and the shifted slices are exact."""
    return name.startswith(JUDGED_PREFIXES) and np.issubdtype(golden.dtype, np.floating)


SPREAD_STEPS = 8  # codes per octave: a stored spread is at most 2^(1/8) (9 %) above the measured one


def store_spread(name: str, spread: np.ndarray) -> dict[str, np.ndarray]:
    """A tensor's spread (finite, >= 0) in one byte per element: `spread.<name>` = k, the whole octave-eighths
    below the tensor's largest spread `spread_scale.<name>` (float32, rounded up), so that the stored value
    scale · 2^(-k/8) is never below the measured one; k stops at 255 (2.5e-10 of the largest: far below
    every bound's floors)."""
    s = np.asarray(spread, np.float64)
    top = float(s.max(initial=0.0))
    scale = np.float32(top)
    if float(scale) < top:  # compared in float64 (a Python float next to a float32 would be rounded to it)
        scale = np.nextafter(scale, np.float32(np.inf))
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.floor(-SPREAD_STEPS * np.log2(s / float(scale))) if scale > 0 else np.full(s.shape, 255.0)
    codes = np.asarray(np.clip(np.nan_to_num(k, nan=255.0, posinf=255.0), 0, 255), np.uint8)
    return {f"spread.{name}": codes, f"spread_scale.{name}": np.asarray(scale, np.float32)}


def read_spread(codes: np.ndarray, scale) -> np.ndarray:
    return float(scale) * np.exp2(-np.asarray(codes, np.float64) / SPREAD_STEPS)


class Truth(Mapping):
    """`truth.<name>` (float64, golden + offset, made when read and not kept: a real model's truth would
    double the goldens' memory in float64), `sens.<name>` and `spread.<name>`, from a stored truth file."""

    def __init__(self, stored: dict[str, np.ndarray], golden: dict[str, np.ndarray]):
        self._offset = {
            f"truth.{k.removeprefix('offset.')}": v
            for k, v in stored.items()
            if k.startswith("offset.") and k.removeprefix("offset.") in golden
        }
        self._sens = {k: v for k, v in stored.items() if k.startswith("sens.")}
        self._spread = {
            k: (v, stored[f"spread_scale.{k.removeprefix('spread.')}"])
            for k, v in stored.items()
            if k.startswith("spread.")
        }
        self._golden = golden

    def __getitem__(self, key: str) -> np.ndarray:
        if key in self._sens:
            return self._sens[key]
        if key in self._spread:
            return read_spread(*self._spread[key])
        return self._golden[key.removeprefix("truth.")].astype(np.float64) + self._offset[key]

    def __iter__(self):
        return iter([*self._offset, *self._sens, *self._spread])

    def __len__(self) -> int:
        return len(self._offset) + len(self._sens) + len(self._spread)

    def __or__(self, other: Mapping) -> dict:
        return dict(self) | dict(other)
