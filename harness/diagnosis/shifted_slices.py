"""shifted_slices: targets and masks, solved from the port's numbers."""

from __future__ import annotations

import numpy as np

from .core import Diagnosis


def shifted(result, out, case) -> Diagnosis | None:
    ids, mask = case.batch["input_ids"], case.batch["attention_mask"]
    targets = out.tensors.get("shifted.targets")
    if targets is not None and targets.shape == ids.shape and np.array_equal(targets, ids):
        return Diagnosis(
            "labels_not_shifted",
            "targets are the input tokens themselves, not the next tokens: each position predicts its own token",
            {"targets_shape": list(targets.shape), "expected_shape": [ids.shape[0], ids.shape[1] - 1]},
        )
    if (
        targets is not None
        and targets.shape == (ids.shape[0], ids.shape[1] - 1)
        and np.array_equal(targets, ids[:, :-1])
    ):
        return Diagnosis(
            "labels_not_shifted", "targets are input_ids[:, :-1]: each position predicts its own token", {}
        )
    m = out.tensors.get("shifted.mask")
    if m is not None and m.shape == (ids.shape[0], ids.shape[1] - 1) and m.sum() > mask[:, 1:].sum():
        return Diagnosis(
            "padding_counted",
            "the target mask covers padding positions",
            {"masked_targets": int(m.sum()), "expected": int(mask[:, 1:].sum())},
        )
    return None
