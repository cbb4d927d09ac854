"""The protocol's JSON Schemas (schema/*.json, versioned with the protocol): what a request holds and
what a port's `<stage>.json` may say. The client validates both, so a port learns of a malformed answer
from the message, not from a wrong verdict."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from jsonschema import Draft202012Validator

SCHEMA_DIR = Path(__file__).parent / "schema"


@cache
def validator(name: str) -> Draft202012Validator:
    schema = json.loads((SCHEMA_DIR / f"{name}.json").read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def problems(name: str, instance) -> list[str]:
    """Every way `instance` breaks schema `name`, as `at <path>: <message>`, first by position."""
    errors = sorted(validator(name).iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    return [f"at {'/'.join(map(str, e.absolute_path)) or 'top level'}: {e.message}" for e in errors]
