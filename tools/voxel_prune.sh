#!/bin/bash
# Voxel pruning (issue 14): fine-tune the bundled model with voxel pruning on, at several
# ratios and both fills (and, with PLAN=FILE, a per-conv plan from `sensitivity --granularity
# voxel`), then mIoU on the labelled scans before/after, and the speed against the unpruned
# model (alternating rounds, 2 threads, the real scan).
# Usage: tools/voxel_prune.sh OUT [EPOCHS]   (EPOCHS x 3 scans = steps; finished runs are kept)
set -euo pipefail
OUT=${1:-runs/voxel}; EPOCHS=${2:-67}
BIN=target/release/sparseconv
M=data/models/minkunet_cr0.5.safetensors
SCANS="data/semantickitti/sequences/00/velodyne/000000.bin data/open3dml/points_000700.npy data/open3dml/points_000750.npy"
LABELS="data/semantickitti/sequences/00/labels/000000.label data/open3dml/labels_000700.npy data/open3dml/labels_000750.npy"
S0=data/semantickitti/sequences/00/velodyne/000000.bin
cargo build --release --quiet
mkdir -p "$OUT"
RUNS=${RUNS:-0.3:zero 0.5:zero 0.7:zero 0.5:input}
if [ -n "${PLAN:-}" ]; then RUNS="$RUNS plan:zero"; fi
for run in $RUNS; do
  r=${run%%:*}; fill=${run##*:}; d="$OUT/r${r}_${fill}"
  if [ "$r" = plan ]; then flags=(--voxel-plan "$PLAN" --voxel-fill "$fill"); else flags=(--voxel-prune "$r" --voxel-fill "$fill"); fi
  if [ ! -f "$d/model.safetensors" ]; then
    $BIN --threads 2 train --config data/models/minkunet_cr0.5.train.yaml --init $M --lr-scale 0.5 \
      --epochs "$EPOCHS" --out "$d" --export "$d/model.safetensors" "${flags[@]}" 2>&1 | tail -2
  fi
  {
    echo "== $r fill=$fill"
    echo -n "before fine-tuning: "; $BIN --threads 2 eval $SCANS --model $M --labels $LABELS "${flags[@]}" 2>/dev/null | grep -i "miou"
    echo -n "after fine-tuning:  "; $BIN --threads 2 eval $SCANS --model "$d/model.safetensors" --labels $LABELS "${flags[@]}" 2>/dev/null | grep -i "miou"
    echo -n "fine-tuned, no voxel pruning: "; $BIN --threads 2 eval $SCANS --model "$d/model.safetensors" --labels $LABELS 2>/dev/null | grep -i "miou"
    echo "speed against the unpruned model:"
    $BIN --threads 2 bench $S0 --model $M --baseline $M --runs 5 --rounds 3 "${flags[@]}" | tail -1
    echo "FLOPs (bench --layers, same-FLOPs dense GEMM time as the FLOP measure):"
    $BIN --threads 2 bench $S0 --model $M --runs 1 --warmup 1 --layers "${flags[@]}" | tail -1
  } | tee "$d/summary.txt"
done
echo -n "unpruned bundled model: "; $BIN --threads 2 eval $SCANS --model $M --labels $LABELS 2>/dev/null | grep -i miou
$BIN --threads 2 bench $S0 --model $M --runs 1 --warmup 1 --layers | tail -1
echo "== reference (compute all, overwrite: SPS-Conv's released semantics) r=0.5"
$BIN --threads 2 bench $S0 --model $M --baseline $M --runs 5 --rounds 3 --voxel-prune 0.5 --voxel-reference | tail -1
