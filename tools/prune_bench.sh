#!/usr/bin/env bash
# Pruning numbers for BENCHMARKS.md: the bundled MinkUNet cr = 0.5 pruned by channel (L1,
# local, 30/50/70%, and 50% at other --round-to values), by kernel offset (L1, local, three
# ratios) and by weight sparsity (1×16 blocks, elements, 2:4), each timed against the unpruned
# model in alternating rounds (`bench --baseline`) on the bundled scan, with its mIoU on the
# three bundled labelled scans (no fine-tuning).
# Usage: tools/prune_bench.sh [THREADS] [RUNS] [ROUNDS]   (after cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-2}; RUNS=${2:-5}; ROUNDS=${3:-3}
BIN=target/release/sparseconv
MODEL=data/models/minkunet_cr0.5.safetensors
SCAN=data/semantickitti/sequences/00/velodyne/000000.bin
OUT=$(mktemp -d)
EVAL=(data/open3dml/points_000700.npy data/open3dml/points_000750.npy "$SCAN")
LABELS=(data/open3dml/labels_000700.npy data/open3dml/labels_000750.npy data/semantickitti/sequences/00/labels/000000.label)
miou() { "$BIN" --threads "$T" eval "${EVAL[@]}" --model "$1" --labels "${LABELS[@]}" | tail -1; }
echo "== unpruned: $(miou $MODEL)"
run() {
    local name=$1; shift
    "$BIN" --threads "$T" prune "$MODEL" "$@" --runs 1 --rounds 1 --out "$OUT/$name.safetensors" \
        | grep -E "^(minkunet|pruned:|all convs|kernel maps)"
    "$BIN" --threads "$T" bench "$SCAN" --model "$OUT/$name.safetensors" --baseline "$MODEL" \
        --runs "$RUNS" --rounds "$ROUNDS" | tail -3
    echo "   $(miou "$OUT/$name.safetensors")"
}
for r in 0.3 0.5 0.7; do echo "== channel l1 local $r round-to 16"; run ch$r --ratio $r; done
for q in 8 1; do echo "== channel l1 local 0.5 round-to $q"; run ch0.5r$q --ratio 0.5 --round-to $q; done
for r in 0.2 0.4 0.6; do echo "== offset l1 local $r"; run off$r --granularity offset --ratio $r; done
for r in 0.4 0.6; do echo "== offset l1 local per map $r"; run offm$r --granularity offset --per-map --ratio $r; done
for r in 0.7 0.9; do echo "== block local $r"; run blk$r --granularity block --ratio $r; done
echo "== element local 0.9"; run el0.9 --granularity element --ratio 0.9
echo "== nm 2:4"; run nm24 --granularity nm --nm 2:4
rm -rf "$OUT"
