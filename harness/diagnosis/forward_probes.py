"""forward, without the port's weights: what the port's own forward does to inputs built to show structure.

A port whose forward cannot be re-computed (it initialises unseeded, or answers only the eight stages) still
answers the forward stage on any batch. Three facts hold for every Llama-family forward whatever its weights,
and each shows in the port's outputs for rows of one batch, so that they hold even for a port that draws new
weights on every call, and even where it mixes batch rows (rows that share a token everywhere a causal
position looks stay alike whatever row another one reads):
- causal: two rows that differ only in their last token agree at every earlier position;
- rows apart: two identical rows agree, whatever row stands between them;
- ordered: in a row a, b, a, b, … a position-blind attention gives position 3 what it gives position 1 (the
  same token over the same proportions of a and b), while RoPE rotates the two apart.
A first call with three identical rows must give three identical rows, or the call itself is random (dropout
left on) and nothing is concluded. Where two calls of one batch agree, a fourth fact is checked across calls:
changing the first token changes later positions (a mask that lets each position see only itself).
A fact is named broken only when the difference is far above rounding (`CHANGED`) where it must be nothing
(`SAME`), or nothing where it must change; anything between is no finding.
"""

from __future__ import annotations

import numpy as np

from .core import Diagnosis, f64

SAME = 1e-5  # relative to the outputs' scale: what identical inputs computed in one batch may differ by
CHANGED = 1e-2  # a difference no rounding of float32 or bfloat16 at these sizes reaches
# A structural fact of the port's own forward holds whatever weights it loaded: no upstream failure explains it
# (harness/findings.py reports it as a finding of its own).
OWN = {"from_port_inputs": True}
OUTPUTS = ("forward.hidden.", "forward.logits")
FIRST_LAYER = ("forward.hidden.0",)


def probe_rows(case) -> tuple[np.ndarray, np.ndarray]:
    """Two unpadded rows of the case's own tokens, as long as its longest real row."""
    ids, mask = case.batch["input_ids"], case.batch["attention_mask"]
    lengths = mask.sum(axis=1)
    t = int(lengths.max())
    x = ids[int(lengths.argmax())][:t]
    y = np.roll(ids[(int(lengths.argmax()) + 1) % len(ids)][:t], 1) if len(ids) > 1 else np.roll(x, 1)
    if np.array_equal(x, y):
        y = np.roll(x, 1)
    return x.astype(np.int32), y.astype(np.int32)


def other_token(x: np.ndarray, i: int) -> int:
    """A token of the row that is not x[i] (so it is in the vocabulary the case uses)."""
    return int(next(v for v in x if v != x[i]))


def batch_of(rows: list[np.ndarray], case) -> dict[str, np.ndarray]:
    n, t = len(rows), len(rows[0])
    take = np.arange(n) % len(case.batch["auth_weight"])
    return {
        "input_ids": np.stack(rows).astype(np.int32),
        "attention_mask": np.ones((n, t), np.int32),
        "auth_weight": case.batch["auth_weight"][take],
        "prov_entropy": case.batch["prov_entropy"][take],
    }


def probe_batches(case) -> dict[str, dict] | None:
    """The probe batches, by name; None when the case's rows are too short (fewer than 4 tokens) or have a
    single distinct token."""
    x, y = probe_rows(case)
    if len(x) < 4 or len(set(x.tolist())) < 2:
        return None
    last, first = x.copy(), x.copy()
    last[-1], first[0] = other_token(x, -1), other_token(x, 0)
    periodic = np.resize(np.array([x[0], other_token(x, 0)], np.int32), len(x))
    rows = {
        "same": [x, x, x],  # in one call identical rows agree, or the call is random
        "again": [x, x, x],  # the same batch again: whether calls are reproducible
        "first": [first, first, first],  # across calls, where reproducible: token 0 changed
        "last": [x, last, last],  # rows that differ only in their last token
        "rows": [x, y, x],  # two identical rows with another between them
        "periodic": [periodic, periodic],
    }
    return {name: batch_of(r, case) for name, r in rows.items()}


def _outputs(out, names) -> list[np.ndarray]:
    return [f64(v) for k, v in sorted(out.tensors.items()) if k.startswith(names)]


