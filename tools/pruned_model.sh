#!/usr/bin/env bash
# Recipe of data/models/minkunet_cr0.5_pruned.safetensors and of the Pareto table in
# BENCHMARKS.md ("The shipped pruned model"): four ways of choosing per-group widths for the
# same latency budget (uniform L1, sensitivity-guided, NetAdapt, AMC), each pruned from the
# bundled model and then given the same fine-tune, evaluated on every labelled scan and timed
# against the bundled model in alternating rounds.
#
#   tools/pruned_model.sh OUT_DIR [TARGET_SPEEDUP] [FINETUNE_EPOCHS]
#
# Resumable: every stage leaves its output in OUT_DIR and is skipped when that output exists;
# a fine-tune stopped half-way continues from its checkpoint. Sized to 2 cores (the whole run
# takes about an hour and a half there); the searches use 8-channel width grids, the eval set
# is the three labelled scans (which are also the bundled model's training scans: there is no
# held-out labelled scan here).
set -euo pipefail
out=${1:?output directory}
speedup=${2:-2.3}
epochs=${3:-200}
bin=target/release/sparseconv
model=data/models/minkunet_cr0.5.safetensors
cfg=data/models/minkunet_cr0.5.train.yaml
scans=(data/semantickitti/sequences/00/velodyne/000000.bin data/open3dml/points_000700.npy data/open3dml/points_000750.npy)
labels=(data/semantickitti/sequences/00/labels/000000.label data/open3dml/labels_000700.npy data/open3dml/labels_000750.npy)
cargo build --release --quiet
mkdir -p "$out"
T="$bin --threads 2"

# 1. Latency table on the 8-channel grid (every conv at every width pair, this machine).
[ -f "$out/lut8.csv" ] || $T latency-table "$model" --step 8 --out "$out/lut8.csv"

# 2. Candidates, all at the same predicted budget (the unpruned prediction / speedup).
#    Sensitivity-guided: the smallest per-group mIoU-drop threshold whose plan meets it.
if [ ! -f "$out/sensitivity.safetensors" ]; then
  $T sensitivity "$model" --eval "${scans[@]}" --labels "${labels[@]}" --table "$out/lut8.csv" \
    --target-speedup "$speedup" --out "$out/sensitivity"
  $T prune "$model" --plan "$out/sensitivity/plan.txt" --round-to 8 --runs 0 --out "$out/sensitivity.safetensors"
fi
#    AMC (latency budget; its uniform policy at the same budget is the uniform-L1 candidate).
#    Shrunk: 50 warm-up + 150 learning episodes (AMC: 100 + 300), evaluation on one scan.
target=$(python3 -c "print(1 / $speedup)")
if [ ! -f "$out/amc/uniform.safetensors" ]; then
  $T amc "$model" --budget latency --target "$target" --table "$out/lut8.csv" --warmup 50 --episodes 150 \
    --round-to 8 --out "$out/amc"
fi
cp "$out/amc/amc.safetensors" "$out/amc_policy.safetensors"
cp "$out/amc/uniform.safetensors" "$out/uniform.safetensors"
#    Uniform L1 with half of every group's channels removed (the 8 grid): AMC's uniform
#    policy above snaps to keep 0.40, well under the budget; this one sits near it.
[ -f "$out/uniform50.safetensors" ] || $T prune "$model" --ratio 0.5 --round-to 8 --runs 0 --out "$out/uniform50.safetensors"
#    NetAdapt: proposals fine-tuned 4 steps each, no long fine-tune (the common one follows).
if [ ! -f "$out/netadapt/final.safetensors" ]; then
  $T netadapt "$model" --target-speedup "$speedup" --table "$out/lut8.csv" --round-to 8 --first-cut 0.08 \
    --short-steps 4 --long-steps 0 --out "$out/netadapt"
fi
cp "$out/netadapt/final.safetensors" "$out/netadapt.safetensors"

# 3. The same fine-tune for each: the bundled model's own recipe (AdamW, cosine, augmentation,
#    whole scans) from the pruned weights at a quarter of its learning rate, $epochs epochs.
cands="uniform uniform50 sensitivity netadapt amc_policy"
for c in $cands; do
  if [ ! -f "$out/${c}_ft.safetensors" ]; then
    if [ -f "$out/ft_$c/checkpoint.safetensors" ]; then
      $T train --resume "$out/ft_$c/checkpoint.safetensors" --out "$out/ft_$c" --export "$out/${c}_ft.safetensors" --half
    else
      $T train --config "$cfg" --init "$out/$c.safetensors" --lr-scale 0.25 --epochs "$epochs" \
        --out "$out/ft_$c" --export "$out/${c}_ft.safetensors" --half
    fi
  fi
done

# 3b. The shipped model: the sensitivity candidate given a longer fine-tune (twice the epochs at
#     half the bundled recipe's learning rate); copied to data/models/minkunet_cr0.5_pruned.safetensors.
if [ ! -f "$out/sensitivity_long.safetensors" ]; then
  if [ -f "$out/ft_sens_long/checkpoint.safetensors" ]; then
    $T train --resume "$out/ft_sens_long/checkpoint.safetensors" --out "$out/ft_sens_long" \
      --export "$out/sensitivity_long.safetensors" --half
  else
    $T train --config "$cfg" --init "$out/sensitivity.safetensors" --lr-scale 0.5 --epochs $((2 * epochs)) \
      --out "$out/ft_sens_long" --export "$out/sensitivity_long.safetensors" --half
  fi
fi

# 4. mIoU on every labelled scan, then time against the bundled model (alternating rounds).
for m in "$model" "$out"/{uniform,uniform50,sensitivity,netadapt,amc_policy}_ft.safetensors "$out/sensitivity_long.safetensors"; do
  echo "== $m"
  for i in 0 1 2; do
    $T eval --model "$m" "${scans[$i]}" --labels "${labels[$i]}" | grep -i "miou"
  done
  $T eval --model "$m" "${scans[@]}" --labels "${labels[@]}" | grep -i "miou"
done | tee "$out/miou.log"
for c in $cands sensitivity_long; do
  echo "== $c"
  f="$out/${c}_ft.safetensors"; [ "$c" = sensitivity_long ] && f="$out/$c.safetensors"
  $T bench "${scans[0]}" --model "$f" --baseline "$model" --runs 5 --rounds 3 | tail -6
done | tee "$out/bench.log"
