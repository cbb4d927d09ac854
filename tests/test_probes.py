"""The forward's structure from the port's own outputs on probe batches (harness/probes.py): causal, rows
apart, ordered. Named only where the port's outputs show it, for any weights; never for a correct forward."""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from mlx_parity.harness.backends import get_backend
from mlx_parity.harness.backends.mutants import MUTANTS, Mutant, MutantBackend, _attention_class
from mlx_parity.harness.probes import probe_forward
from mlx_parity.reference.model import Attention

from .conftest import CASES


class _NoRope(Attention):
    """Attention without RoPE: nothing tells it the tokens' order."""

    def __call__(self, x):
        q, k, v = self.project(x)
        return self.o_proj(self.mix(self.probs(self.scores(q, k)), v))


class _RowsRolled(Attention):
    """Each row's queries read the keys and values of the next row of the batch."""

    def kv_for_queries(self, kv):
        return mx.roll(super().kv_for_queries(kv), 1, axis=0)


def _mutant(name, attention) -> MutantBackend:
    return MutantBackend(Mutant(name, name, "forward", (), "", model_hook=_attention_class(attention)))


@pytest.mark.parametrize("backend, fixture", [("mlx", "gqa_padded"), ("torch", "qwen3"), ("mlx", "bf16_lora")])
def test_a_correct_forward_shows_nothing(backend, fixture):
    assert probe_forward(get_backend(backend), CASES[fixture]) == []


@pytest.mark.parametrize(
    "backend, expected",
    [
        (MutantBackend(MUTANTS["causal_mask_flipped"]), ["causal_mask"]),
        (_mutant("no_rope", _NoRope), ["position_blind"]),
        # row 0 reads row 1's keys, so swapping its own tokens changes nothing: the control says it does not
        # see them, and no order is concluded
        (_mutant("rows_rolled", _RowsRolled), ["batch_rows_mixed"]),
    ],
    ids=["causal_mask_flipped", "no_rope", "rows_rolled"],
)
def test_each_broken_fact_is_named_from_the_port_s_outputs_alone(backend, expected):
    found = probe_forward(backend, CASES["gqa_padded"])
    assert [d.code for d in found] == expected, [d.summary for d in found]
    assert all("probe batch" in d.summary or "batch rows" in d.summary for d in found)


class _Drawn:
    """A forward that computes with other numbers on every call: the correct forward's outputs, each call
    scaled by its own random factor (`per_row`: each row by its own, as dropout left on would)."""

    def __init__(self, backend, per_row: bool):
        self.backend, self.per_row, self.rng = backend, per_row, np.random.default_rng(0)

    def run(self, case, stages):
        out = self.backend.run(case, stages)["forward"]
        rows = out.tensors["forward.logits"].shape[0] if self.per_row else 1
        factor = 1 + self.rng.uniform(0.1, 0.5, size=(rows, 1, 1))
        return {"forward": replace(out, tensors={k: v * factor.astype(v.dtype) for k, v in out.tensors.items()})}


def test_a_correct_forward_with_other_numbers_on_every_call_shows_nothing():
    # compared across calls, every probe would differ: only rows of one call are compared
    assert probe_forward(_Drawn(get_backend("mlx"), per_row=False), CASES["gqa_padded"]) == []


def test_a_call_whose_identical_rows_differ_concludes_nothing():
    # a flipped mask, but rows of one call that differ at random (dropout left on) prove nothing about it
    drawn = _Drawn(MutantBackend(MUTANTS["causal_mask_flipped"]), per_row=True)
    assert probe_forward(drawn, CASES["gqa_padded"]) == []
    fixed = _Drawn(MutantBackend(MUTANTS["causal_mask_flipped"]), per_row=False)
    assert [d.code for d in probe_forward(fixed, CASES["gqa_padded"])] == ["causal_mask"]
