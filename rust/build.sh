#!/usr/bin/env bash
# Build the mlx-rs port (Python extension `parity_mlx_rs`) and install it into the project's .venv,
# its protocol adapter binary (rust/target/release/parity-mlx-rs-adapter), and the candle port's
# (rust/target/release/parity-candle-adapter).
#
#   rust/build.sh            # from anywhere; PARITY_VENV overrides the venv (default <repo>/.venv)
#
# Needs: the venv with mlx[cpu]==0.32.2 (make setup), a Rust toolchain >= 1.85 (rustup), and the
# Debian packages cmake, libclang-dev, g++ and pkg-config, which this script installs with apt-get
# when they are missing. Network access is needed only for missing Debian packages and Rust crates.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
VENV="${PARITY_VENV:-$REPO/.venv}"

log() { printf '[rust/build.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# 1. Debian packages.
missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
dpkg -s libclang-dev >/dev/null 2>&1 || missing+=(libclang-dev)
if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null 2>&1 || die "need root or sudo to apt-get install ${missing[*]}"
        SUDO=sudo
    fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# 2. Rust toolchain (Debian 12's rustc 1.63 is too old for mlx-rs).
[ -d "$HOME/.cargo/bin" ] && PATH="$HOME/.cargo/bin:$PATH"
command -v cargo >/dev/null 2>&1 || die "cargo not found; install a Rust toolchain >= 1.85 with rustup"
rustc_minor="$(rustc --version | sed -E 's/^rustc 1\.([0-9]+).*/\1/')"
[ "$rustc_minor" -ge 85 ] 2>/dev/null || die "rustc $(rustc --version) is too old; mlx-rs needs >= 1.85"

# 3. The venv with the MLX wheel the build links against.
[ -x "$VENV/bin/python" ] || die "no virtual environment at $VENV (run 'make setup' first)"
"$VENV/bin/python" -c "import mlx.core" 2>/dev/null || die "$VENV has no mlx (pip install 'mlx[cpu]==0.32.2')"
if ! "$VENV/bin/python" -m maturin --version >/dev/null 2>&1; then
    log "installing maturin into $VENV"
    "$VENV/bin/python" -m pip install --quiet 'maturin>=1.5,<2'
fi

# 4. Build (mlx-sys's build.rs finds MLX through PARITY_PYTHON) and install into the venv.
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"
export PARITY_PYTHON="$VENV/bin/python"
export PYO3_PYTHON="$VENV/bin/python"
cd "$HERE/parity-mlx-rs"
log "maturin develop --release (first build compiles mlx-c: a few minutes)"
"$VENV/bin/python" -m maturin develop --release >&2

# 5. The same port as a protocol adapter binary on the parity-adapter kit (rust/target/release/).
cd "$HERE"
log "cargo build --release --bin parity-mlx-rs-adapter"
cargo build --release --quiet -p parity-mlx-rs --features adapter --bin parity-mlx-rs-adapter
"$HERE/target/release/parity-mlx-rs-adapter" 2>/dev/null && die "the adapter binary accepted no arguments"
log "cargo build --release --bin parity-candle-adapter (the candle port; its first build compiles candle: a few minutes)"
cargo build --release --quiet -p parity-candle --bin parity-candle-adapter
"$HERE/target/release/parity-candle-adapter" 2>/dev/null && die "the candle adapter binary accepted no arguments"

# 6. Smoke: the extension loads next to mlx.core and shares its MLX.
"$VENV/bin/python" - <<'PY'
import mlx.core as mx
import parity_mlx_rs
assert parity_mlx_rs.MLX_VERSION == mx.__version__, (parity_mlx_rs.MLX_VERSION, mx.__version__)
print(f"parity_mlx_rs OK: mlx-rs {parity_mlx_rs.MLX_RS_VERSION}, MLX {parity_mlx_rs.MLX_VERSION}, {parity_mlx_rs.__file__}")
PY
