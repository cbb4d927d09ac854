"""data_parallel: why N ranks did not train as one process. Each hypothesis of the family (gradients summed,
not reduced, clipped per rank, one shard read by all, ranks weighted by tokens, the step counted per rank) is
re-computed with the reference from every shard's own gradient, and named only when it reproduces each rank's
first update (its moments, its step, and in float32 its Δθ) while the contract does not.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map, tree_unflatten

from mlx_parity.reference.trainer import Trainer, split_batch

from ..tolerances import HYPOTHESIS_RTOL
from .core import Diagnosis, f64

# How close a re-computed moment must come to a rank's: the hypothesis test's relative match in float32; in
# bfloat16 one spacing of the dtype at the tensor's scale, the rounding of the one store the two may differ by.
REPRODUCE_RTOL = {"float32": HYPOTHESIS_RTOL, "bfloat16": 2.0**-7}

CAUSES = {
    "summed": ("dp_gradients_summed", "the gradients are all-summed across the {n} ranks and not divided by {n}"),
    "not_reduced": ("dp_gradients_not_reduced", "each rank steps on its own share's gradient: there is no all-reduce"),
    "clip_per_rank": ("dp_clip_per_rank", "each rank clips its own gradient by its own norm before the all-reduce"),
    "same_shard": ("dp_same_shard", "every rank trains on rank 0's share of each micro-batch"),
    "token_weighted": ("dp_token_weighted", "the ranks' gradients are weighted by their real tokens {tokens}"),
    "step_per_rank": ("dp_step_per_rank", "the optimizer's step counter advances by {n} per update"),
}


def data_parallel(result, out, case) -> list[Diagnosis] | None:
    """`out.tensors`: every rank's outputs as `rank<r>.<name>`; `case`: the one process the ranks must equal."""
    world = int(out.meta["world"])
    ranks = [_rank(out.tensors, r) for r in range(world)]
    if any("optimizer.m." not in " ".join(r) for r in ranks):
        return None  # no moments to re-compute against
    first = _first_updates(case, world)
    rtol = REPRODUCE_RTOL.get(case.settings.precision, REPRODUCE_RTOL["bfloat16"])
    exact = case.settings.precision == "float32"

    def reproduces(h: str) -> bool:
        return all(_same(ranks[r], first[h][r], rtol, exact) for r in range(world))

    if reproduces("contract"):
        return None  # the first update is the one process's: what differs comes later (localised)
    tokens = first["tokens"]
    return [
        Diagnosis(
            code,
            summary.format(n=world, tokens=tokens),
            {"world_size": world, "hypothesis": h, "re_computed": "from each shard's gradient", "tokens": tokens},
        )
        for h, (code, summary) in CAUSES.items()
        if reproduces(h)
    ] or None


def _rank(tensors: dict, r: int) -> dict:
    prefix = f"rank{r}."
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _same(port: dict, expected: dict, rtol: float, with_delta: bool) -> bool:
    """The rank's first update is the hypothesis's: step exactly, moments (and in float32 Δθ) within `rtol`."""
    if int(np.asarray(port.get("optimizer.step", -1))) != expected["optimizer.step"]:
        return False
    for k, e in expected.items():
        if k == "optimizer.step" or (k.startswith("optimizer.delta.") and not with_delta):
            continue
        a = port.get(k)
        if a is None or np.shape(a) != np.shape(e) or not np.isfinite(a).all():
            return False
        scale = float(np.abs(e).max(initial=0.0))
        if np.abs(f64(a) - f64(e)).max(initial=0.0) > rtol * scale + 1e-12:
            return False
    return True


def _first_updates(case, world: int) -> dict:
    """Per hypothesis, what each rank holds after the first update: `optimizer.delta.*`, `optimizer.m.*`,
    `optimizer.v.*` and `optimizer.step`; and `tokens`, each rank's real target tokens."""
    s = case.settings
    per_rank = s.accum_steps // world  # the ranks' own micro-batches; the one process has world × as many
    shards = split_batch(case.batch, s.accum_steps)  # in order: micro-batch a's share r is shard a·world + r
    one = dataclasses.replace(s, accum_steps=1)
    trainer = _fresh(case, one)
    g, tokens = [], [0] * world
    for i, shard in enumerate(shards):
        g.append(trainer.gradients(shard)[1])
        tokens[i % world] += int(np.asarray(shard["attention_mask"])[:, 1:].sum())
    mean = [_mean([g[a * world + r] for a in range(per_rank)]) for r in range(world)]  # each rank's, as it sums
    total = _sum(mean)
    weighted = _sum([tree_map(lambda x, n=n: x * n, m) for m, n in zip(mean, tokens, strict=True)])
    clip = trainer.clip  # the settings' global-norm clipping (identity without clip_norm)
    every = {
        "contract": clip(_divided(total, world)),
        "summed": clip(total),
        "clip_per_rank": _divided(_sum([clip(m) for m in mean]), world),
        "same_shard": clip(mean[0]),
        "token_weighted": clip(_divided(weighted, sum(tokens))),
    }
    first = {h: [_update(case, one, grads)] * world for h, grads in every.items()}
    first["not_reduced"] = [_update(case, one, clip(m)) for m in mean]
    first["step_per_rank"] = [_update(case, one, every["contract"], step=world)] * world
    first["tokens"] = tokens
    return first


def _fresh(case, settings) -> Trainer:
    return Trainer.from_pretrained(case.checkpoint, settings, case.lora_init, strict=False)[0]


def _mean(grads: list[dict]) -> dict:
    total = _sum(grads)
    return total if len(grads) == 1 else _divided(total, len(grads))


def _sum(grads: list[dict]) -> dict:
    total = grads[0]
    for g in grads[1:]:
        total = {k: total[k] + g[k] for k in total}
    return total


def _divided(grads: dict, c: float) -> dict:
    return {k: v / c for k, v in grads.items()}


def _update(case, settings, grads: dict, step: int = 1) -> dict:
    """One AdamW update of a fresh load with `grads` (already clipped), its step counted as `step`."""
    t = _fresh(case, settings)
    names = t.trainable_names()
    before = {k: np.array(v.astype(mx.float32)) for k, v in t.parameters().items() if k in names}
    if step != 1:
        t.optimizer.state["step"] = t.optimizer.state["step"] + step - 1
    t.apply(tree_unflatten(list(grads.items())))
    after, state = t.parameters(), t.optimizer_state()
    out = {f"optimizer.delta.{k}": np.array(after[k].astype(mx.float32)) - v for k, v in before.items()}
    out |= {f"optimizer.{m}.{k}": np.array(v.astype(mx.float32)) for m in ("m", "v") for k, v in state[m].items()}
    out["optimizer.step"] = state["step"]
    return out
