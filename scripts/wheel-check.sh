#!/usr/bin/env bash
# The real install: build the wheel, install it into a fresh venv without the twin extra (no torch, no
# transformers), and from outside the repository audit the bundled fixtures and a port through the
# protocol (the example adapter the wheel ships), then check that a buggy port still fails.
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "wheel-check: $*" >&2; exit 1; }
log() { echo "[wheel-check] $*" >&2; }

# ngsolve-openblas's OpenBLAS needs libgfortran.so.5: in .venv torch's wheel brings one, without torch the
# system must (Debian libgfortran5), or MLX falls back to its slow bundled BLAS.
if ! ldconfig -p | grep -q 'libgfortran\.so\.5 '; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    log "apt-get install libgfortran5"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libgfortran5 >/dev/null
fi

out=build/wheel-check
rm -rf "$out" && mkdir -p "$out"
log "building the wheel"
.venv/bin/python -m pip wheel --no-deps --quiet -w "$out/dist" . 2>/dev/null || die "the wheel did not build"
python3 -m venv "$out/venv"
log "installing $(basename "$out"/dist/*.whl) into a fresh venv"
"$out/venv/bin/python" -m pip install --quiet "$out"/dist/*.whl
cd "$out"  # away from the repository, whose folders must not stand in for the installed package
py="$PWD/venv/bin/python" parity="$PWD/venv/bin/parity"
"$py" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("torch") is not None or u.find_spec("transformers") is not None)' \
    || die "torch or transformers was installed without the twin extra"
"$py" -c 'import mlx_parity.harness, sys; sys.exit("site-packages" not in mlx_parity.harness.__file__)' || die "not the installed package"
log "parity audit -b mlx (every bundled fixture)"
"$parity" audit -b mlx --json audit-mlx.json | tail -2
adapter="$py -m mlx_parity.examples.reference_adapter"
log "parity audit of a port through the protocol: the shipped example adapter"
"$parity" audit -b "cmd:$adapter" -f qwen3 -f bf16_checkpoint -f lora | tail -1
log "a buggy port fails, named"
set +e
"$parity" audit -b "cmd:$adapter --mutant no_shift" -f gqa_padded > mutant.txt
rc=$?
set -e
[ "$rc" -eq 1 ] || die "the mutant's audit exited $rc, expected 1"
grep -q "labels_not_shifted" mutant.txt || die "the mutant's bug was not named"
"$parity" audit -b torch -f head > torch.txt 2>&1 && die "-b torch ran without torch installed"
grep -q "pip install 'mlx-parity\[twin\]'" torch.txt || die "-b torch without torch did not say how to install it"
log "ok: the wheel audits a port with neither torch nor transformers installed"
