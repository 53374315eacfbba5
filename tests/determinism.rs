//! Same input, same bits: whatever the thread count, the kernel-map builder or the grouping.

mod common;

use common::*;
use sparseconv::bench::pseudo_random;
use sparseconv::cpu::conv::{conv_forward, conv_forward_ex, Epilogue};
use sparseconv::cpu::{build_map, tune::candidates};
use sparseconv::{ConvWeight, Device, Engine, Grouping, KernelSpec, MapBuilder, Plan, SparseTensor};

fn pool(n: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(n).build().expect("thread pool")
}

#[test]
fn real_scan_conv_is_bit_identical_across_threads_and_groupings() {
    let vox = real_scan();
    let n = vox.tensor.len();
    for (k, s, cin, cout) in [(3u32, 1u32, 32, 32), (2, 2, 32, 32), (3, 1, 4, 16), (3, 1, 128, 96)] {
        let x = SparseTensor::new(vox.tensor.coord_set().clone(), pseudo_random(n * cin, 1, 1.0), cin).expect("x");
        let spec = KernelSpec::new(k, s, 1).expect("spec");
        let w = pseudo_random(spec.volume() * cin * cout, 2, 0.2);
        let bias = pseudo_random(cout, 3, 0.1);
        let map = build_map(MapBuilder::Hash, x.coord_set(), spec).expect("map");
        let residual = pseudo_random(map.n_out() * cout, 4, 1.0);
        // The whole epilogue, so the output-tiled plan's in-tile epilogue is checked against the
        // separate pass of the other plans.
        let epi = Epilogue { bias: Some(&bias), residual: Some(&residual), relu: true, pruned: None };
        let reference = pool(1)
            .install(|| conv_forward_ex(&map, &Plan::ungrouped(&map), x.feats(), cin, &w, cout, epi).expect("conv"));
        assert!(reference.contains(&0.0) && reference.iter().any(|&v| v > 0.0), "ReLU clamps some rows");
        let mut plans = vec![("ungrouped".to_string(), Plan::ungrouped(&map))];
        for c in candidates().into_iter().flatten() {
            plans.push((format!("{c:?}"), Plan::grouped(&map, c)));
        }
        plans.push(("output-tiled".to_string(), Plan::output_tiled(&map)));
        assert!(plans.iter().any(|(_, p)| p.groups.iter().any(|g| g.offsets.len() > 1)), "some plan groups offsets");
        for threads in [1, 2, 3] {
            for (label, plan) in &plans {
                let out =
                    pool(threads).install(|| conv_forward_ex(&map, plan, x.feats(), cin, &w, cout, epi).expect("conv"));
                assert!(
                    same_bits(&out, &reference),
                    "k{k} s{s} {cin}->{cout}: {threads} threads, plan {label}: bits differ"
                );
            }
        }
    }
}

/// Wide layers have GEMM tiles of fewer than 256 rows (`tile_rows`), so the output-tiled tasks
/// cover another number of rows than 1024; the identity chunks must still line up. Both the
/// fused kernel (`Cout` a multiple of 16) and the `gemm` fallback (40) are covered.
#[test]
fn output_tiled_matches_ungrouped_bits_when_tiles_are_not_256_rows() {
    let x = random_tensor(7, 1, 14, 1, 0.5, 144);
    for (cin, cout) in [(144usize, 128usize), (232, 40)] {
        assert!(sparseconv::cpu::conv::tile_rows(cin, cout) < 256);
        let x = SparseTensor::new(x.coord_set().clone(), pseudo_random(x.len() * cin, 11, 1.0), cin).expect("x");
        let spec = KernelSpec::new(3, 1, 1).expect("spec");
        let w = pseudo_random(27 * cin * cout, 12, 0.1);
        let bias = pseudo_random(cout, 13, 0.1);
        let map = build_map(MapBuilder::Sort, x.coord_set(), spec).expect("map");
        assert!(map.n_out() > 2048, "several output tiles ({} rows)", map.n_out());
        let reference =
            conv_forward(&map, &Plan::ungrouped(&map), x.feats(), cin, &w, cout, Some(&bias)).expect("conv");
        for threads in [1, 2] {
            let out = pool(threads)
                .install(|| conv_forward(&map, &Plan::output_tiled(&map), x.feats(), cin, &w, cout, Some(&bias)))
                .expect("conv");
            assert!(
                same_bits(&out, &reference),
                "{cin}->{cout}, {threads} threads: output-tiled bits differ from ungrouped"
            );
        }
    }
}

#[test]
fn engines_agree_bitwise_on_random_clouds() {
    let x = random_tensor(42, 2, 10, 1, 0.3, 16);
    let spec = KernelSpec::new(3, 1, 1).expect("spec");
    let w = ConvWeight::new(pseudo_random(27 * 16 * 24, 5, 0.3), 27, 16, 24, None).expect("w");
    let mut outs = Vec::new();
    for st in cpu_strategies() {
        for threads in [1, 2] {
            let y = pool(threads).install(|| st.engine.conv(&x, &w, spec)).expect("conv");
            outs.push((format!("{} x{threads}", st.label), y.into_feats()));
        }
    }
    for (label, o) in &outs[1..] {
        assert!(same_bits(o, &outs[0].1), "{label} differs from {}", outs[0].0);
    }
    // Repeated runs of the tuned engine (which re-times plans on a new engine) also agree.
    let again = Engine::new(Device::Cpu, MapBuilder::Sort, Grouping::Auto).conv(&x, &w, spec).expect("conv");
    assert!(same_bits(again.feats(), &outs[0].1));
}
