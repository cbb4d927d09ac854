#!/usr/bin/env bash
# Sets up a Linux CUDA machine that reaches no package registry to run `parity audit --device gpu` and
# `parity bench --device gpu` from a copy of this working tree (docs/gpu.md).
#
#   bash scripts/gpu/setup.sh pack [PARTS]   here (with a registry): download mlx, mlx-cuda-13 (the project's
#                                            pin) and jsonschema's wheels, unpack them into one folder, xz it
#                                            and split it into PARTS folders .gpuwheel1/ … (git-ignored through
#                                            .git/info/exclude) to carry one per transfer when a transfer is
#                                            size-limited; PARTS defaults to 8 (the
#                                            tracked tree is ~51 MiB of a 64 MiB transfer).
#   bash scripts/gpu/setup.sh                there: keep the parts this copy of the tree carries (in
#                                            $GPU_PARTS, /tmp/parity-gpu-parts by default), and once every
#                                            part has arrived, join and unpack them into $GPU_SITE
#                                            (/tmp/parity-gpu) and write $GPU_SITE/env.sh. Then
#                                              source /tmp/parity-gpu/env.sh && parity audit --device gpu
#
# What the machine must already have: Python 3.12 with a CUDA build of torch, numpy, safetensors, typer and
# rich, and the NVIDIA CUDA 13 wheels' libraries (cuBLAS, cuDNN, NVRTC, cuFFT, NCCL, the runtime) under some
# site-packages/nvidia/, which libmlx.so finds through its RPATH ($ORIGIN/../../nvidia/...): a link to that
# folder is made beside the unpacked mlx.
set -euo pipefail

MLX_VERSION=0.32.2
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
GPU_PARTS="${GPU_PARTS:-/tmp/parity-gpu-parts}"
GPU_SITE="${GPU_SITE:-/tmp/parity-gpu}"
PY="${PYTHON:-python3}"
case "$PY" in /*) ;; */*) PY="$PWD/$PY" ;; esac  # the parity wrapper runs from anywhere

pack() {
    local parts="${1:-8}" work
    work="$(mktemp -d)"
    grep -qx '/.gpuwheel\*/' "$REPO/.git/info/exclude" 2>/dev/null || { mkdir -p "$REPO/.git/info"; echo '/.gpuwheel*/' >>"$REPO/.git/info/exclude"; }
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$work/whl" "mlx==$MLX_VERSION" "mlx-cuda-13==$MLX_VERSION" \
        jsonschema attrs referencing rpds-py jsonschema-specifications
    mkdir -p "$work/site"
    for w in "$work"/whl/*.whl; do "$PY" -m zipfile -e "$w" "$work/site"; done
    tar -C "$work/site" -cf - . | xz -9 -T0 >"$work/site.tar.xz"
    rm -rf "$REPO"/.gpuwheel*/
    local size chunk
    size=$(stat -c %s "$work/site.tar.xz")
    chunk=$(( (size + parts - 1) / parts ))
    split -b "$chunk" -d -a 1 "$work/site.tar.xz" "$work/part."
    local i=1 sum
    sum=$(sha256sum "$work/site.tar.xz" | cut -d' ' -f1)
    for p in "$work"/part.*; do
        mkdir -p "$REPO/.gpuwheel$i"
        mv "$p" "$REPO/.gpuwheel$i/site.tar.xz.$(printf %d $((i - 1)))"
        printf 'parts=%d\nsha256=%s\nmlx=%s\n' "$parts" "$sum" "$MLX_VERSION" >"$REPO/.gpuwheel$i/MANIFEST"
        i=$((i + 1))
    done
    rm -rf "$work"
    ls -l "$REPO"/.gpuwheel*/
    echo "carry one of .gpuwheel1 … .gpuwheel$parts per transfer; run 'bash scripts/gpu/setup.sh' there after each"
}

