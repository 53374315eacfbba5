#!/usr/bin/env bash
# Recovery experiments of BENCHMARKS.md ("Iterative pruning and lottery tickets"): one-shot
# against AGP at the same final sparsity and training budget, and lottery tickets (rewind to
# step 0 and to step K) against fine-tuning and re-initialization. Sized to 2 cores: crops of
# 25 m, a few dozen steps per round. Usage: tools/recovery_bench.sh OUT_DIR [STEPS]
set -euo pipefail
out=${1:?output directory}
steps=${2:-40}
bin=target/release/sparseconv
cargo build --release --quiet
mkdir -p "$out"
# From the trained bundled model: 80% of conv weights, one prune + 4*steps of fine-tuning
# against four AGP rounds of steps each.
$bin imp --final-sparsity 0.8 --rounds 1 --steps $((4 * steps)) --out "$out/oneshot" | tee "$out/oneshot.log"
$bin imp --final-sparsity 0.8 --rounds 4 --schedule agp --steps "$steps" --out "$out/agp" | tee "$out/agp.log"
# Lottery tickets from a fresh init (seed 7): steps of dense training, then 20% of the
# remaining weights per round to 59% sparsity, each round trained for steps.
for r in "rewind --rewind-step 0" "rewind --rewind-step 5" "finetune" "reinit"; do
  name=$(echo "$r" | tr -d ' -' )
  $bin imp --fresh 7 --final-sparsity 0.59 --schedule geometric --rate 0.2 --pretrain-steps "$steps" \
    --steps "$steps" --lr 2e-3 --restart $r --out "$out/lt_$name" | tee "$out/lt_$name.log"
done
# Network slimming: fine-tune the bundled model with L1 on every BatchNorm γ, compare the γ
# distributions, then prune half of each group's channels by γ from both models.
cat > "$out/slim.yaml" <<YAML
arch: minkunet
cr: 0.5
data: [$PWD/data/semantickitti, $PWD/data/open3dml/points_000700.npy, $PWD/data/open3dml/points_000750.npy]
epochs: 40
lr: 0.002
warmup: 0
schedule: constant
l1: {"@bn": 0.01}
YAML
$bin train --init data/models/minkunet_cr0.5.safetensors --config "$out/slim.yaml" --lr-scale 1 \
  --max-steps "$((3 * steps / 2))" --out "$out/slim" --export "$out/slim.safetensors"
$bin bn-gamma data/models/minkunet_cr0.5.safetensors "$out/slim.safetensors" --out "$out/gamma.png" | tee "$out/gamma.log"
for m in data/models/minkunet_cr0.5.safetensors "$out/slim.safetensors"; do
  $bin prune "$m" --criterion bn --ratio 0.5 --round-to 8 --runs 0 --out "$out/$(basename "$m" .safetensors)_bn50.safetensors"
  $bin eval data/semantickitti/sequences/00/velodyne/000000.bin --labels data/semantickitti/sequences/00/labels/000000.label \
    --model "$out/$(basename "$m" .safetensors)_bn50.safetensors" | tail -2
done | tee "$out/slim_prune.log"
