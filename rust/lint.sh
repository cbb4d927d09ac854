#!/usr/bin/env bash
# Lint the Rust workspace: rustfmt (rustfmt.toml) and clippy with warnings as errors, over every target
# (libraries, binaries, tests, examples) and every feature that has code behind it.
#
#   rust/lint.sh         # from anywhere; PARITY_VENV overrides the venv (default <repo>/.venv)
#
# Runs in the environment rust/test.sh sets up (same variables as build.sh), so cargo reuses mlx-sys's
# build instead of compiling mlx-c again. mlx-sys's own features (accelerate, metal) are no-ops kept for
# mlx-rs's manifest; turning them on would only rebuild mlx-c, so the features named are parity-mlx-rs's:
# extension-module (which includes python) and adapter. Exits non-zero on any finding.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${PARITY_VENV:-$(dirname "$HERE")/.venv}"
[ -d "$HOME/.cargo/bin" ] && PATH="$HOME/.cargo/bin:$PATH"
export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH" PARITY_PYTHON="$VENV/bin/python" PYO3_PYTHON="$VENV/bin/python"
cd "$HERE"
cargo fmt --all --check
cargo clippy --release --workspace --all-targets --features parity-mlx-rs/extension-module,parity-mlx-rs/adapter \
    -- -D warnings
