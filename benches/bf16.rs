//! How close the bf16 conv comes to what the CPU offers, and to half the f32 time (issue 18).
//!
//! 1. The ceilings, per core: a register-only loop of independent `vdpbf16ps` against one of
//!    `vfmadd231ps` (what "twice the multiply-adds per instruction" is worth on this CPU).
//! 2. The conv layers of MinkUNet's shapes on the real scan's maps (levels 1/2/4/8 of the
//!    bundled scan), bf16 and f32 (the tuned f32 plan) in alternating runs of one process:
//!    GFLOP/s, the share of the bf16 ceiling on every thread, and the bf16/f32 time ratio.
//!
//! `cargo bench --bench bf16` (custom harness: the ratios need both numbers from one process;
//! `--quick` for short runs). Skips, saying so, on a CPU without AVX512_BF16.

use std::path::Path;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use sparseconv::bench::{conv_flops, measure, pseudo_random, Stats};
use sparseconv::cpu::bf16::{self, Bf16Kernel};
use sparseconv::cpu::conv::{conv_forward, Epilogue};
use sparseconv::cpu::{build_map, tune::tune};
use sparseconv::voxel::voxelize;
use sparseconv::{KernelSpec, MapBuilder};

/// GFLOP/s of one core running `vdpbf16ps` (`bf16`) or `vfmadd231ps` on 12 independent
/// accumulators, no memory operands: the instruction's throughput and nothing else.
#[cfg(target_arch = "x86_64")]
fn ceiling(bf16: bool) -> f64 {
    use std::arch::x86_64::*;
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn dp(reps: usize) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 12];
        // SAFETY: plain 512-bit vectors; every bit pattern is valid for both views.
        let a: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(0x3f80_3f80)) };
        for _ in 0..reps {
            for v in acc.iter_mut() {
                *v = _mm512_dpbf16_ps(*v, a, a);
            }
        }
        acc.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
    }
    #[target_feature(enable = "avx512f")]
    fn fma(reps: usize) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 12];
        let a = _mm512_set1_ps(1.0);
        for _ in 0..reps {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(a, a, *v);
            }
        }
        acc.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
    }
    let reps = 50_000_000;
    let t = Instant::now();
    // SAFETY: the caller checked AVX-512F and AVX512_BF16 (`bf16::available`).
    let v = unsafe {
        if bf16 {
            dp(reps)
        } else {
            fma(reps)
        }
    };
    std::hint::black_box(v);
    // 12 instructions per rep, 16 lanes, 2 multiply-adds per lane for bf16 and 1 for f32.
    let flops = (reps * 12 * 16 * 2 * if bf16 { 2 } else { 1 }) as f64;
    flops / t.elapsed().as_secs_f64() / 1e9
}

#[cfg(not(target_arch = "x86_64"))]
fn ceiling(_: bool) -> f64 {
    0.0
}

fn main() {
    if !bf16::available() {
        println!("SKIPPED: {} (the bf16 kernel does not run here)", bf16::describe());
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick") || std::env::var_os("SPARSECONV_BENCH_QUICK").is_some();
    let (runs, secs, rounds) = if quick { (3, 0.2, 1) } else { (5, 0.5, 3) };
    let threads = rayon::current_num_threads();
    let (c_dp, c_fma) = (ceiling(true), ceiling(false));
    println!("# {}; {threads} threads", bf16::describe());
    println!("# one core: vdpbf16ps {c_dp:.1} GFLOP/s, vfmadd231ps {c_fma:.1} GFLOP/s ({:.2}x)", c_dp / c_fma);
    let peak = c_dp * threads as f64;

    let scan = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/semantickitti/sequences/00/velodyne/000000.bin");
    let cloud = sparseconv::io::read_points(&scan, None).expect("bundled scan");
    let mut coords = voxelize(&cloud, 0.05).expect("voxelize").tensor.coord_set().clone();
    let sub = KernelSpec::new(3, 1, 1).expect("spec");
    let down = KernelSpec::new(2, 2, 1).expect("spec");
    println!(
        "{:<26} {:>9} {:>8} {:>9} {:>8} {:>8} {:>10}",
        "layer (rows, pairs)", "bf16 ms", "GFLOP/s", "f32 ms", "GFLOP/s", "bf16/f32", "% of bf16 peak"
    );
    // MinkUNet cr = 0.5's submanifold shapes per tensor stride (encoder and decoder).
    let levels: [&[(usize, usize)]; 4] = [
        &[(16, 16), (64, 48), (48, 48)],
        &[(16, 16), (64, 48), (48, 48)],
        &[(32, 32), (96, 64), (64, 64)],
        &[(64, 64), (192, 128), (128, 128)],
    ];
    for (level, shapes) in levels.iter().enumerate() {
        let map = build_map(MapBuilder::Sort, &coords, sub).expect("map");
        for &(cin, cout) in shapes.iter() {
            let x = pseudo_random(map.n_in() * cin, 11, 1.0);
            let w = pseudo_random(map.volume() * cin * cout, 12, 0.1);
            let wb = Bf16Kernel::new(&w, map.volume(), cin, cout).expect("layout");
            let (plan, _) = tune(&map, &x, cin, &w, cout, 3).expect("tune");
            let flops = conv_flops(map.total_pairs(), cin, cout);
            let (mut b, mut f): (Vec<Stats>, Vec<Stats>) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                b.push(measure(1, runs, 1000, secs, || {
                    let y = bf16::conv_forward(&map, &x, cin, &wb, None, Epilogue::default()).expect("bf16 conv");
                    std::hint::black_box(y);
                }));
                f.push(measure(1, runs, 1000, secs, || {
                    std::hint::black_box(conv_forward(&map, &plan, &x, cin, &w, cout, None).expect("conv"));
                }));
            }
            let med = |v: &mut Vec<Stats>| {
                v.sort_by(|p, q| p.median.total_cmp(&q.median));
                v[v.len() / 2].median
            };
            let (tb, tf) = (med(&mut b), med(&mut f));
            println!(
                "{:<26} {:>9.3} {:>8.1} {:>9.3} {:>8.1} {:>8.2} {:>10.0}",
                format!("s{} {cin}->{cout} ({}, {})", 1 << level, map.n_out(), map.total_pairs()),
                tb * 1e3,
                flops / tb / 1e9,
                tf * 1e3,
                flops / tf / 1e9,
                tb / tf,
                100.0 * flops / tb / 1e9 / peak
            );
        }
        coords = build_map(MapBuilder::Sort, &coords, down).expect("map").out_coords().clone();
    }
}
