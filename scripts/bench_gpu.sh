#!/usr/bin/env bash
# The GPU measurements of docs/performance.md, one after the other, each under a time limit, so that
# one failing or slow section does not cost the others. Every section writes OUT_DIR/NAME.log (its
# output) and OUT_DIR/NAME.json (its results); train, train_64k and generate_graph also write
# OUT_DIR/NAME.profile.txt (where a call's time went, kernel by kernel). OUT_DIR/summary.txt gets the
# machine, the versions and one line per section: exit status and seconds. It exits 1 when a
# section failed, 130 when interrupted (after the running section ends).
#
#   bash scripts/bench_gpu.sh OUT_DIR [SECTION...]        # default: every section, in this order
#
# Sections:
#   train           model=proxy, 8K: text, packed and one 980 px image (MFU targets 45% / 40%)
#   generate        model=aria, batch 1 and 8: prefill and decode tokens/s, eager decode steps
#   generate_graph  the same, ours only, each decode step one CUDA graph replay
#   attention       varlen against dense attention at 8K and 64K
#   video           model=proxy, 32 / 64 / 256 frames -> a 64-token answer
#   train_64k       model=proxy, one 64K row, ours only: runs, and its peak memory
# Environment: BENCH_ARGS is appended to the side-by-side scripts' arguments (e.g. "--no-memory
# --repeats 2"), BENCH_LIMIT is each section's limit in seconds (default 900), PYTHON the interpreter.
set -uo pipefail
if [[ $# -lt 1 ]]; then
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
out=$1
shift
sections=("$@")
[[ ${#sections[@]} -gt 0 ]] || sections=(train generate generate_graph attention video train_64k)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-python3}
limit=${BENCH_LIMIT:-900}
read -r -a extra <<<"${BENCH_ARGS:-}"
export PYTHONUNBUFFERED=1

command_of() {
    case $1 in
        train) echo bench_train.py --device cuda --model proxy --seq-lens 8192 --cases text,packed,image \
                    --image-size 980 ;;
        generate) echo bench_generate.py --device cuda --model aria --batch-sizes 1,8 ;;
        generate_graph) echo bench_generate.py --device cuda --model aria --batch-sizes 1,8 \
                             --decode cuda_graph --impls ours ;;
        attention) echo bench_attention.py --device cuda --seq-lens 8192,65536 ;;
        video) echo bench_video.py --device cuda --model proxy --frames 32,64,256 ;;
        train_64k) echo bench_train.py --device cuda --model proxy --seq-lens 65536 --cases text,packed \
                        --impls ours ;;
        *) return 1 ;;
    esac
}

for name in "${sections[@]}"; do
    command_of "$name" >/dev/null || { echo "bench_gpu: unknown section '$name'" >&2; exit 2; }
done
if ! "$python" -c 'import torch, transformers, hydra, omegaconf, yaml, safetensors'; then
    echo "bench_gpu: $python cannot import torch, transformers, hydra, omegaconf, yaml and safetensors," \
         "which the benchmarks need (set PYTHON, or install the project into this interpreter)" >&2
    exit 2
fi
mkdir -p "$out"
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1
    "$python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' 2>&1
} >"$out/summary.txt"

trap 'echo "bench_gpu: interrupted" | tee -a "$out/summary.txt" >&2; exit 130' INT TERM
failed=0
for name in "${sections[@]}"; do
    read -r -a cmd <<<"$(command_of "$name")"
    args=("${cmd[@]:1}" --json "$out/$name.json")
    [[ $name == attention ]] || args+=(${extra[@]+"${extra[@]}"})
    case $name in train | train_64k | generate_graph) args+=(--profile "$out/$name.profile.txt") ;; esac
    echo "== $name: ${cmd[0]} ${args[*]}" | tee -a "$out/summary.txt"
    start=$SECONDS
    timeout -k 30 "$limit" "$python" "$here/${cmd[0]}" "${args[@]}" >"$out/$name.log" 2>&1
    rc=$?
    [[ $rc -eq 0 ]] || failed=1
    echo "   exit $rc after $((SECONDS - start)) s" | tee -a "$out/summary.txt"
    tail -n 12 "$out/$name.log"
done
exit $failed
