#!/usr/bin/env bash
# The GPU audit table and the GPU bench table of docs/gpu.md, on a CUDA machine, from this working tree:
#   bash scripts/gpu/reproduce.sh [audit|bench|all|mlx-rs] [OUTDIR]
# It runs scripts/gpu/setup.sh first (which needs every carried wheel part: see that script), then
#   parity audit --device gpu            (TF32 off: true float32, the stored float32 bounds)
#   parity audit --device gpu --tf32     (TF32 on: judged with the TF32 bound)
#   python3 -P scripts/gpu/mutants.py [--tf32]   (every mutant on its exposing fixtures, on the GPU)
#   parity bench --device gpu            (MLX-CUDA against torch-CUDA, 60M/250M/1B, fp32 TF32 off/on, bf16)
# writing their outputs, JSON and logs into OUTDIR (default: $OUT where set, else ./gpu-out).
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
what="${1:-all}"
dest="${2:-${OUT:-$REPO/gpu-out}}"
mkdir -p "$dest"
bash "$REPO/scripts/gpu/setup.sh" install || exit $?
# shellcheck disable=SC1091
. "${GPU_SITE:-/tmp/parity-gpu}/env.sh"
cd "$REPO"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$dest/machine.txt"
python3 -c "import mlx.core as mx, torch; print('mlx', mx.__version__, mx.default_device(), mx.is_available(mx.gpu), '| torch', torch.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$dest/machine.txt"
rc=0
if [ "$what" = audit ] || [ "$what" = all ]; then
    for mode in "" "--tf32"; do
        tag="audit-gpu${mode:+-tf32}"
        SECONDS=0
        parity audit --device gpu $mode --json "$dest/$tag.json" -v >"$dest/$tag.txt" 2>&1
        r=$?; [ $r -gt 1 ] && rc=$r
        echo "parity audit --device gpu $mode: exit $r in $SECONDS s" | tee -a "$dest/$tag.txt"
        grep -E "audits passed|^device:" "$dest/$tag.txt"
        gzip -f "$dest/$tag.json"
    done
    # every mutant on the fixtures built to expose it, the reference (and the bug) on the GPU: still caught?
    for mode in "" "--tf32"; do
        python3 -P scripts/gpu/mutants.py $mode >"$dest/mutants-gpu${mode:+-tf32}.txt" 2>&1
        tail -1 "$dest/mutants-gpu${mode:+-tf32}.txt"
    done
fi
if [ "$what" = mlx-rs ]; then
    # The mlx-rs port's adapter binary, built here against the CPU wheel's libmlx.so (rust/build.sh) and
    # carried, run against the CUDA wheel's libmlx.so of the same MLX version (identical headers): MLX's
    # default device is then the GPU. nvidia-smi's process list, sampled each second, shows whether it is.
    bin="$REPO/rust/target/release/parity-mlx-rs-adapter"
    [ -x "$bin" ] || { echo "no $bin: build it with rust/build.sh and carry it"; exit 3; }
    export LD_LIBRARY_PATH="${GPU_SITE:-/tmp/parity-gpu}/site/mlx/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" MLX_ENABLE_TF32=0
    (while sleep 0.5; do nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader; done) >"$dest/mlx-rs-gpu-processes.txt" 2>&1 &
    watcher=$!
    SECONDS=0
    parity audit -b mlx-rs-bin ${MLX_RS_FIXTURES:--f gqa_padded -f lora -f head -f trajectory_long} --json "$dest/mlx-rs-gpu.json" -v >"$dest/mlx-rs-gpu.txt" 2>&1
    r=$?
    kill $watcher 2>/dev/null
    echo "parity audit -b mlx-rs-bin (libmlx CUDA): exit $r in $SECONDS s" | tee -a "$dest/mlx-rs-gpu.txt"
    grep -E "audits passed" "$dest/mlx-rs-gpu.txt"
    echo "GPU processes seen: $(cut -d, -f2 "$dest/mlx-rs-gpu-processes.txt" | sort | uniq -c | tr '\n' ';')"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
    SECONDS=0
    parity bench --device gpu --json "$dest/bench-gpu.json" --report "$dest/bench-gpu.md" 2>&1 | tee "$dest/bench-gpu.txt"
    echo "parity bench --device gpu: exit ${PIPESTATUS[0]} in $SECONDS s" | tee -a "$dest/bench-gpu.txt"
fi
exit $rc
