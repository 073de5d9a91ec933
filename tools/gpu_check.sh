#!/usr/bin/env bash
# One prepared check for a lent GPU machine: the GPU-marked tests, then the layer benchmark in
# bf16 with MFU. That machine has no network, a Python 3.12 with its own CUDA torch, and no
# Transformer Engine; megatron-core travels as a wheel in .whl/ (git-ignored).
#
#   here, once (needs the package index):   bash tools/gpu_check.sh fetch
#   there (device tool, carry [".whl"]):    bash tools/gpu_check.sh
#
# Results land in $OUT (the device tool brings that folder back): gpu_check.log (everything),
# gpu.txt (the card), gpu_tests.xml (JUnit), benchmark_gpu.txt. Exit status 0 only when the
# tests and the benchmark both succeed. PEAK_TFLOPS overrides the card's dense bf16 peak;
# BENCH_ARGS adds benchmark options (e.g. "--seq 8192").
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(megatron-core==0.16.1)
PYTHON=${PYTHON:-python3}

if [[ "${1:-}" == "fetch" ]]; then
    mkdir -p .whl
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    ls -l .whl
    exit 0
fi

OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*"; }

if ! compgen -G ".whl/*.whl" > /dev/null; then
    log "no wheels in .whl/: run 'bash tools/gpu_check.sh fetch' here and carry .whl"
    exit 2
fi
wheels=(.whl/*.whl)
log "installing ${wheels[*]} into /tmp/site"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "${wheels[@]}"
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
"$PYTHON" -c "import torch, megatron.core as m; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'megatron-core', m.__version__, 'device',
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')" | tee -a "$OUT/gpu.txt"

name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1)
case "$name" in  # dense bf16 peak, TFLOP/s
    *H100*|*H200*) peak=989 ;;
    *A100*) peak=312 ;;
    *L40S*) peak=362 ;;
    *) peak="" ;;
esac
peak=${PEAK_TFLOPS:-$peak}

status=0
mapfile -t gpu_tests < <(grep -rl --include='test_*.py' "pytest.mark.gpu" tests | sort)
log "pytest -m gpu on ${#gpu_tests[@]} files: ${gpu_tests[*]}"
if ((${#gpu_tests[@]})); then
    timeout 300 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" \
        "${gpu_tests[@]}" || status=1
fi

log "benchmark (bf16, MFU against ${peak:-unknown} TFLOP/s)"
bench=(tools/benchmark_layers.py --device cuda --dtype bf16 --preset gpu --steps 10 --warmup 3)
[[ -n "$peak" ]] && bench+=(--peak-tflops "$peak")
# shellcheck disable=SC2206  # BENCH_ARGS is a list of options on purpose
bench+=(${BENCH_ARGS:-})
timeout 300 "$PYTHON" "${bench[@]}" | tee "$OUT/benchmark_gpu.txt" || status=1

log "done, status $status"
exit "$status"
