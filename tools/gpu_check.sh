#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (under 9 minutes in one call), in five sections:
#   tests      the GPU-marked tests (pytest -m gpu)                        -> gpu_tests.xml
#   model      training step of whole ~1B Neon models, bf16, every variant
#              and once with sliding_window 1024 (tools/benchmark_model.py) -> benchmark_model.{txt,json}
#   attention  Neon's windowed kernel against SDPA with a mask, seq 4096
#              and 8192, window 1024 (tools/benchmark_attention.py)         -> benchmark_attention.{txt,json}
#   io         a FlamingMoE store IO function's step against store size 1e4-1e6 with the exact
#              search, which runs on the GPU when the keys fit (tools/benchmark_flaming_io.py)
#              -> benchmark_flaming_io.txt
#   cp         activation memory and step time per GPU at sequence 8K-32K, CP=1 against CP=2 where
#              two GPUs are visible (CP=1 only on one: tools/benchmark_context_parallel.py)
#              -> benchmark_context_parallel.txt
# That machine has no network, a Python 3.12 with its own CUDA torch and Triton, and no
# Transformer Engine; megatron-core travels as a wheel in .whl/ (git-ignored).
#
#   here, once (needs the package index):   bash tools/gpu_check.sh fetch
#   there (device tool, carry [".whl"]):    bash tools/gpu_check.sh
#   one section again:                      bash tools/gpu_check.sh --only model
#   here, on the CPU (tiny sizes, same code): bash tools/gpu_check.sh --dry-run
#
# Each section runs under its own timeout (TESTS_TIMEOUT, MODEL_TIMEOUT, ATTENTION_TIMEOUT, IO_TIMEOUT,
# CP_TIMEOUT seconds) and writes its files to $OUT as soon as it finishes; gpu_check.log holds everything
# the card and versions too (8 files, the device tool's limit). Exit status 0 only when every
# section run succeeds. PEAK_TFLOPS overrides the card's dense bf16 peak; MODEL_ARGS and
# ATTENTION_ARGS add benchmark options (e.g. MODEL_ARGS="--layers 8").
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(megatron-core==0.16.1)
SECTIONS=(tests model attention io cp)
PYTHON=${PYTHON:-python3}

usage() {
    echo "usage: bash tools/gpu_check.sh [fetch | [--dry-run] [--only SECTION]]  (SECTION: ${SECTIONS[*]})" >&2
    exit 2
}

fetch_wheels() {
    mkdir -p .whl
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    ls -l .whl
}

