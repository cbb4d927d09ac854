"""Shared fixtures: the bundled cases and audit results computed once per session."""

from __future__ import annotations

import functools

import pytest

from mlx_parity.harness.audit import audit, judge
from mlx_parity.harness.backends import get_backend
from mlx_parity.harness.case import list_cases
from mlx_parity.harness.stages import StageOutput

CASES = {c.name: c for c in list_cases()}


@functools.cache
def audited(backend: str, fixture: str):
    return audit(get_backend(backend), CASES[fixture])


@pytest.fixture(params=sorted(CASES), ids=sorted(CASES))
def case(request):
    return CASES[request.param]


def judge_with(case, stage: str, prefix: str, name: str, value):
    """Judge the reference's own goldens for one stage with one tensor replaced."""
    out = {k: v for k, v in case.golden.items() if k.startswith(prefix)}
    out[name] = value
    return judge(stage, StageOutput(out), case)
