//! Conv layers on the real scan: time and GFLOP/s, ungrouped vs tuned grouping, each against
//! a dense GEMM of the same total size (rows = map pairs, Cin × Cout) timed in the same run.
//!
//! `cargo bench --bench conv` (custom harness: the ratio needs both numbers from one process).

use std::path::Path;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use sparseconv::bench::{conv_flops, measure, pseudo_random, Stats};
use sparseconv::cpu::conv::conv_forward;
use sparseconv::cpu::gemm::gemm_parallel;
use sparseconv::cpu::{build_map, tune::tune};
use sparseconv::voxel::voxelize;
use sparseconv::{GroupingParams, KernelSpec, MapBuilder, Plan};

fn row(name: &str, s: &Stats, flops: f64, extra: &str) {
    println!("{name:<34} {:>9.3} ms  ±{:>6.3}  {:>8.1} GFLOP/s  {extra}", s.median * 1e3, s.mad * 1e3, s.gflops(flops));
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick") || std::env::var_os("SPARSECONV_BENCH_QUICK").is_some();
    let (min_runs, secs) = if quick { (3, 0.2) } else { (10, 2.0) };
    let threads = rayon::current_num_threads();
    let scan = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/semantickitti/sequences/00/velodyne/000000.bin");
    let cloud = sparseconv::io::read_points(&scan, None).expect("bundled scan");
    let vox = voxelize(&cloud, 0.05).expect("voxelize");
    let x0 = vox.tensor;
    println!("# conv bench: {} points -> {} voxels at 5 cm, {threads} threads", cloud.len(), x0.len());

    let sub = KernelSpec::new(3, 1, 1).expect("spec");
    let down = KernelSpec::new(2, 2, 1).expect("spec");
    let sub_map = build_map(MapBuilder::Hash, x0.coord_set(), sub).expect("map");
    let down_map = build_map(MapBuilder::Hash, x0.coord_set(), down).expect("map");
    let up_map = down_map.transposed();
    // A deep, small layer: three k2 s2 downsamplings (tensor stride 8), where per-offset maps are
    // a few hundred to a few thousand rows and grouping has something to win.
    let mut deep = x0.coord_set().clone();
    for _ in 0..3 {
        deep = build_map(MapBuilder::Sort, &deep, down).expect("map").out_coords().clone();
    }
    let deep_map = build_map(MapBuilder::Sort, &deep, sub).expect("map");
    println!("# stride-8 k3 submanifold map: {} voxels, {} pairs", deep_map.n_out(), deep_map.total_pairs());
    println!(
        "# k3 submanifold map: {} pairs ({:.1} per voxel); k2 s2 down: {} -> {} voxels",
        sub_map.total_pairs(),
        sub_map.total_pairs() as f64 / x0.len() as f64,
        x0.len(),
        down_map.n_out()
    );
    println!("{:<34} {:>12} {:>9} {:>16}", "layer", "median", "mad", "throughput");

    let layers: Vec<(&str, &sparseconv::KernelMap, usize, usize)> = vec![
        ("sub k3 4->32 (stem)", &sub_map, 4, 32),
        ("sub k3 32->32", &sub_map, 32, 32),
        ("sub k3 64->64", &sub_map, 64, 64),
        ("sub k3 128->128", &sub_map, 128, 128),
        ("down k2s2 32->64", &down_map, 32, 64),
        ("up k2s2 64->32 (transposed)", &up_map, 64, 32),
        ("sub k3 256->256 @ stride 8", &deep_map, 256, 256),
    ];
    for (name, map, cin, cout) in layers {
        let x = pseudo_random(map.n_in() * cin, 11, 1.0);
        let w = pseudo_random(map.volume() * cin * cout, 12, 0.1);
        let pairs = map.total_pairs();
        let flops = conv_flops(pairs, cin, cout);
        let ungrouped = Plan::ungrouped(map);
        let s_un = measure(1, min_runs, 1000, secs, || {
            std::hint::black_box(conv_forward(map, &ungrouped, &x, cin, &w, cout, None).expect("conv"));
        });
        let fixed = Plan::grouped(map, GroupingParams { tolerance: 0.3, max_rows: 1 << 17 });
        let s_fx = measure(1, min_runs, 1000, secs, || {
            std::hint::black_box(conv_forward(map, &fixed, &x, cin, &w, cout, None).expect("conv"));
        });
        let ot = Plan::output_tiled(map);
        let s_ot = measure(1, min_runs, 1000, secs, || {
            std::hint::black_box(conv_forward(map, &ot, &x, cin, &w, cout, None).expect("conv"));
        });
        let (tuned, _) = tune(map, &x, cin, &w, cout, 3).expect("tune");
        let s_tu = measure(1, min_runs, 1000, secs, || {
            std::hint::black_box(conv_forward(map, &tuned, &x, cin, &w, cout, None).expect("conv"));
        });
        // Dense GEMM with the same total work: [pairs, cin] x [cin, cout].
        let a = pseudo_random(pairs * cin, 13, 1.0);
        let b = pseudo_random(cin * cout, 14, 0.1);
        let mut c = vec![0f32; pairs * cout];
        let s_gemm = measure(1, min_runs, 1000, secs, || {
            gemm_parallel(pairs, cin, cout, &a, &b, &mut c, threads);
            std::hint::black_box(&c);
        });
        let g = s_gemm.gflops(flops);
        row(&format!("{name} ungrouped"), &s_un, flops, &format!("{:.0}% of dense", 100.0 * s_un.gflops(flops) / g));
        row(
            &format!("{name} grouped"),
            &s_fx,
            flops,
            &format!(
                "{:.0}% of dense  [tol 0.3 max 131072 -> {} groups, {:.0}% padding]",
                100.0 * s_fx.gflops(flops) / g,
                fixed.groups.len(),
                100.0 * fixed.padding_fraction(map)
            ),
        );
        row(&format!("{name} output-tiled"), &s_ot, flops, &format!("{:.0}% of dense", 100.0 * s_ot.gflops(flops) / g));
        let desc = tuned.label();
        row(
            &format!("{name} tuned"),
            &s_tu,
            flops,
            &format!("{:.0}% of dense  [{desc}]", 100.0 * s_tu.gflops(flops) / g),
        );
        row(&format!("  dense gemm {pairs}x{cin}x{cout}"), &s_gemm, flops, "");
    }
}
