# The two entry points of the README. Both create .venv in the repository root and install everything.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: setup audit test train fixtures verify

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

audit: setup  ## the main job: audit every backend on every bundled fixture
	.venv/bin/parity audit --json out.json

test: setup  ## the whole test suite
	$(PY) -m pytest -q

train: setup
	.venv/bin/parity train

fixtures: setup
	.venv/bin/parity fixtures generate

verify: setup
	.venv/bin/parity fixtures verify
