#!/usr/bin/env bash
# TRD's cost on a GPU, at sizes where the model does the work (random Llamas, fp32, batch 32,
# 32 forced tokens), from the repository root:   bash benchmarks/gpu_throughput.sh [OUT_DIR]
# Writes OUT_DIR/throughput_gpu_<student>_<teacher>.md and lookahead_gpu_*.md (default OUT_DIR: benchmarks/results).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
source benchmarks/gpu_wheels.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${1:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
status=0
# (student hidden, layers) (teacher hidden, layers): ~0.1B vs ~0.8B, then ~13M vs ~0.1B parameters.
for sizes in "1024 8 2048 16" "512 4 1024 8"; do
  set -- $sizes
  $PY -m benchmarks.throughput --accelerator gpu --threads 2 --steps 10 --warmup 2 \
    --student-size "$1" "$2" --teacher-size "$3" "$4" \
    --contenders ours_opd ours_trd_splice ours_trd_splice_two_pass ours_trd_rewrite bare \
    --out "$OUT/throughput_gpu_${1}x${2}_${3}x${4}.md" || status=1
done
# The splice decode's lookahead (teacher forwards vs dropped drafts) where a k-token teacher
# forward costs about what a one-token step does.
$PY -m benchmarks.lookahead --accelerator gpu --threads 2 --rounds 10 \
  --student-size 1024 8 --teacher-size 2048 16 --out "$OUT/lookahead_gpu_1024x8_2048x16.md" || status=1
# Rollouts of FSDP2-sharded models: per-layer gathers vs gather-once, OPD and the splice decode
# (one process per GPU, up to 4; HSDP 2 x 2 on 4 or more; one GPU: one process, FSDP's own overhead).
gpus=$($PY -c 'import torch; print(torch.cuda.device_count())')
procs=$(( gpus > 4 ? 4 : gpus )); replicate=$(( procs >= 4 ? 2 : 1 ))
timeout 300 $PY -m benchmarks.sharded_rollout --accelerator gpu --processes "$procs" --replicate "$replicate" --threads 2 \
  --pair random --student-size 1024 8 --teacher-size 2048 16 --batch-size 32 --max-new-tokens 48 --rollouts 3 \
  --out "$OUT/sharded_rollout_gpu_${procs}proc_1024x8_2048x16.md" || status=1
exit $status
