"""Errors a user's fixture or checkpoint can raise: the CLI reports each as bad input (exit 2)."""


class CaseError(ValueError):
    """A fixture folder that is absent, incomplete or unreadable."""


class FixtureError(RuntimeError):
    """A fixture or checkpoint that cannot be built, cut or verified."""
