"""The parity harness: backends, stages, tolerances, comparison, fixtures, audit and CLI."""
