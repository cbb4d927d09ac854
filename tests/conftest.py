"""Shared fixtures: the bundled cases and audit results computed once per session."""

from __future__ import annotations

import functools

import pytest

from mlx_parity.harness.audit import audit
from mlx_parity.harness.backends import get_backend
from mlx_parity.harness.case import list_cases

CASES = {c.name: c for c in list_cases()}


@functools.cache
def audited(backend: str, fixture: str):
    return audit(get_backend(backend), CASES[fixture])


@pytest.fixture(params=sorted(CASES), ids=sorted(CASES))
def case(request):
    return CASES[request.param]
