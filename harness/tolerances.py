"""Every tolerance of the harness, per dtype and stage, with the noise it covers and the bug it catches.

A tensor passes when `|actual - expected| <= atol + rtol * scale` holds for all but `outlier_fraction`
of its elements, where scale is `|expected|` elementwise (`elementwise`) or `max|expected|` over the
tensor (`tensor`: for gradients and updates, whose elements near zero carry no relative information).

Noise: the largest difference between the torch twin and the MLX reference over every bundled fixture,
relative to the same scale, measured by `python -m harness.calibrate` (see docs/tolerances.md).
Smallest bug: the smallest injected change that `tests/test_tolerances.py` shows the bound still fails.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    scale: str = "elementwise"  # or "tensor"
    outlier_fraction: float = 0.0
    noise: str = ""  # measured noise it covers
    catches: str = ""  # smallest real bug it still fails

    def describe(self) -> str:
        return f"rtol={self.rtol:g} atol={self.atol:g} ({self.scale})" + (
            f", {self.outlier_fraction:.2%} outliers" if self.outlier_fraction else ""
        )


EXACT = Tolerance(0.0, 0.0, noise="none: copies and integer data", catches="any change of any bit")

# (dtype, stage) -> tolerance. Only float32 is covered: no bundled fixture is in another dtype, and a
# tolerance without measured evidence would be a guess.
TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("float32", "weight_mapping"): EXACT,
    ("float32", "shifted_slices"): EXACT,
    ("float32", "forward"): Tolerance(
        rtol=1e-5, atol=1e-5,
        noise="max |Δ| 2.4e-6 on logits, 1.9e-6 on hidden states (torch twin vs MLX)",
        catches="RMSNorm eps 1e-5 read as 1e-6 (logit error ≈ 4e-4 relative)",
    ),
    ("float32", "loss"): Tolerance(
        rtol=1e-5, atol=1e-6,
        noise="max relative Δ 2.1e-7 on ce, distrust, total",
        catches="one padding token of 56 counted in the cross-entropy (≈ 1e-2 relative)",
    ),
    ("float32", "gradients"): Tolerance(
        rtol=1e-5, atol=1e-8, scale="tensor",
        noise="max |Δg| / max|g| 4.5e-7 per tensor",
        catches="RMSNorm eps 1e-5 read as 1e-6 (≥ 1e-3 of max|g|)",
    ),
    ("float32", "optimizer"): Tolerance(
        rtol=1e-4, atol=2.5e-7, scale="tensor", outlier_fraction=0.01,
        noise="max |Δ| / max|ref| 1.2e-6 on Δθ, m, v after one update",
        catches="AdamW eps 1e-8 read as 1e-7; lr off by 0.1 %",
    ),
    ("float32", "trajectory"): Tolerance(
        rtol=1e-3, atol=2.5e-7, scale="tensor", outlier_fraction=0.01,
        noise="max |Δ| / max|ref| 4e-5 after 4-6 updates (Adam amplifies tiny gradient differences)",
        catches="schedule read one step late; a missed update",
    ),
    ("float32", "checkpoint"): Tolerance(
        rtol=1e-3, atol=2.5e-7, scale="tensor", outlier_fraction=0.01,
        noise="as trajectory: the resumed run is compared with the golden trajectory",
        catches="lost optimizer state (m, v or step) on resume",
    ),
}

# A resumed run must equal the same backend's uninterrupted run bit for bit.
RESUME_SELF_CONSISTENCY = EXACT


def tolerance(stage: str, dtype: str = "float32") -> Tolerance:
    try:
        return TOLERANCES[(dtype, stage)]
    except KeyError:
        raise KeyError(f"no tolerance for stage {stage!r} in {dtype}: measure one before comparing") from None
