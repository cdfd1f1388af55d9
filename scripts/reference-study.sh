#!/usr/bin/env bash
# Regenerate the reference study in results/: throughput (with the paper's Table 3 sizes), FLOPs, all-to-all
# bytes and routing on the shipped checkpoints, then the report that ties them together.
#
#   scripts/reference-study.sh                 # the reference study into results/ (about 25 minutes, 2 cores)
#   scripts/reference-study.sh --quick --out /tmp/study   # the same pipeline with tiny settings (a few minutes)
#
# Options: --quick (tiny settings, to check the pipeline), --out DIR (default results), --checkpoints DIR
# (where moepp-tau0.75 and moe live, relative to the repository root; default: the ones that ship in
# moepp_bench/data/checkpoints).
#
# Everything is built in a staging directory that mirrors the repository root, so each result file records the
# command a user would type from the root (`... --out results/throughput`). Only when every step has succeeded
# do the new directories replace the old ones in --out: a failed run leaves the previous study untouched.
# Run it on a quiet machine: timings share the cores with whatever else runs.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
QUICK=0
OUT="results"
CKPTS="moepp_bench/data/checkpoints"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1; shift ;;
        --out) OUT="${2:?--out needs a directory}"; shift 2 ;;
        --checkpoints) CKPTS="${2:?--checkpoints needs a directory}"; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

cd "$REPO"
command -v moepp-bench >/dev/null || {
    echo "error: moepp-bench not found; activate the venv (. .venv/bin/activate)" >&2; exit 2; }
CKPTS_ABS="$(cd "$CKPTS" 2>/dev/null && pwd)" || { echo "error: no checkpoint directory $CKPTS" >&2; exit 2; }
for name in moepp-tau0.75 moe; do
    [[ -f "$CKPTS_ABS/$name/config.json" ]] || {
        echo "error: checkpoint $CKPTS/$name is missing; train it (docs/train.md) or give --checkpoints DIR" >&2
        exit 2; }
done

mkdir -p "$OUT"
OUT_ABS="$(cd "$OUT" && pwd)"
STAGE="$(mktemp -d "$OUT_ABS/.reference-study.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
# The stage mirrors the repository root: results/ for the outputs, and the checkpoints at the path they are
# named by, so the commands recorded in the result files are the ones to type from the root.
mkdir -p "$STAGE/results"
if [[ $CKPTS != /* ]]; then
    mkdir -p "$STAGE/$(dirname "$CKPTS")"
    ln -s "$CKPTS_ABS" "$STAGE/$CKPTS"
fi
cd "$STAGE"

run() {  # tables on stdout are dropped: the result files hold them
    echo "+ $*" >&2
    "$@"
}

if [[ $QUICK == 1 ]]; then
    THROUGHPUT=(--preset tiny --tokens 256 --tokens 1024 --repeats 2 --warmup 1 --breakdown)
    THROUGHPUT_BF16=(--preset tiny --tokens 256 --dtype bfloat16 --repeats 2 --warmup 1)
    THROUGHPUT_BWD=(--preset tiny --tokens 256 --backward --repeats 2 --warmup 1)
    THROUGHPUT_TOKENS=(--preset tiny --tokens 64 --tokens 512 --tau 0.75 --repeats 2 --warmup 1)
    THROUGHPUT_BACKENDS=(--preset tiny --tokens 256 --tau 0.75 --backend sorted --backend padded --backend grouped_mm
                         --repeats 2 --warmup 1)
    PAPER=(--paper-table --tokens 64 --tau 0.1 --tau 1.0 --repeats 1 --warmup 0)
    FLOPS=(--preset tiny --tokens 512)
    FLOPS_CKPT=(--tokens 256)
    COMM=(--preset tiny --world-size 2 --tokens-per-rank 64 --repeats 1 --warmup 0)
    PREDICT=(--preset tiny --predict)
    ROUTING=(--max-tokens 1000)
else
    # The issue's targets: 1b, 8192 tokens, the tau sweep, float32 and bfloat16, forward and fwd+bwd;
    # default backend vs moe-loop from 256 to 16384 tokens; one line per backend at 4096 tokens, 2 threads.
    THROUGHPUT=(--preset 1b --tokens 8192 --repeats 9 --breakdown)
    THROUGHPUT_BF16=(--preset 1b --tokens 8192 --dtype bfloat16 --repeats 9 --breakdown)
    THROUGHPUT_BWD=(--preset 1b --tokens 8192 --backward --repeats 5)
    THROUGHPUT_TOKENS=(--preset 1b --tokens 256 --tokens 1024 --tokens 4096 --tokens 16384 --tau 0.75)
    THROUGHPUT_BACKENDS=(--preset 1b --tokens 4096 --threads 2 --tau 0.75 --backend sorted --backend padded
                         --backend grouped_mm)
    PAPER=(--paper-table)
    FLOPS=(--preset 1b --tokens 8192)
    FLOPS_CKPT=(--tokens 2048)
    COMM=(--preset 1b --world-size 2 --world-size 4 --tokens-per-rank 3360)  # exact balance at every tau (docs/comm.md)
    PREDICT=(--preset 1b --predict --tokens-per-rank 3360)
    ROUTING=()
fi

run moepp-bench throughput "${THROUGHPUT[@]}" --out results/throughput/fp32 >/dev/null
run moepp-bench throughput "${THROUGHPUT_BF16[@]}" --out results/throughput/bf16 >/dev/null
run moepp-bench throughput "${THROUGHPUT_BWD[@]}" --out results/throughput/fp32-backward >/dev/null
run moepp-bench throughput "${THROUGHPUT_TOKENS[@]}" --out results/throughput/tokens >/dev/null
run moepp-bench throughput "${THROUGHPUT_BACKENDS[@]}" --out results/throughput/backends >/dev/null
run moepp-bench throughput "${PAPER[@]}" --out results/paper-table >/dev/null
run moepp-bench flops "${FLOPS[@]}" --out results/flops >/dev/null
run moepp-bench flops --checkpoint "$CKPTS/moepp-tau0.75" "${FLOPS_CKPT[@]}" --out results/flops-checkpoint >/dev/null
run moepp-bench comm "${COMM[@]}" --out results/comm >/dev/null
run moepp-bench comm "${PREDICT[@]}" --out results/comm >/dev/null
for name in moepp-tau0.75 moe; do
    run moepp-bench routing-stats "$CKPTS/$name" ${ROUTING[@]+"${ROUTING[@]}"} --out "results/routing/$name" >/dev/null
done
inputs=(results/throughput results/paper-table results/flops results/flops-checkpoint results/comm results/routing)
for name in moepp-tau0.75 moe; do
    if [[ -f "$CKPTS/$name/training.json" ]]; then
        inputs+=("$CKPTS/$name")  # the report lists how the checkpoints were trained
    fi
done
run moepp-bench report "${inputs[@]}" --out results/report

# Every step succeeded: the new directories replace the old ones.
for dir in "$STAGE"/results/*; do
    name="$(basename "$dir")"
    rm -rf "${OUT_ABS:?}/$name"
    mv "$dir" "$OUT_ABS/$name"
done
echo "reference study written to $OUT (report: $OUT/report/report.md)" >&2
