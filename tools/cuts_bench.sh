#!/usr/bin/env bash
# Latency-table cuts and fine-grained sensitivity of BENCHMARKS.md ("Offsets and sparse formats
# in the latency table"): a table with every conv's kept-offset counts and element/block
# sparsities measured on the bundled scan, its predictions checked against measured end-to-end
# times of offset-pruned and block-sparse models, and one-conv-at-a-time sensitivity sweeps by
# offsets and by blocks. Run on a quiet machine (the table is timing). Usage:
#   tools/cuts_bench.sh OUT_DIR
set -euo pipefail
out=${1:?output directory}
bin=target/release/sparseconv
model=data/models/minkunet_cr0.5.safetensors
scan=data/semantickitti/sequences/00/velodyne/000000.bin
labels=data/semantickitti/sequences/00/labels/000000.label
cargo build --release --quiet
mkdir -p "$out"
T="$bin --threads 2"
for r in 0.3 0.6; do
  $T prune "$model" --granularity offset --ratio $r --runs 0 --out "$out/offsets$r.safetensors" > /dev/null
  $T prune "$model" --granularity offset --per-map --ratio $r --runs 0 --out "$out/offsets_map$r.safetensors" > /dev/null
done
for r in 0.7 0.9; do
  $T prune "$model" --granularity block --ratio $r --runs 0 --out "$out/block$r.safetensors" > /dev/null
  $T prune "$model" --granularity element --ratio $r --runs 0 --out "$out/element$r.safetensors" > /dev/null
done
$T latency-table "$model" --step 8 --offsets 0.1:0.9:0.1 --sparse element,block --sparsities 0.5,0.7,0.8,0.9,0.95 \
  --out "$out/lut_cuts.csv" | tee "$out/table.log"
$T latency-table --table "$out/lut_cuts.csv" --runs 3 --rounds 2 --check "$model" "$out"/offsets*.safetensors \
  "$out"/block*.safetensors "$out"/element*.safetensors | tee "$out/check.log"
for g in offset block; do
  $T sensitivity "$model" --eval "$scan" --labels "$labels" --granularity $g --table "$out/lut_cuts.csv" \
    --threshold 1 --out "$out/sens_$g" | tee "$out/sens_$g.log"
done