def rows_differ(out, r: int, s: int, positions, names=OUTPUTS) -> float:
    """The largest difference between rows r and s of one output at `positions`, over row r's scale there."""
    worst = 0.0
    for v in _outputs(out, names):
        u, w = v[r][positions], v[s][positions]
        scale = float(np.abs(u).max(initial=0.0))
        if scale > 0:
            worst = max(worst, float(np.abs(u - w).max()) / scale)
    return worst


def calls_differ(a, b, positions) -> float:
    """The largest difference of row 0 at `positions` between two calls' outputs, over its scale there."""
    worst = 0.0
    for u, v in zip(_outputs(a, OUTPUTS), _outputs(b, OUTPUTS), strict=True):
        u, v = u[0][positions], v[0][positions]
        scale = float(np.abs(u).max(initial=0.0))
        if scale > 0:
            worst = max(worst, float(np.abs(u - v).max()) / scale)
    return worst


def positions_differ(out, i: int, j: int) -> float:
    """How far apart positions i and j of row 0 are after the first layer, over position i's scale."""
    h = _outputs(out, FIRST_LAYER)[0][0]
    return float(np.abs(h[i] - h[j]).max()) / max(float(np.abs(h[i]).max()), 1e-300)


def random_call(outs: dict) -> float | None:
    """How far three identical rows of one call are apart; None when they agree (the call is not random)."""
    t = outs["same"].tensors["forward.logits"].shape[1]
    spread = max(rows_differ(outs["same"], 0, r, list(range(t))) for r in (1, 2))
    return spread if spread >= SAME else None


def findings(outs: dict) -> list[Diagnosis]:
    """The causes the probe batches' outputs show (`outs` by `probe_batches`' names)."""
    t = outs["same"].tensors["forward.logits"].shape[1]
    before_last, after_first = list(range(t - 1)), list(range(1, t))
    future = rows_differ(outs["last"], 0, 1, before_last)
    reproducible = calls_differ(outs["same"], outs["again"], list(range(t))) < SAME
    past = calls_differ(outs["same"], outs["first"], after_first) if reproducible else None
    found = []
    evidence = {"changed_by_last_token": future, "changed_by_first_token": past, "probe_tokens": t} | OWN
    if future > CHANGED:
        seen = "" if past is None else ", and the ones before" if past > CHANGED else ", but not the ones before"
        found.append(
            Diagnosis(
                "causal_mask",
                f"two rows of one batch that differ only in their last token differ at earlier positions (by up "
                f"to {future:.2g} of their scale): positions see the tokens after them{seen} (the port's own "
                "forward on a probe batch)",
                evidence,
            )
        )
    elif past is not None and past < SAME and future < SAME:
        found.append(
            Diagnosis(
                "causal_mask",
                "changing the first token changes no later position: each position sees only itself "
                "(the port's own forward on a probe batch)",
                evidence,
            )
        )
    mixed = rows_differ(outs["rows"], 0, 2, list(range(t)))
    if mixed > CHANGED:
        found.append(
            Diagnosis(
                "batch_rows_mixed",
                f"two identical rows of one batch, with another row between them, differ ({mixed:.2g} of their "
                "scale): a row's forward depends on the other rows (a reshape or repeat across the batch axis, "
                "such as kv heads repeated over the batch) (the port's own forward on a probe batch)",
                {"identical_rows_differ_by": mixed} | OWN,
            )
        )
    blind = _position_blind(outs["periodic"], t)
    return found + ([blind] if blind else [])


def _position_blind(out, t: int) -> Diagnosis | None:
    """In a row a, b, a, b, …, positions 1 and 3 (or, for a port whose positions look ahead, t−2 and t−4) see
    the same token over the same proportions of a and b: without RoPE they agree after the first layer. The
    control, positions 0 and 2 (t−1 and t−3), must differ: those positions do see the other token."""
    for same, control in (((1, 3), (0, 2)), ((t - 2, t - 4), (t - 1, t - 3))):
        moved = positions_differ(out, *same)
        if moved < SAME and positions_differ(out, *control) > CHANGED:
            return Diagnosis(
                "position_blind",
                f"in a row a, b, a, b, … positions {same[0]} and {same[1]} agree after the first layer "
                f"({moved:.2g} of their scale), though they stand at other distances from the tokens they see: "
                "attention ignores token order, so RoPE does not rotate by position (not applied, or along "
                "another axis) (the port's own forward on a probe batch)",
                {"positions": list(same), "apart_by": moved} | OWN,
            )
    return None