dry_run=0
only=""
while (($#)); do
    case "$1" in
        fetch) fetch_wheels; exit 0 ;;
        --dry-run) dry_run=1 ;;
        --only) [[ $# -ge 2 ]] || usage; only=$2; shift ;;
        *) usage ;;
    esac
    shift
done
if [[ -n "$only" && " ${SECTIONS[*]} " != *" $only "* ]]; then
    echo "gpu_check: --only $only is not a section; choose one of: ${SECTIONS[*]}" >&2
    exit 2
fi

OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*"; }
export PYTHONUNBUFFERED=1

if ((dry_run)); then
    # the CPU: this checkout's Python and megatron-core, tiny sizes, short timeouts
    : "${TESTS_TIMEOUT:=120}" "${MODEL_TIMEOUT:=240}" "${ATTENTION_TIMEOUT:=240}" "${IO_TIMEOUT:=120}"
    : "${CP_TIMEOUT:=240}"
    cp_procs=2
    cp_opts=(--seq 64 128 --steps 1)
    io_opts=(--entries 1000 --indexes exact ivf_flat --nprobe 4 --queries 20 --tokens 16 --hidden 32 --key-dim 16
             --vocab 256 --repeats 1)
    preset=tiny
    model_opts=(--steps 2 --warmup 1)
    attention_opts=()
    export CUDA_VISIBLE_DEVICES=""  # the CPU path even where a GPU is visible
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    log "dry run on the CPU (tiny sizes) with $PYTHON, results in $OUT"
else
    : "${TESTS_TIMEOUT:=110}" "${MODEL_TIMEOUT:=150}" "${ATTENTION_TIMEOUT:=80}" "${IO_TIMEOUT:=45}"
    : "${CP_TIMEOUT:=90}"
    gpus=$(nvidia-smi --list-gpus | wc -l)
    if ((gpus >= 2)); then cp_procs=2; cp_opts=(--cp 1 2); else cp_procs=1; cp_opts=(--cp 1); fi
    cp_opts+=(--seq 8192 16384 32768 --steps 2)
    io_opts=(--entries 10000 100000 1000000 --indexes exact --tokens 1024 --repeats 2 --work-dir /tmp)
    preset=gpu
    model_opts=(--steps 5 --warmup 2)
    attention_opts=()
    if ! compgen -G ".whl/*.whl" > /dev/null; then
        log "no wheels in .whl/: run 'bash tools/gpu_check.sh fetch' here and carry .whl"
        exit 2
    fi
    wheels=(.whl/*.whl)
    log "installing ${wheels[*]} into /tmp/site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "${wheels[@]}"
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1)
    case "$name" in  # dense bf16 peak, TFLOP/s (the datasheet's; KINDS.md measured ~790 on an H200)
        *H100*|*H200*) peak=989 ;;
        *A100*) peak=312 ;;
        *L40S*) peak=362 ;;
        *) peak="" ;;
    esac
    peak=${PEAK_TFLOPS:-$peak}
    [[ -n "$peak" ]] && model_opts+=(--peak-tflops "$peak")
fi
"$PYTHON" -c "import neon, torch, megatron.core as m; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'megatron-core', m.__version__, 'device',
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"

# shellcheck disable=SC2206  # MODEL_ARGS / ATTENTION_ARGS are lists of options on purpose
model_opts+=(${MODEL_ARGS:-})
# shellcheck disable=SC2206
attention_opts+=(${ATTENTION_ARGS:-})

section_tests() {
    mapfile -t gpu_tests < <(grep -rl --include='test_*.py' "pytest.mark.gpu" tests | sort)
    log "pytest -m gpu on ${#gpu_tests[@]} files: ${gpu_tests[*]}"
    ((${#gpu_tests[@]})) || return 1
    timeout "$TESTS_TIMEOUT" "$PYTHON" -m pytest -q -rs -m gpu -p no:cacheprovider \
        --junitxml="$OUT/gpu_tests.xml" "${gpu_tests[@]}"
}

section_model() {
    timeout "$MODEL_TIMEOUT" "$PYTHON" tools/benchmark_model.py --preset "$preset" "${model_opts[@]}" \
        --json "$OUT/benchmark_model.json" | tee "$OUT/benchmark_model.txt"
}

section_attention() {
    timeout "$ATTENTION_TIMEOUT" "$PYTHON" tools/benchmark_attention.py --preset "$preset" \
        "${attention_opts[@]}" --json "$OUT/benchmark_attention.json" | tee "$OUT/benchmark_attention.txt"
}

section_io() {
    timeout "$IO_TIMEOUT" "$PYTHON" tools/benchmark_flaming_io.py "${io_opts[@]}" | tee "$OUT/benchmark_flaming_io.txt"
}

section_cp() {
    timeout "$CP_TIMEOUT" "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$cp_procs" \
        tools/benchmark_context_parallel.py "${cp_opts[@]}" | tee "$OUT/benchmark_context_parallel.txt"
}

run_section() {
    case "$1" in
        tests) section_tests ;;
        model) section_model ;;
        attention) section_attention ;;
        io) section_io ;;
        cp) section_cp ;;
    esac
}

status=0
for section in "${SECTIONS[@]}"; do
    [[ -z "$only" || "$only" == "$section" ]] || continue
    log "section $section"
    if run_section "$section"; then
        log "section $section: ok"
    else
        log "section $section: FAILED (exit $?)"
        status=1
    fi
done
log "done, status $status"
exit "$status"
