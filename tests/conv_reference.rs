//! Every strategy's sparse conv against the naive dense-grid 3D convolution.

mod common;

use common::*;
use sparseconv::bench::pseudo_random;
use sparseconv::reference::{dense_conv, downsampled_coords};
use sparseconv::{ConvWeight, KernelSpec};

const TOL: f64 = 2e-5;

/// (kernel, stride, dilation, tensor stride of the input, cin, cout)
const CASES: &[(u32, u32, u32, i32, usize, usize)] = &[
    (1, 1, 1, 1, 3, 5),
    (2, 1, 1, 1, 4, 3),
    (3, 1, 1, 1, 1, 1),
    (3, 1, 1, 1, 5, 7),
    (3, 1, 2, 1, 4, 4),
    (3, 1, 1, 2, 3, 2),
    (5, 1, 1, 1, 3, 4),
    (5, 1, 2, 1, 2, 3),
    (3, 1, 1, 1, 64, 72),
    (2, 2, 1, 1, 4, 6),
    (2, 2, 1, 2, 3, 3),
    (3, 2, 1, 1, 5, 3),
    (3, 2, 2, 1, 2, 2),
    (1, 2, 1, 1, 3, 3),
    (5, 2, 1, 1, 2, 3),
    (2, 2, 1, 1, 64, 65),
];

fn weight(volume: usize, cin: usize, cout: usize, seed: u64, bias: bool) -> ConvWeight {
    let b = bias.then(|| pseudo_random(cout, seed + 7, 0.5));
    ConvWeight::new(pseudo_random(volume * cin * cout, seed, 0.3), volume, cin, cout, b).expect("weight")
}

#[test]
fn forward_conv_matches_dense_grid() {
    for (ci, &(k, s, d, ts, cin, cout)) in CASES.iter().enumerate() {
        let seed = 100 + ci as u64;
        // Batch of two, coordinates on both sides of zero.
        let x = random_tensor(seed, 2, 6 * ts, ts, 0.3, cin);
        let spec = KernelSpec::new(k, s, d).expect("spec");
        let w = weight(spec.volume(), cin, cout, seed, ci % 2 == 0);
        let outs = if s == 1 { x.coords().to_vec() } else { downsampled_coords(x.coords(), ts * s as i32) };
        let want = dense_conv(x.coords(), x.feats(), cin, &outs, w.kernel(), cout, spec, ts, 1, w.bias());
        for st in every_backend() {
            let y = st.engine.conv(&x, &w, spec).unwrap_or_else(|e| panic!("{}: case {ci}: {e}", st.label));
            assert_eq!(coord_set(y.coords()), coord_set(&outs), "{}: case {ci}: output coords", st.label);
            assert_eq!(y.stride(), ts * s as i32, "{}: case {ci}: output stride", st.label);
            let got = rows_in_order(&y, &outs);
            let e = rel_err(&got, &want);
            assert!(e < TOL, "{}: case {ci} k{k} s{s} d{d} ts{ts} {cin}->{cout}: rel err {e}", st.label);
        }
    }
}

#[test]
fn transposed_conv_matches_dense_grid() {
    for (ci, &(k, s, d, ts, cin, cout)) in CASES.iter().filter(|c| c.1 > 1).enumerate() {
        let seed = 300 + ci as u64;
        let fine = random_tensor(seed, 2, 6 * ts, ts, 0.3, 1);
        let spec = KernelSpec::new(k, s, d).expect("spec");
        for st in every_backend() {
            // Downsample first so the coarse coordinates come from the engine's own cache.
            let probe = weight(spec.volume(), 1, cin, seed + 1, false);
            let coarse = st.engine.conv(&fine, &probe, spec).expect("down conv");
            let w = weight(spec.volume(), cin, cout, seed, true);
            let y = st
                .engine
                .conv_transposed(&coarse, fine.coord_set(), &w, spec)
                .unwrap_or_else(|e| panic!("{}: case {ci}: {e}", st.label));
            let want = dense_conv(
                coarse.coords(),
                coarse.feats(),
                cin,
                fine.coords(),
                w.kernel(),
                cout,
                spec,
                ts,
                -1,
                w.bias(),
            );
            assert_eq!(y.coords(), fine.coords(), "{}: transposed output coords", st.label);
            let e = rel_err(y.feats(), &want);
            assert!(e < TOL, "{}: transposed case {ci} k{k} s{s} d{d}: rel err {e}", st.label);
        }
    }
}

#[test]
fn empty_input_gives_empty_output() {
    let x = sparseconv::SparseTensor::from_parts(vec![], vec![], 4).expect("empty");
    for st in every_backend() {
        for (k, s) in [(3, 1), (2, 2)] {
            let spec = KernelSpec::new(k, s, 1).expect("spec");
            let w = weight(spec.volume(), 4, 8, 1, true);
            let y = st.engine.conv(&x, &w, spec).unwrap_or_else(|e| panic!("{}: {e}", st.label));
            assert!(y.is_empty() && y.channels() == 8, "{}", st.label);
        }
    }
}

#[test]
fn single_isolated_voxels_see_only_the_centre() {
    // Far-apart voxels: a submanifold conv reduces to the centre weight (plus bias).
    let x = sparseconv::SparseTensor::from_parts(
        vec![[0, -100, -7, 3], [1, 50, 60, -70], [0, 100, 7, -3]],
        vec![1.0, 2.0, -3.0],
        1,
    )
    .expect("tensor");
    let w = weight(27, 1, 2, 9, true);
    for st in cpu_strategies() {
        let y = st.engine.conv(&x, &w, KernelSpec::new(3, 1, 1).expect("spec")).expect("conv");
        let b = w.bias().expect("bias");
        for (i, v) in [1.0f32, 2.0, -3.0].iter().enumerate() {
            for j in 0..2 {
                assert_eq!(y.feats()[i * 2 + j], v * w.kernel()[13 * 2 + j] + b[j], "{}", st.label);
            }
        }
    }
}

#[test]
fn mismatched_shapes_are_errors() {
    let x = random_tensor(5, 1, 4, 1, 0.5, 3);
    let spec = KernelSpec::new(3, 1, 1).expect("spec");
    let engine = sparseconv::Engine::default();
    assert!(engine.conv(&x, &weight(27, 4, 2, 1, false), spec).is_err(), "cin mismatch");
    assert!(engine.conv(&x, &weight(8, 3, 2, 1, false), spec).is_err(), "volume mismatch");
    assert!(ConvWeight::new(vec![0.0; 10], 27, 3, 2, None).is_err());
    assert!(ConvWeight::new(vec![0.0; 27 * 6], 27, 3, 2, Some(vec![0.0; 3])).is_err());
    // Transposed conv onto coordinates that were not the source of the input.
    let other = sparseconv::SparseTensor::from_parts(vec![[0, 40, 40, 40]], vec![1.0; 3], 3).expect("tensor");
    let down = engine.conv(&x, &weight(8, 3, 3, 1, false), KernelSpec::new(2, 2, 1).expect("spec")).expect("down");
    assert!(engine
        .conv_transposed(&down, other.coord_set(), &weight(8, 3, 3, 1, false), KernelSpec::new(2, 2, 1).expect("spec"))
        .is_err());
}
