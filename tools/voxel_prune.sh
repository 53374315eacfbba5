#!/bin/bash
# Voxel pruning (issue 14): fine-tune the bundled model with voxel pruning on, at several
# ratios and both fills, then measure mIoU on the labelled scans and the speed against the
# unpruned model (alternating rounds, 2 threads). Usage: tools/voxel_prune.sh OUT [EPOCHS]
# (EPOCHS x 3 scans = steps). Resumable per run: a finished export is not redone.
set -euo pipefail
OUT=${1:-runs/voxel}; EPOCHS=${2:-67}
BIN=target/release/sparseconv
M=data/models/minkunet_cr0.5.safetensors
SCANS="data/semantickitti/sequences/00/velodyne/000000.bin data/open3dml/points_000700.npy data/open3dml/points_000750.npy"
LABELS="data/semantickitti/sequences/00/labels/000000.label data/open3dml/labels_000700.npy data/open3dml/labels_000750.npy"
S0=data/semantickitti/sequences/00/velodyne/000000.bin
cargo build --release --quiet
mkdir -p "$OUT"
RUNS=${RUNS:-0.3:input 0.5:input 0.7:input 0.5:zero}
for run in $RUNS; do
  r=${run%%:*}; fill=${run##*:}; d="$OUT/r${r}_${fill}"
  if [ ! -f "$d/model.safetensors" ]; then
    $BIN --threads 2 train --config data/models/minkunet_cr0.5.train.yaml --init $M --lr-scale 0.5 \
      --epochs "$EPOCHS" --out "$d" --export "$d/model.safetensors" --voxel-prune "$r" --voxel-fill "$fill" 2>&1 | tail -2
  fi
  echo "== r=$r fill=$fill" | tee "$d/summary.txt"
  echo -n "before fine-tuning: " | tee -a "$d/summary.txt"
  $BIN --threads 2 eval $SCANS --model $M --labels $LABELS --voxel-prune "$r" --voxel-fill "$fill" 2>/dev/null | grep -i "miou" | tee -a "$d/summary.txt"
  echo -n "after fine-tuning:  " | tee -a "$d/summary.txt"
  $BIN --threads 2 eval $SCANS --model "$d/model.safetensors" --labels $LABELS --voxel-prune "$r" --voxel-fill "$fill" 2>/dev/null | grep -i "miou" | tee -a "$d/summary.txt"
  echo -n "fine-tuned, no voxel pruning: " | tee -a "$d/summary.txt"
  $BIN --threads 2 eval $SCANS --model "$d/model.safetensors" --labels $LABELS 2>/dev/null | grep -i "miou" | tee -a "$d/summary.txt"
done
echo -n "unpruned bundled model: "; $BIN --threads 2 eval $SCANS --model $M --labels $LABELS 2>/dev/null | grep -i miou
# Speed: each ratio against the unpruned model, alternating rounds, the real scan.
for r in 0.3 0.5 0.7; do
  echo "== speed r=$r"
  $BIN --threads 2 bench $S0 --model $M --baseline $M --runs 5 --rounds 3 --voxel-prune "$r" | tail -3
done
echo "== reference (compute all, overwrite: SPS-Conv's released semantics) r=0.5"
$BIN --threads 2 bench $S0 --model $M --baseline $M --runs 5 --rounds 3 --voxel-prune 0.5 --voxel-reference | tail -1
