//! Sparse-conv backward against finite differences of the f64 dense-grid reference, for every
//! map kind, on random clouds with negative coordinates and two batches.

mod common;

use common::*;
use sparseconv::bench::pseudo_random;
use sparseconv::reference::{dense_conv_f64, downsampled_coords};
use sparseconv::{ConvWeight, Engine, KernelSpec};

/// L = Σ out ⊙ g, evaluated in f64 by the dense reference.
#[allow(clippy::too_many_arguments)]
fn loss(
    inputs: &[[i32; 4]],
    x: &[f64],
    cin: usize,
    outs: &[[i32; 4]],
    w: &[f64],
    b: &[f64],
    cout: usize,
    spec: KernelSpec,
    stride: i32,
    sign: i32,
    g: &[f64],
) -> f64 {
    dense_conv_f64(inputs, x, cin, outs, w, cout, spec, stride, sign, Some(b)).iter().zip(g).map(|(o, g)| o * g).sum()
}

fn check(label: &str, analytic: &[f32], numeric: &[(usize, f64)]) {
    let scale = numeric.iter().map(|x| x.1.abs()).fold(1e-3, f64::max);
    for &(i, n) in numeric {
        let a = analytic[i] as f64;
        assert!((a - n).abs() <= 1e-4 * scale + 1e-5, "{label}[{i}]: analytic {a} vs finite difference {n}");
    }
}

#[test]
fn conv_gradients_match_finite_differences() {
    // (kernel, stride, dilation, transposed)
    for (ci, &(k, s, d, transposed)) in [
        (3u32, 1u32, 1u32, false),
        (3, 1, 2, false),
        (2, 2, 1, false),
        (3, 2, 1, false),
        (2, 2, 1, true),
        (1, 1, 1, false),
    ]
    .iter()
    .enumerate()
    {
        let label = format!("k{k} s{s} d{d}{}", if transposed { " transposed" } else { "" });
        let (cin, cout) = (3, 4);
        let fine = random_tensor(40 + ci as u64, 2, 5, 1, 0.35, cin);
        let spec = KernelSpec::new(k, s, d).expect("spec");
        let e = Engine::default();
        let probe = ConvWeight::new(pseudo_random(spec.volume() * cin * cin, 1, 0.3), spec.volume(), cin, cin, None)
            .expect("w");
        let (x, map, outs, sign, stride) = if transposed {
            let coarse = e.conv(&fine, &probe, spec).expect("down");
            let map = e.transposed_map(coarse.coord_set(), fine.coord_set(), spec).expect("up map");
            (coarse, map, fine.coords().to_vec(), -1, 1)
        } else {
            let map = e.kernel_map(fine.coord_set(), spec).expect("map");
            let outs = if s == 1 { fine.coords().to_vec() } else { downsampled_coords(fine.coords(), s as i32) };
            (fine.clone(), map, outs, 1, 1)
        };
        let w = ConvWeight::new(
            pseudo_random(spec.volume() * cin * cout, 2, 0.3),
            spec.volume(),
            cin,
            cout,
            Some(pseudo_random(cout, 3, 0.1)),
        )
        .expect("w");
        // Upstream gradient in the engine's output row order, and the same values by coordinate
        // for the reference.
        let y = e.conv_with_map(&map, &x, &w).expect("forward");
        let g = pseudo_random(y.len() * cout, 4, 1.0);
        let pos: std::collections::HashMap<[i32; 4], usize> =
            y.coords().iter().enumerate().map(|(i, &c)| (c, i)).collect();
        let g_ref: Vec<f64> = outs
            .iter()
            .flat_map(|q| {
                let r = pos[q];
                g[r * cout..(r + 1) * cout].iter().map(|&v| v as f64)
            })
            .collect();
        let grads = e.conv_backward(&map, &x, &w, &g, true).expect("backward");
        let dx = grads.dx.as_ref().expect("dx");
        let xs: Vec<f64> = x.feats().iter().map(|&v| v as f64).collect();
        let ws: Vec<f64> = w.kernel().iter().map(|&v| v as f64).collect();
        let bs: Vec<f64> = w.bias().expect("bias").iter().map(|&v| v as f64).collect();
        let l = |xs: &[f64], ws: &[f64], bs: &[f64]| {
            loss(x.coords(), xs, cin, &outs, ws, bs, cout, spec, stride, sign, &g_ref)
        };
        let h = 1e-3;
        let idx_x: Vec<usize> = (0..xs.len()).step_by((xs.len() / 25).max(1)).collect();
        let num_x: Vec<(usize, f64)> = idx_x
            .iter()
            .map(|&i| {
                let (mut p, mut m) = (xs.clone(), xs.clone());
                p[i] += h;
                m[i] -= h;
                (i, (l(&p, &ws, &bs) - l(&m, &ws, &bs)) / (2.0 * h))
            })
            .collect();
        check(&format!("{label} dx"), dx, &num_x);
        let idx_w: Vec<usize> = (0..ws.len()).step_by((ws.len() / 40).max(1)).collect();
        let num_w: Vec<(usize, f64)> = idx_w
            .iter()
            .map(|&i| {
                let (mut p, mut m) = (ws.clone(), ws.clone());
                p[i] += h;
                m[i] -= h;
                (i, (l(&xs, &p, &bs) - l(&xs, &m, &bs)) / (2.0 * h))
            })
            .collect();
        check(&format!("{label} dW"), &grads.dw, &num_w);
        let num_b: Vec<(usize, f64)> = (0..cout)
            .map(|i| {
                let (mut p, mut m) = (bs.clone(), bs.clone());
                p[i] += h;
                m[i] -= h;
                (i, (l(&xs, &ws, &p) - l(&xs, &ws, &m)) / (2.0 * h))
            })
            .collect();
        check(&format!("{label} db"), &grads.db, &num_b);
        assert!(grads.dw.iter().any(|&v| v != 0.0), "{label}: weight gradient is all zero");
    }
}

#[test]
fn backward_is_deterministic_across_threads() {
    let vox = real_scan();
    let (cin, cout) = (16, 16);
    let n = vox.tensor.len();
    let x =
        sparseconv::SparseTensor::new(vox.tensor.coord_set().clone(), pseudo_random(n * cin, 1, 1.0), cin).expect("x");
    let w = ConvWeight::new(pseudo_random(27 * cin * cout, 2, 0.1), 27, cin, cout, None).expect("w");
    let g = pseudo_random(n * cout, 3, 1.0);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
        pool.install(|| {
            let e = Engine::default();
            let map = e.kernel_map(x.coord_set(), KernelSpec::new(3, 1, 1).expect("spec")).expect("map");
            let r = e.conv_backward(&map, &x, &w, &g, true).expect("backward");
            (r.dx.expect("dx"), r.dw, r.db)
        })
    };
    let a = run(1);
    for t in [2, 3] {
        let b = run(t);
        assert!(same_bits(&a.0, &b.0), "dx differs with {t} threads");
        assert!(same_bits(&a.1, &b.1), "dW differs with {t} threads");
        assert!(same_bits(&a.2, &b.2), "db differs with {t} threads");
    }
}
