#!/usr/bin/env bash
# Every check and timing that needs a GPU, as ONE prepared run for a lent device (about 8 minutes on an
# H100/H200; each step has its own time limit, so one that hangs costs only its share):
#
#   (device tool)  bash bench/gpu_session.sh            # results under $OUT (the tool's), else outputs/bench/gpu
#   SMOKE=1 bash bench/gpu_session.sh                   # the same plumbing on CPU, tiny shapes (a minute)
#
#  1. install the checkout without its dependencies (the device image has torch and triton; this maps
#     kernels/routing/ to resampling_forcing.kernels)
#  2. the kernel tests on CUDA (tests/test_kernels.py with the interpreter off): bf16/fp16 kernels ==
#     the references, the auto path's choice
#  3. bench/kernels.py: correctness in bf16 + timings at the Wan2.1-1.3B shape, coherent and random picks,
#     the torch path, the auto path, and the fit of attention.backends.TORCH_PATH_SLOWDOWN (last line)
#  4. bench/routed_attention.py: one routed call vs dense SDPA at 4680 tokens, random/coherent/mixed
#  5. bench/rollout.py: 40-chunk rollouts at 1.3B width (2 blocks, 480x832, 3-frame chunks), dense vs top-5
#     (random and replayed trained picks) vs sink 1 + window 4, bf16
#  6. bench/kv_offload.py: the bounded KV cache on CUDA (pinned host copies), bit-identity and bytes
# Each step's JSON and a log land in $OUT; docs/benchmarks.md says where each table goes. Exit status:
# the number of steps that failed (0 = all ran and passed their checks).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/bench/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
failed=0
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, count failures
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

if [ "$SMOKE" = 1 ]; then
    export TRITON_INTERPRET=1
    step kernels 300 "$PY" bench/kernels.py --smoke --out "$OUT/kernels.json"
    step routed_attention 300 "$PY" bench/routed_attention.py --threads 1 --heads 2 --tokens 64 --history 6,10 \
        --k 1,5 --pattern random,coherent --repeats 1 --out "$OUT/routed_attention.json"
    step rollout 300 "$PY" bench/rollout.py --presets tiny --latent 8x8 --chunks 8 --steps 1 --cfg 1 --threads 1 \
        --modes dense,topk2,replay2,sink1+window2 --replay assets/ablation/ar_0.6 --vae none \
        --out "$OUT/rollout.json"
    exit "$failed"
fi

export TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
step install 120 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
step tests_cuda 150 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_kernels.py
step kernels 240 "$PY" bench/kernels.py --histories 5,20,40 --methods select,triton,dense_sdpa,torch,auto \
    --out "$OUT/kernels.json"
step routed_attention 90 "$PY" bench/routed_attention.py --device cuda --dtype bf16 --heads 12 --tokens 4680 \
    --history 6,10,20,40 --k 1,5 --pattern random,coherent,mixed --out "$OUT/routed_attention.json"
step rollout 150 "$PY" bench/rollout.py --device cuda --dtype bf16 --presets wan2.1-t2v-1.3b --layers 2 \
    --latent 60x104 --chunk-frames 3 --chunks 40 --steps 1 --cfg 1 --vae none \
    --modes dense,topk5,replay5,sink1+window4 --replay assets/ablation/ar_0.6 --out "$OUT/rollout.json"
step kv_offload 90 "$PY" bench/kv_offload.py --device cuda --checkpoint assets/tiny-pretrained --chunks 8,32 \
    --resident 2 --out "$OUT/kv_offload.json"
echo "steps failed: $failed"
exit "$failed"