install() {
    mkdir -p "$GPU_PARTS"
    local d
    for d in "$REPO"/.gpuwheel*/; do
        [ -d "$d" ] || continue
        cp -f "$d"/site.tar.xz.* "$d"/MANIFEST "$GPU_PARTS"/ 2>/dev/null || true
    done
    if [ -f "$GPU_SITE/env.sh" ]; then
        view
        echo "ready: source $GPU_SITE/env.sh"
        return 0
    fi
    [ -f "$GPU_PARTS/MANIFEST" ] || { echo "no wheel parts yet: carry .gpuwheel1 … (bash scripts/gpu/setup.sh pack, here)"; return 3; }
    # shellcheck disable=SC1091
    . "$GPU_PARTS/MANIFEST"
    local have
    have=$(ls "$GPU_PARTS"/site.tar.xz.* 2>/dev/null | wc -l)
    if [ "$have" -lt "$parts" ]; then
        echo "have $have of $parts wheel parts in $GPU_PARTS: carry the others (.gpuwheelN) in the next call"
        return 3
    fi
    cat $(ls "$GPU_PARTS"/site.tar.xz.* | sort -t. -k4 -n) >"$GPU_PARTS/site.tar.xz"
    echo "$sha256  $GPU_PARTS/site.tar.xz" | sha256sum -c --quiet - || { echo "the joined parts do not match the manifest"; return 4; }
    rm -rf "$GPU_SITE" && mkdir -p "$GPU_SITE/site"
    xz -dc "$GPU_PARTS/site.tar.xz" | tar -C "$GPU_SITE/site" -xf -
    rm -f "$GPU_PARTS/site.tar.xz"
    local nvidia
    nvidia="$("$PY" - <<'EOF'
import importlib.util, pathlib
for name in ("nvidia.cublas", "nvidia.cuda_nvrtc", "nvidia.cudnn", "nvidia"):
    spec = importlib.util.find_spec(name)
    if spec and spec.submodule_search_locations:
        p = pathlib.Path(list(spec.submodule_search_locations)[0])
        print(p if name == "nvidia" else p.parent)
        break
EOF
)"
    [ -n "$nvidia" ] || { echo "no site-packages/nvidia/ (the CUDA 13 libraries) for $PY"; return 5; }
    ln -sfn "$nvidia" "$GPU_SITE/site/nvidia"
    view
    {
        echo "export PYTHONPATH=\"$GPU_SITE/pkg:$GPU_SITE/site\${PYTHONPATH:+:\$PYTHONPATH}\""
        echo "export PATH=\"$GPU_SITE/bin:\$PATH\""
        # GPU matmuls never use the CPU BLAS; the search for a fast one (reference/blas.py) is skipped.
        echo "export PARITY_BLAS=\${PARITY_BLAS:-off}"
    } >"$GPU_SITE/env.sh"
    echo "installed mlx $mlx (CUDA) into $GPU_SITE/site, nvidia -> $nvidia"
    echo "ready: source $GPU_SITE/env.sh"
}

view() {
    # The package as pyproject.toml maps it (mlx_parity.harness = harness/, …), pointing at this tree.
    rm -rf "$GPU_SITE/pkg" && mkdir -p "$GPU_SITE/pkg/mlx_parity" "$GPU_SITE/bin"
    cp "$REPO/mlx_parity/__init__.py" "$GPU_SITE/pkg/mlx_parity/"
    local part
    for part in harness reference fixtures examples bench; do ln -s "$REPO/$part" "$GPU_SITE/pkg/mlx_parity/$part"; done
    printf '#!/bin/sh\nexec %s -P -m mlx_parity.harness.cli "$@"\n' "$PY" >"$GPU_SITE/bin/parity"
    chmod +x "$GPU_SITE/bin/parity"
}

case "${1:-install}" in
    pack) shift; pack "$@" ;;
    install) install ;;
    *) echo "usage: $0 [pack [PARTS] | install]" >&2; exit 2 ;;
esac
