#!/usr/bin/env bash
# Numbers of BENCHMARKS.md ("CPU bf16"): bf16 against f32 in the same runs, end to end
# (alternating rounds) for the bundled model, the shipped channel-pruned model and an
# offset-pruned one; per-layer times and GFLOP/s in both precisions beside the f32 dense-GEMM
# floor; mIoU on the three labelled scans in both. Run on a quiet machine. Usage:
#   tools/bf16_bench.sh OUT_DIR
set -euo pipefail
out=${1:?output directory}
bin=target/release/sparseconv
model=data/models/minkunet_cr0.5.safetensors
pruned=data/models/minkunet_cr0.5_pruned.safetensors
scans=(data/semantickitti/sequences/00/velodyne/000000.bin data/open3dml/points_000700.npy data/open3dml/points_000750.npy)
labels=(data/semantickitti/sequences/00/labels/000000.label data/open3dml/labels_000700.npy data/open3dml/labels_000750.npy)
cargo build --release --quiet
mkdir -p "$out"
T="$bin --threads 2"
[ -f "$out/offsets0.3.safetensors" ] ||
  $T prune "$model" --granularity offset --per-map --ratio 0.3 --runs 0 --out "$out/offsets0.3.safetensors" > /dev/null
{
  for pair in "$model $model" "$pruned $model" "$pruned $pruned" "$out/offsets0.3.safetensors $model" \
    "$out/offsets0.3.safetensors $out/offsets0.3.safetensors"; do
    set -- $pair
    $T --precision bf16 bench "${scans[0]}" --model "$1" --baseline "$2" --baseline-precision f32 --runs 5 --rounds 3 | tail -3
  done
} | tee "$out/end_to_end.log"
for p in bf16 f32; do
  $T --precision $p bench "${scans[0]}" --model "$model" --runs 5 --layers > "$out/layers_$p.log"
done
for m in "$model" "$pruned"; do
  for p in f32 bf16; do
    echo "== $m $p"
    $T --precision $p eval --model "$m" "${scans[@]}" --labels "${labels[@]}" | grep -i miou
  done
done | tee "$out/miou.log"
