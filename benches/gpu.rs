//! GPU (wgpu) against CPU on the real scan: kernel-map build and conv layers (k3 submanifold
//! 32→32, 64→64, 128→128; k2 s2 down; transposed up), each conv also against a dense WGSL GEMM
//! of the same FLOPs (rows = map pairs, Cin × Cout) through the same kernel, in the same run.
//! Rows marked `host` include upload and readback; rows marked `resident` start with inputs on
//! the device and leave outputs there (what a chain of layers sees). Every clock stops after
//! the device finished.
//!
//! `cargo bench --bench gpu` (`-- --quick`: a 20 m patch and few runs, for software adapters;
//! `-- --secs S`: S seconds per measurement instead of 2;
//! `SPARSECONV_ADAPTER` picks the adapter). Without an adapter it says so and exits.

use std::path::Path;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use sparseconv::bench::{conv_flops, measure, pseudo_random, Stats};
use sparseconv::cpu::build_map;
use sparseconv::cpu::conv::conv_forward as cpu_conv;
use sparseconv::gpu::conv::{
    conv_forward as gpu_conv, conv_on_device, dense_gemm, DeviceValues, Precision, SortedNeighbours, WeightStationary,
};
use sparseconv::gpu::kmap::{deltas4, DeviceHashTable};
use sparseconv::gpu::{kmap, GpuContext};
use sparseconv::voxel::voxelize;
use sparseconv::{GroupingParams, KernelSpec, MapBuilder, Plan};

