#!/usr/bin/env bash
# GPU measurements on a lent NVIDIA machine (see BENCHMARKS.md, "GPU backend"). The machine has no
# Rust toolchain: build here and carry stripped binaries in .devbin/ (gitignored via
# .git/info/exclude), with the Vulkan loader packages in .gl/:
#   cargo build --release && cargo bench --bench gpu --no-run && cargo test --test gpu --no-run
#   strip -o .devbin/sparseconv target/release/sparseconv; strip -o .devbin/gpu-bench <bench exe>
#   strip -o .devbin/gpu-test <test exe>
#   (optional) strip -o .devbin/sparseconv-base <an earlier build> for an A/B of the CLI bench
# Binaries find the bundled data through the build path (CARGO_MANIFEST_DIR), linked below.
set -u
for f in .gl/*.deb; do dpkg -x "$f" /; done
ldconfig
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
[ -f "$icd" ] && export VK_DRIVER_FILES=$icd
nvidia-smi -L
built=${BUILT_AT:-/work/main}
if [ ! -e "$built" ]; then mkdir -p "$(dirname "$built")" && ln -s "$PWD" "$built"; fi
out=${OUT:-/tmp/out}
mkdir -p "$out"
scan=data/semantickitti/sequences/00/velodyne/000000.bin
model=data/models/minkunet_cr0.5.safetensors
echo "== gpu tests"
timeout 150 .devbin/gpu-test --test-threads 1 > "$out/test.log" 2>&1; echo "tests rc=$?"
grep -E "test result|FAILED|panicked|SKIP" "$out/test.log" | head -20
echo "== cli bench"
for p in f32 f16; do
  timeout 60 .devbin/sparseconv bench "$scan" --model "$model" --device gpu --precision "$p" --runs 20 --layers \
    > "$out/cli_$p.log" 2>&1; echo "cli $p rc=$?"
done
timeout 60 .devbin/sparseconv bench "$scan" --model "$model" --device cpu --runs 10 > "$out/cli_cpu.log" 2>&1
# A/B: with a previous build carried as .devbin/sparseconv-base, alternate the two.
if [ -x .devbin/sparseconv-base ]; then
  echo "== a/b against .devbin/sparseconv-base"
  for round in 1 2; do for b in sparseconv-base sparseconv; do
    echo "-- $b round $round"
    timeout 60 .devbin/$b bench "$scan" --model "$model" --device gpu --runs 20 2>&1 \
      | grep -E "^(voxelize|kernel|conv|other|total|GPU work)"
  done; done
fi
echo "== labels: gpu against cpu on the bundled scan"
labels=data/semantickitti/sequences/00/labels/000000.label
for d in cpu gpu; do
  .devbin/sparseconv segment "$scan" --device "$d" --out-labels "$out/$d.label" --labels "$labels" > "$out/segment_$d.log" 2>&1
  grep -i "miou" "$out/segment_$d.log" | head -2
done
.devbin/sparseconv --precision f16 segment "$scan" --device gpu --out-labels "$out/gpu16.label" > /dev/null 2>&1
python3 - "$out" <<'PY'
import sys, array
o = sys.argv[1]
def read(p):
    a = array.array("I"); a.frombytes(open(p, "rb").read()); return a
c = read(o + "/cpu.label")
for name in ("gpu", "gpu16"):
    g = read(o + "/" + name + ".label")
    diff = sum(1 for x, y in zip(c, g) if x != y)
    print(f"{name}: {diff} of {len(c)} points labelled differently from the CPU ({100 * diff / len(c):.3f}%)")
PY
rm -f "$out"/*.label
echo "== layer bench"
timeout 300 .devbin/gpu-bench --secs "${BENCH_SECS:-2}" > "$out/bench.log" 2>&1; echo "bench rc=$?"
grep -v XDG "$out/bench.log"
for f in "$out"/cli_*.log; do echo "== $f"; grep -v XDG "$f" | head -30; done
