//! BatchNorm (training), ReLU, Linear and cross-entropy backward against f64 finite differences.

use sparseconv::bench::pseudo_random;
use sparseconv::train::ops::{batchnorm_backward, batchnorm_train, cross_entropy, linear_backward, relu_backward};

fn fd(f: &dyn Fn(&[f64]) -> f64, at: &[f64], i: usize) -> f64 {
    let h = 1e-4;
    let (mut p, mut m) = (at.to_vec(), at.to_vec());
    p[i] += h;
    m[i] -= h;
    (f(&p) - f(&m)) / (2.0 * h)
}

fn close(label: &str, a: f32, n: f64) {
    assert!((a as f64 - n).abs() <= 2e-4 * n.abs().max(1.0), "{label}: analytic {a} vs finite difference {n}");
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

#[test]
fn batchnorm_training_backward() {
    let (n, c) = (37, 5);
    let x = pseudo_random(n * c, 1, 2.0);
    let gamma: Vec<f32> = pseudo_random(c, 2, 0.5).iter().map(|v| 1.0 + v).collect();
    let beta = pseudo_random(c, 3, 0.5);
    let g = pseudo_random(n * c, 4, 1.0);
    let (mut rm, mut rv) = (vec![0.5f32; c], vec![2.0f32; c]);
    let (y, cache) = batchnorm_train(x.clone(), c, &gamma, &beta, &mut rm, &mut rv).expect("bn");
    let (dx, dg, db) = batchnorm_backward(&g, c, &gamma, &cache, None);
    // f64 reference of the forward, as a function of (x, gamma, beta).
    let fwd = |x: &[f64], ga: &[f64], be: &[f64]| -> f64 {
        let mut l = 0.0;
        for j in 0..c {
            let m: f64 = (0..n).map(|r| x[r * c + j]).sum::<f64>() / n as f64;
            let v: f64 = (0..n).map(|r| (x[r * c + j] - m).powi(2)).sum::<f64>() / n as f64;
            for r in 0..n {
                l += (ga[j] * (x[r * c + j] - m) / (v + 1e-5).sqrt() + be[j]) * g[r * c + j] as f64;
            }
        }
        l
    };
    let (xs, gs, bs) = (f64s(&x), f64s(&gamma), f64s(&beta));
    for i in (0..n * c).step_by(7) {
        close(&format!("dx[{i}]"), dx[i], fd(&|v| fwd(v, &gs, &bs), &xs, i));
    }
    for j in 0..c {
        close(&format!("dgamma[{j}]"), dg[j], fd(&|v| fwd(&xs, v, &bs), &gs, j));
        close(&format!("dbeta[{j}]"), db[j], fd(&|v| fwd(&xs, &gs, v), &bs, j));
    }
    // Forward agrees with the reference, and running stats moved 10% towards the batch stats.
    let y0: f64 = y.iter().zip(&g).map(|(a, b)| *a as f64 * *b as f64).sum();
    assert!((y0 - fwd(&xs, &gs, &bs)).abs() < 1e-3 * y0.abs().max(1.0));
    let m0: f64 = (0..n).map(|r| x[r * c] as f64).sum::<f64>() / n as f64;
    assert!((rm[0] as f64 - (0.9 * 0.5 + 0.1 * m0)).abs() < 1e-6);
    assert!(
        batchnorm_train(x[..c].to_vec(), c, &gamma, &beta, &mut rm, &mut rv).is_err(),
        "one row has no batch statistics"
    );
}

#[test]
fn linear_and_relu_backward() {
    let (n, cin, cout) = (11, 6, 4);
    let x = pseudo_random(n * cin, 5, 1.0);
    let w = pseudo_random(cout * cin, 6, 0.5);
    let g = pseudo_random(n * cout, 7, 1.0);
    let (dx, dw, db) = linear_backward(&x, cin, &w, cout, &g);
    let fwd = |x: &[f64], w: &[f64], b: &[f64]| -> f64 {
        let mut l = 0.0;
        for r in 0..n {
            for o in 0..cout {
                let y: f64 = (0..cin).map(|i| x[r * cin + i] * w[o * cin + i]).sum::<f64>() + b[o];
                l += y * g[r * cout + o] as f64;
            }
        }
        l
    };
    let (xs, ws, bs) = (f64s(&x), f64s(&w), vec![0.1f64; cout]);
    for i in 0..n * cin {
        close(&format!("dx[{i}]"), dx[i], fd(&|v| fwd(v, &ws, &bs), &xs, i));
    }
    for i in 0..cout * cin {
        close(&format!("dW[{i}]"), dw[i], fd(&|v| fwd(&xs, v, &bs), &ws, i));
    }
    for o in 0..cout {
        close(&format!("db[{o}]"), db[o], fd(&|v| fwd(&xs, &ws, v), &bs, o));
    }
    assert_eq!(relu_backward(&[0.0, 2.0, -1.0, 0.5], &[1.0, 2.0, 3.0, 4.0]), vec![0.0, 2.0, 0.0, 4.0]);
}

#[test]
fn cross_entropy_with_ignore_and_weights() {
    let c = 4;
    let logits = pseudo_random(6 * c, 8, 3.0);
    let labels = [1u32, 0, 4, 2, 2, 0];
    let weights = [1.0f32, 2.0, 0.5, 3.0];
    let (loss, grad) = cross_entropy(&logits, c, &labels, Some(&weights)).expect("ce");
    let f = |z: &[f64]| -> f64 {
        let (mut num, mut den) = (0.0, 0.0);
        for (r, &l) in labels.iter().enumerate() {
            if l == 0 {
                continue;
            }
            let row = &z[r * c..(r + 1) * c];
            let lse = row.iter().map(|v| v.exp()).sum::<f64>().ln();
            let w = weights[l as usize - 1] as f64;
            num += w * (lse - row[l as usize - 1]);
            den += w;
        }
        num / den
    };
    let zs = f64s(&logits);
    assert!((loss - f(&zs)).abs() < 1e-9, "{loss} vs {}", f(&zs));
    for i in 0..logits.len() {
        close(&format!("dlogits[{i}]"), grad[i], fd(&f, &zs, i));
    }
    assert!(grad[c..2 * c].iter().all(|&v| v == 0.0), "ignored rows get no gradient");
    assert!(cross_entropy(&logits, c, &[5, 0, 0, 0, 0, 0], None).is_err());
}

/// SPVCNN's point ops are linear in the features, so a central difference with step 1 is exact
/// up to rounding: every input value of a random case is checked (in f64) against the backward.
#[test]
fn point_voxel_ops_backward() {
    use sparseconv::nn::points::{
        average_backward, initial_voxelize, point_to_voxel, point_voxels, voxel_to_point, voxel_to_point_backward,
        PointTensor,
    };
    let n = 60;
    let c = 3;
    let raw = pseudo_random(n * 3, 8, 6.0);
    let coords: Vec<[f32; 3]> = raw.chunks(3).map(|p| [p[0], p[1], p[2]]).collect();
    let batch: Vec<i32> = (0..n as i32).map(|i| i % 2).collect();
    let z = PointTensor::new(coords, batch, pseudo_random(n * c, 9, 1.0), c).expect("points");
    let (v1, idx) = initial_voxelize(&z).expect("voxelize");
    // A coarser voxel grid (stride 2) as the sparse tensor the points talk to.
    let coarse: std::collections::BTreeSet<[i32; 4]> = v1
        .coords()
        .iter()
        .map(|q| [q[0], q[1].div_euclid(2) * 2, q[2].div_euclid(2) * 2, q[3].div_euclid(2) * 2])
        .collect();
    let cs = std::sync::Arc::new(sparseconv::CoordSet::new(coarse.into_iter().collect(), 2).expect("coords"));
    let x = sparseconv::SparseTensor::new(cs.clone(), pseudo_random(cs.len() * c, 10, 1.0), c).expect("x");
    let dot = |a: &[f32], g: &[f32]| a.iter().zip(g).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>();

    // voxel_to_point: L = <g, f(x)>.
    let g = pseudo_random(n * c, 11, 1.0);
    let dx = voxel_to_point_backward(&x, &z, &g).expect("backward");
    for k in 0..x.feats().len() {
        let at = |d: f32| {
            let mut f = x.feats().to_vec();
            f[k] += d;
            let t = sparseconv::SparseTensor::new(cs.clone(), f, c).expect("x");
            dot(&voxel_to_point(&t, &z).expect("forward"), &g)
        };
        close(&format!("voxel_to_point dx[{k}]"), dx[k], (at(1.0) - at(-1.0)) / 2.0);
    }
    // point_to_voxel and initial_voxelize: L = <g, mean(z)>.
    let gv = pseudo_random(x.len() * c, 12, 1.0);
    let dz = average_backward(&point_voxels(&x, &z).expect("voxels"), &gv, c);
    let g1 = pseudo_random(v1.len() * c, 13, 1.0);
    let dz1 = average_backward(&idx.iter().map(|&r| Some(r)).collect::<Vec<_>>(), &g1, c);
    for k in 0..n * c {
        let with = |d: f32| {
            let mut f = z.feats.clone();
            f[k] += d;
            z.with_feats(f, c).expect("points")
        };
        let l = |d: f32| dot(point_to_voxel(&x, &with(d)).expect("forward").feats(), &gv);
        close(&format!("point_to_voxel dz[{k}]"), dz[k], (l(1.0) - l(-1.0)) / 2.0);
        let l1 = |d: f32| dot(initial_voxelize(&with(d)).expect("forward").0.feats(), &g1);
        close(&format!("initial_voxelize dz[{k}]"), dz1[k], (l1(1.0) - l1(-1.0)) / 2.0);
    }
}
