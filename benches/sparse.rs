//! Weight-sparse conv layers against the dense kernel on the real scan: the full-resolution
//! k3 submanifold map (91,767 voxels, 346,221 pairs), 64→64 and 128→128, weights magnitude-
//! pruned to 50/70/90% as elements, 1×16 blocks, and 2:4 / 1:4 (N:M has its own sparsity).
//! Dense and sparse alternate in rounds in one process; each line gives both medians, the
//! speed-up, and GFLOP/s counted on the nonzeros (dense: all weights).
//!
//! `cargo bench --bench sparse` (custom harness; `--quick` for fewer runs).

use std::path::Path;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use sparseconv::bench::{conv_flops, pseudo_random};
use sparseconv::cpu::build_map;
use sparseconv::cpu::conv::{conv_forward_ex, Epilogue};
use sparseconv::cpu::sparse::conv_sparse;
use sparseconv::sparse_weights::{prune_kernel, Format, SparseWeights};
use sparseconv::voxel::voxelize;
use sparseconv::{KernelSpec, MapBuilder, Plan};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (rounds, runs) = if quick { (2, 2) } else { (3, 5) };
    let threads = rayon::current_num_threads();
    let scan = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/semantickitti/sequences/00/velodyne/000000.bin");
    let vox = voxelize(&sparseconv::io::read_points(&scan, None).expect("scan"), 0.05).expect("voxelize");
    let spec = KernelSpec::new(3, 1, 1).expect("spec");
    let map = build_map(MapBuilder::Sort, vox.tensor.coord_set(), spec).expect("map");
    let plan = Plan::output_tiled(&map);
    let pairs = map.total_pairs();
    println!(
        "# sparse conv bench: {} voxels, {pairs} pairs (k3 submanifold), {threads} threads, {rounds} rounds x {runs} runs",
        map.n_out()
    );
    println!(
        "{:<10} {:<8} {:>8} {:>10} {:>10} {:>8} {:>12} {:>12}",
        "layer", "format", "zeros", "dense ms", "sparse ms", "speed-up", "dense GF/s", "sparse GF/s"
    );
    for c in [64usize, 128] {
        let x = pseudo_random(map.n_in() * c, 1, 1.0);
        let dense_w = pseudo_random(27 * c * c, 2, 0.1);
        let epi = Epilogue { bias: None, residual: None, relu: false, pruned: None };
        let mut cases: Vec<(Format, f64)> = Vec::new();
        for s in [0.5, 0.7, 0.9] {
            cases.push((Format::Element, s));
            cases.push((Format::Block, s));
        }
        cases.push((Format::NM(2, 4), 0.5));
        cases.push((Format::NM(1, 4), 0.75));
        for (f, s) in cases {
            let mut w = dense_w.clone();
            prune_kernel(&mut w, c, c, f, s);
            let sw = SparseWeights::new(f, &w, 27, c, c).expect("format");
            let (mut td, mut ts) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                for _ in 0..runs {
                    let t = std::time::Instant::now();
                    std::hint::black_box(conv_forward_ex(&map, &plan, &x, c, &w, c, epi).expect("dense"));
                    td.push(t.elapsed().as_secs_f64());
                }
                for _ in 0..runs {
                    let t = std::time::Instant::now();
                    std::hint::black_box(conv_sparse(&map, &x, c, &sw, epi).expect("sparse"));
                    ts.push(t.elapsed().as_secs_f64());
                }
            }
            let (d, sp) = (median(td), median(ts));
            let flops = conv_flops(pairs, c, c);
            println!(
                "{:<10} {:<8} {:>7.0}% {:>10.2} {:>10.2} {:>7.2}x {:>12.1} {:>12.1}",
                format!("{c}->{c}"),
                f.name(),
                100.0 * (1.0 - sw.density()),
                d * 1e3,
                sp * 1e3,
                d / sp,
                flops / d / 1e9,
                flops * sw.density() / sp / 1e9
            );
        }
    }
}
