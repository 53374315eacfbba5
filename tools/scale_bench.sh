#!/usr/bin/env bash
# Scale and endurance numbers of BENCHMARKS.md ("Scale and endurance"): time and peak memory
# for one scan of a few million points (copies of the bundled scan placed side by side, 200 m
# apart) and for batches of 1..16 scans; then 1,000 scans segmented in one process, with the
# resident memory after 10 scans and at the end. Usage: tools/scale_bench.sh OUT_DIR [MODEL]
set -euo pipefail
out=${1:?output directory}
model=${2:-data/models/minkunet_cr0.5.safetensors}
bin=target/release/sparseconv
scan=data/semantickitti/sequences/00/velodyne/000000.bin
cargo build --release --quiet
mkdir -p "$out"
T="$bin --threads 2"
# Wide scans: K copies shifted along x (the scan spans about ±80 m).
for k in 1 4 16; do
  python3 - "$scan" "$out/wide_$k.bin" "$k" <<'PY'
import array, sys
src, dst, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
a = array.array("f")
with open(src, "rb") as f:
    a.frombytes(f.read())
out = array.array("f")
for c in range(k):
    b = array.array("f", a)
    b[0::4] = array.array("f", (x + 200.0 * c for x in a[0::4]))
    out.extend(b)
with open(dst, "wb") as f:
    out.tofile(f)
PY
  echo "== one scan of $k copies"
  $T bench "$out/wide_$k.bin" --model "$model" --runs 3 --warmup 1 | grep -E "points and|^total|scans/s|peak"
done | tee "$out/wide.log"
for b in 1 4 16; do
  echo "== batch of $b"
  $T bench "$scan" --model "$model" --runs 3 --warmup 1 --batch "$b" | grep -E "points and|^total|scans/s|peak"
done | tee "$out/batch.log"
# Endurance: 1,000 scans (links to the bundled scan under distinct names).
mkdir -p "$out/seq/sequences/00/velodyne"
for i in $(seq 0 999); do
  ln -sf "$PWD/$scan" "$out/seq/sequences/00/velodyne/$(printf %06d "$i").bin"
done
rm -rf "$out/pred"
$T segment "$out/seq" --out-dir "$out/pred" --model "$model" | tee "$out/endurance.log"
