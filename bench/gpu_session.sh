#!/usr/bin/env bash
# Every check and timing that needs a GPU, as ONE prepared run for a lent device (at most 9 minutes on an
# H100/H200: the step limits below add up to 530 s, under the device tool's 600 s per command):
#
#   (device tool)  bash bench/gpu_session.sh            # results under $OUT (the tool's), else outputs/bench/gpu
#   SMOKE=1 bash bench/gpu_session.sh                   # the same plumbing on CPU, tiny shapes (a minute)
#
# Most important first, so that a run cut short still has them (each step has its own time limit):
#  1. install the checkout without its dependencies (the device image has torch and triton; this maps
#     kernels/routing/ to resampling_forcing.kernels)
#  2. bench/kernels.py (docs/benchmarks.md section 4): correctness in bf16 + timings at the Wan2.1-1.3B
#     shape, coherent and random picks, the torch path, the auto path, and the fit of
#     attention.backends.TORCH_PATH_SLOWDOWN (last line); its JSON is rewritten after every history length
#  3. bench/routed_attention.py: one routed call vs dense SDPA at 4680 tokens, random/coherent/mixed
#  4. bench/rollout.py: 40-chunk rollouts at 1.3B width (2 blocks, 480x832, 3-frame chunks), dense vs top-5
#     (random and replayed trained picks) vs sink 1 + window 4, bf16
#  5. bench/kv_offload.py: the bounded KV cache on CUDA (pinned host copies), bit-identity and bytes
#  6. the kernel tests on CUDA (tests/test_kernels.py with the interpreter off, without test_bench_smoke,
#     which re-runs this script's CPU smoke mode): bf16/fp16 kernels == the references, the auto path's choice
# The device tool brings back at most 8 files from $OUT, so $OUT gets only: gpu.txt, the step JSONs,
# session.log (the last $TAIL_LINES lines of each step's log: appended as each step ends, and for a step
# cut short by a signal, by the EXIT trap) and logs.tar.gz (the whole logs, repacked after each step):
# 7 files (smoke: 5). The whole logs are written
# under $LOGS (default: a temporary folder, removed at exit). docs/benchmarks.md says where each table goes.
# Exit status: the number of steps that failed (0 = all ran and passed their checks).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/bench/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
TAIL_LINES=${TAIL_LINES:-150}
if [ -n "${LOGS:-}" ]; then keep_logs=1; mkdir -p "$LOGS"; else keep_logs=0; LOGS=$(mktemp -d); fi
SESSION_LOG=$OUT/session.log
: > "$SESSION_LOG"
failed=0
current=""  # the step running now (its log's tail goes to session.log if a signal ends the script)
child=""    # its `timeout` process

log_tail() {  # log_tail NAME NOTE: append the last $TAIL_LINES lines of NAME's log to session.log
    { echo "===== $1 $2 (last $TAIL_LINES lines of $1.log)"; tail -n "$TAIL_LINES" "$LOGS/$1.log" 2>/dev/null; echo; } \
        >> "$SESSION_LOG"
}

pack_logs() {  # every whole log as ONE file in $OUT (renamed into place: a kill leaves the last good one)
    command -v tar > /dev/null || return 0
    ls "$LOGS"/*.log > /dev/null 2>&1 || return 0
    tar -czf "$OUT/.logs.tmp.tar.gz" -C "$LOGS" . 2>/dev/null && mv -f "$OUT/.logs.tmp.tar.gz" "$OUT/logs.tar.gz"
    rm -f "$OUT/.logs.tmp.tar.gz"
}

finish() {  # EXIT trap: also runs after a TERM/INT (see the traps below)
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$current" ]; then
        [ -n "$child" ] && kill -TERM "$child" 2>/dev/null && wait "$child" 2>/dev/null
        log_tail "$current" "(cut short by a signal)"
        echo "== $current: cut short by a signal"
    fi
    pack_logs
    [ "$keep_logs" = 1 ] || rm -rf "$LOGS"
    exit "$rc"
}
trap finish EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $LOGS/NAME.log, count failures
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS rc
    current=$name
    # in the background + `wait`, so that a TERM to this script is handled at once, not after the step;
    # -k: a step that ignores the TERM at its limit is killed 5 s later
    timeout -k 5 "$limit" "$@" < /dev/null > "$LOGS/$name.log" 2>&1 &
    child=$!
    wait "$child"
    rc=$?
    child=""
    current=""
    tail -n 25 "$LOGS/$name.log"
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    log_tail "$name" "exit $rc after $((SECONDS - t0)) s"
    pack_logs
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
timeout 15 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
# limits: 40 + 200 + 45 + 120 + 45 + 80 = 530 s (<= 540 s: the rest of the tool's 600 s is for nvidia-smi,
# the -k grace of a hung step and packing the logs)
step install 40 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
step kernels 200 "$PY" bench/kernels.py --histories 5,20,40 --methods select,triton,dense_sdpa,torch,auto \
    --out "$OUT/kernels.json"
step routed_attention 45 "$PY" bench/routed_attention.py --device cuda --dtype bf16 --heads 12 --tokens 4680 \
    --history 6,10,20,40 --k 1,5 --pattern random,coherent,mixed --out "$OUT/routed_attention.json"
step rollout 120 "$PY" bench/rollout.py --device cuda --dtype bf16 --presets wan2.1-t2v-1.3b --layers 2 \
    --latent 60x104 --chunk-frames 3 --chunks 40 --steps 1 --cfg 1 --vae none \
    --modes dense,topk5,replay5,sink1+window4 --replay assets/ablation/ar_0.6 --out "$OUT/rollout.json"
step kv_offload 45 "$PY" bench/kv_offload.py --device cuda --checkpoint assets/tiny-pretrained --chunks 8,32 \
    --resident 2 --out "$OUT/kv_offload.json"
# pytest-xdist, where installed (the device image has it), runs the tests in 4 processes: the Triton
# compiles of the tests' many shapes overlap
xdist=""
"$PY" -c "import xdist" > /dev/null 2>&1 && xdist="-n 4"
step tests_cuda 80 "$PY" -m pytest -q -x -p no:cacheprovider $xdist tests/test_kernels.py \
    -k "not test_bench_smoke"
echo "steps failed: $failed"
exit "$failed"
