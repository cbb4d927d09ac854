#!/usr/bin/env bash
# Unit tests of the Rust crates (no maturin): rust/test.sh [cargo test args...]
# The test binaries link libpython (pyo3 without `extension-module`) and libmlx (rpath from build.rs).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${PARITY_VENV:-$(dirname "$HERE")/.venv}"
[ -d "$HOME/.cargo/bin" ] && PATH="$HOME/.cargo/bin:$PATH"
# Same environment as build.sh, so cargo does not rebuild mlx-sys between the two.
export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH" PARITY_PYTHON="$VENV/bin/python" PYO3_PYTHON="$VENV/bin/python"
LIBPY="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR") or "")')"
export LD_LIBRARY_PATH="$LIBPY${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cd "$HERE"
exec cargo test --release "$@"