fn row(name: &str, s: &Stats, flops: Option<f64>, extra: &str) {
    let tp = flops.map_or(String::new(), |f| format!("{:>8.1} GFLOP/s", s.gflops(f)));
    println!("{name:<40} {:>10.3} ms ±{:>7.3}  {tp}  {extra}", s.median * 1e3, s.mad * 1e3);
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (min_runs, mut secs) = if quick { (2, 0.2) } else { (10, 2.0) };
    // `--secs S`: time budget per measurement (a lent GPU's minutes are few).
    let args: Vec<String> = std::env::args().collect();
    if let Some(s) = args.iter().position(|a| a == "--secs").and_then(|i| args.get(i + 1)) {
        secs = s.parse().expect("--secs takes seconds");
    }
    let ctx = match GpuContext::new() {
        Ok(c) => c,
        Err(e) => {
            println!("*** SKIPPED: no GPU adapter: {e} ***");
            return;
        }
    };
    let scan = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/semantickitti/sequences/00/velodyne/000000.bin");
    let cloud = sparseconv::io::read_points(&scan, None).expect("bundled scan");
    let mut x0 = voxelize(&cloud, 0.05).expect("voxelize").tensor;
    if quick {
        // A 20 m x 20 m patch: enough to exercise every path on a software adapter.
        let (mut c, mut f) = (Vec::new(), Vec::new());
        for (i, q) in x0.coords().iter().enumerate() {
            if (0..400).contains(&q[1]) && (-200..200).contains(&q[2]) {
                c.push(*q);
                f.extend_from_slice(&x0.feats()[i * 4..(i + 1) * 4]);
            }
        }
        x0 = sparseconv::SparseTensor::from_parts(c, f, 4).expect("patch");
    }
    println!("# gpu bench on {}; {} voxels; CPU {} threads", ctx.describe(), x0.len(), rayon::current_num_threads());
    let sub = KernelSpec::new(3, 1, 1).expect("spec");
    let down = KernelSpec::new(2, 2, 1).expect("spec");
    for (label, spec) in [("k3 submanifold map", sub), ("k2 s2 down map", down)] {
        let c = measure(1, min_runs, 200, secs, || {
            build_map(MapBuilder::Sort, x0.coord_set(), spec).expect("map");
        });
        let g = measure(1, min_runs, 200, secs, || {
            kmap::build(&ctx, x0.coord_set(), spec).expect("map");
        });
        let gs = measure(1, min_runs, 200, secs, || {
            kmap::build_sorted(&ctx, x0.coord_set(), spec).expect("map");
        });
        let offsets = sparseconv::kmap::scaled_offsets(&spec, x0.coord_set().stride()).expect("offsets");
        let bin = ctx.to_device("in", x0.coords()).expect("upload");
        let bdel = ctx.to_device("deltas", &deltas4(&offsets)).expect("upload");
        // Submanifold: queries at the input coordinates (downsampling queries parents, which
        // the host computes today; the query cost is the same kind).
        let r = measure(1, min_runs, 2000, secs, || {
            let t = DeviceHashTable::build(&ctx, &bin).expect("table");
            t.query(&ctx, &bin, &bin, &bdel).expect("query");
            ctx.sync().expect("sync");
        });
        row(&format!("{label} (cpu sort)"), &c, None, "");
        row(&format!("{label} (gpu hash, host)"), &g, None, &format!("cpu/gpu {:.2}x", c.median / g.median));
        row(&format!("{label} (gpu hash, resident)"), &r, None, "neighbour table of inputs x offsets");
        row(&format!("{label} (gpu sort, host)"), &gs, None, &format!("cpu/gpu {:.2}x", c.median / gs.median));
    }
    let sub_map = build_map(MapBuilder::Sort, x0.coord_set(), sub).expect("map");
    let down_map = build_map(MapBuilder::Sort, x0.coord_set(), down).expect("map");
    let up_map = down_map.transposed();
    let layers = [
        ("sub k3 32->32", &sub_map, 32, 32),
        ("sub k3 64->64", &sub_map, 64, 64),
        ("sub k3 128->128", &sub_map, 128, 128),
        ("down k2s2 32->64", &down_map, 32, 64),
        ("up k2s2 64->32", &up_map, 64, 32),
    ];
    for (name, map, cin, cout) in layers {
        let x = pseudo_random(map.n_in() * cin, 1, 1.0);
        let w = pseudo_random(map.volume() * cin * cout, 2, 0.1);
        let flops = conv_flops(map.total_pairs(), cin, cout);
        let plan = Plan::output_tiled(map);
        let c = measure(1, min_runs, 200, secs, || {
            cpu_conv(map, &plan, &x, cin, &w, cout, None).expect("cpu conv");
        });
        let mut gpu = Vec::new();
        for p in [Precision::F32, Precision::F16] {
            gpu.push(measure(1, min_runs, 200, secs, || {
                gpu_conv(&ctx, map, &x, cin, &w, cout, None, None, false, p).expect("gpu conv");
            }));
        }
        let sorted = SortedNeighbours::new(map).expect("table");
        let nbr = ctx.to_device("nbr", &sorted.nbr).expect("upload");
        let orows = ctx.to_device("out rows", &sorted.out_rows).expect("upload");
        let mut res = Vec::new();
        for p in [Precision::F32, Precision::F16] {
            let bx = DeviceValues::upload(&ctx, "x", &x, p).expect("upload");
            let bw = DeviceValues::upload(&ctx, "w", &w, p).expect("upload");
            res.push(measure(1, min_runs, 2000, secs, || {
                conv_on_device(&ctx, (&nbr, &orows), (&bx, cin), (&bw, map.volume(), cout), None, None, false)
                    .expect("conv");
                ctx.sync().expect("sync");
            }));
        }
        // Weight-stationary (gather -> GEMM -> scatter), ungrouped and grouped, f32, resident.
        let mut ws = Vec::new();
        for plan in [Plan::ungrouped(map), Plan::grouped(map, GroupingParams { tolerance: 0.5, max_rows: 1 << 20 })] {
            let prepared = WeightStationary::prepare(&ctx, map, &plan, cin, cout).expect("prepare").expect("fits");
            let bx = DeviceValues::upload(&ctx, "x", &x, Precision::F32).expect("upload");
            let bw = DeviceValues::upload(&ctx, "w", &w, Precision::F32).expect("upload");
            let s = measure(1, min_runs, 2000, secs, || {
                prepared.run(&ctx, (&bx, cin), (&bw, cout), None, None, false).expect("conv");
                ctx.sync().expect("sync");
            });
            ws.push((plan.groups.len(), s));
        }
        let m = map.total_pairs();
        let (a, b) = (pseudo_random(m * cin, 3, 1.0), pseudo_random(cin * cout, 4, 0.1));
        let d = measure(1, min_runs, 200, secs, || {
            dense_gemm(&ctx, &a, m, cin, &b, cout).expect("gemm");
        });
        let ident = ctx.to_device("rows", &(0..m as i32).collect::<Vec<_>>()).expect("upload");
        let ident_out = ctx.to_device("out rows", &(0..m as u32).collect::<Vec<_>>()).expect("upload");
        let (ba, bb) = (
            DeviceValues::upload(&ctx, "a", &a, Precision::F32).expect("upload"),
            DeviceValues::upload(&ctx, "b", &b, Precision::F32).expect("upload"),
        );
        let dr = measure(1, min_runs, 2000, secs, || {
            conv_on_device(&ctx, (&ident, &ident_out), (&ba, cin), (&bb, 1, cout), None, None, false).expect("gemm");
            ctx.sync().expect("sync");
        });
        row(&format!("{name} cpu"), &c, Some(flops), "");
        row(
            &format!("{name} gpu f32 host"),
            &gpu[0],
            Some(flops),
            &format!("{:.0}% of dense", 100.0 * d.median / gpu[0].median),
        );
        row(&format!("{name} gpu f16 host"), &gpu[1], Some(flops), "");
        row(
            &format!("{name} gpu f32 resident"),
            &res[0],
            Some(flops),
            &format!("{:.0}% of dense", 100.0 * dr.median / res[0].median),
        );
        row(&format!("{name} gpu f16 resident"), &res[1], Some(flops), "");
        for (i, (groups, s)) in ws.iter().enumerate() {
            let kind = if i == 0 { "ungrouped" } else { "grouped" };
            row(&format!("{name} gpu ws {kind} ({groups} groups) resident"), s, Some(flops), "");
        }
        row(&format!("{name} gpu dense gemm {m}x{cin}x{cout} host"), &d, Some(flops), "");
        row(&format!("{name} gpu dense gemm resident"), &dr, Some(flops), "");
    }
}
