//! Forward-with-cache and backward of BatchNorm (training mode), ReLU, Linear and
//! cross-entropy. Row-major `[N, C]`; reductions run in f64 in a fixed order, so gradients are
//! deterministic whatever the thread count.

use rayon::prelude::*;

use crate::cpu::gemm::{gemm_at_b_acc, gemm_tile};
use crate::error::{Error, Result};

/// PyTorch's BatchNorm momentum for the running statistics.
pub const BN_MOMENTUM: f64 = 0.1;
const EPS: f64 = 1e-5;
const ROWS: usize = 2048;

/// Per-channel sums over rows: `f(row, acc)` adds row `row`'s terms into `acc[0..c]`. Fixed
/// row blocks, reduced in order, so the result does not depend on the thread count.
fn channel_sums(n: usize, c: usize, f: impl Fn(usize, &mut [f64]) + Sync) -> Vec<f64> {
    let parts: Vec<Vec<f64>> = (0..n.div_ceil(ROWS))
        .into_par_iter()
        .map(|b| {
            let mut s = vec![0f64; c];
            for r in b * ROWS..((b + 1) * ROWS).min(n) {
                f(r, &mut s);
            }
            s
        })
        .collect();
    let mut out = vec![0f64; c];
    for p in parts {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out
}

/// What BatchNorm's backward needs from its forward.
pub struct BnCache {
    /// Normalized input `x̂`.
    pub xhat: Vec<f32>,
    /// `1 / sqrt(var + eps)` per channel.
    pub inv_std: Vec<f64>,
}

/// BatchNorm in training mode: batch statistics, and the running statistics updated in place
/// (unbiased variance, momentum 0.1, as PyTorch).
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_train(
    x: &[f32],
    c: usize,
    gamma: &[f32],
    beta: &[f32],
    running_mean: &mut [f32],
    running_var: &mut [f32],
) -> Result<(Vec<f32>, BnCache)> {
    batchnorm_train_fused(x, c, gamma, beta, running_mean, running_var, None, false)
}

/// [`batchnorm_train`] followed by `+ residual` and ReLU in the same pass over the rows (one
/// pass for the statistics, one for the output).
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_train_fused(
    x: &[f32],
    c: usize,
    gamma: &[f32],
    beta: &[f32],
    running_mean: &mut [f32],
    running_var: &mut [f32],
    residual: Option<&[f32]>,
    relu: bool,
) -> Result<(Vec<f32>, BnCache)> {
    let n = x.len().checked_div(c).unwrap_or(0);
    if n < 2 || gamma.len() != c || beta.len() != c || running_mean.len() != c || running_var.len() != c {
        return Err(Error::invalid("batchnorm", format!("need at least 2 rows and [{c}] parameters, got {n} rows")));
    }
    if residual.is_some_and(|r| r.len() != x.len()) {
        return Err(Error::invalid("batchnorm", "residual has another shape"));
    }
    // Sum and sum of squares in one pass (f64: no cancellation at these magnitudes).
    let s = channel_sums(n, 2 * c, |r, s| {
        let (s1, s2) = s.split_at_mut(c);
        for ((a, b), &v) in s1.iter_mut().zip(s2.iter_mut()).zip(&x[r * c..(r + 1) * c]) {
            let v = v as f64;
            *a += v;
            *b += v * v;
        }
    });
    let mean: Vec<f64> = s[..c].iter().map(|v| v / n as f64).collect();
    let var: Vec<f64> = s[c..].iter().zip(&mean).map(|(q, m)| (q / n as f64 - m * m).max(0.0)).collect();
    let inv_std: Vec<f64> = var.iter().map(|v| 1.0 / (v + EPS).sqrt()).collect();
    let mut xhat = vec![0f32; x.len()];
    let mut y = vec![0f32; x.len()];
    xhat.par_chunks_mut(c).zip(y.par_chunks_mut(c)).enumerate().for_each(|(r, (h, yr))| {
        let xr = &x[r * c..(r + 1) * c];
        for j in 0..c {
            let v = (xr[j] as f64 - mean[j]) * inv_std[j];
            h[j] = v as f32;
            let mut o = (gamma[j] as f64 * v + beta[j] as f64) as f32;
            if let Some(res) = residual {
                o += res[r * c + j];
            }
            yr[j] = if relu { o.max(0.0) } else { o };
        }
    });
    for j in 0..c {
        running_mean[j] = ((1.0 - BN_MOMENTUM) * running_mean[j] as f64 + BN_MOMENTUM * mean[j]) as f32;
        let unbiased = var[j] * n as f64 / (n - 1) as f64;
        running_var[j] = ((1.0 - BN_MOMENTUM) * running_var[j] as f64 + BN_MOMENTUM * unbiased) as f32;
    }
    Ok((y, BnCache { xhat, inv_std }))
}

/// BatchNorm backward: `(dx, dγ, dβ)`.
pub fn batchnorm_backward(dy: &[f32], c: usize, gamma: &[f32], cache: &BnCache) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = dy.len().checked_div(c).unwrap_or(0);
    // Σ dy and Σ dy·x̂ in one pass.
    let s = channel_sums(n, 2 * c, |r, s| {
        let (s1, s2) = s.split_at_mut(c);
        let (d, h) = (&dy[r * c..(r + 1) * c], &cache.xhat[r * c..(r + 1) * c]);
        for (((a, b), &v), &x) in s1.iter_mut().zip(s2.iter_mut()).zip(d).zip(h) {
            *a += v as f64;
            *b += v as f64 * x as f64;
        }
    });
    let (sum_dy, sum_dy_xhat) = s.split_at(c);
    let mut dx = vec![0f32; dy.len()];
    dx.par_chunks_mut(c).enumerate().for_each(|(r, row)| {
        for j in 0..c {
            let g = gamma[j] as f64 * cache.inv_std[j];
            let v =
                dy[r * c + j] as f64 - sum_dy[j] / n as f64 - cache.xhat[r * c + j] as f64 * sum_dy_xhat[j] / n as f64;
            row[j] = (g * v) as f32;
        }
    });
    (dx, sum_dy_xhat.iter().map(|&v| v as f32).collect(), sum_dy.iter().map(|&v| v as f32).collect())
}

/// ReLU backward from its output: `dx = dy` where `y > 0`, else 0.
pub fn relu_backward(y: &[f32], dy: &[f32]) -> Vec<f32> {
    y.par_iter().zip(dy.par_iter()).map(|(&y, &d)| if y > 0.0 { d } else { 0.0 }).collect()
}

/// Linear backward for `y = x·Wᵀ + b` (`W: [out, in]`): `(dx, dW, db)`. GEMMs over fixed row
/// blocks, partial weight gradients reduced in block order (deterministic for any thread count).
pub fn linear_backward(x: &[f32], cin: usize, w: &[f32], cout: usize, dy: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = dy.len().checked_div(cout).unwrap_or(0);
    let mut dx = vec![0f32; n * cin];
    if n == 0 || cin == 0 || cout == 0 {
        return (dx, vec![0.0; cin * cout], vec![0.0; cout]);
    }
    // dx = dy · W, block by block.
    dx.par_chunks_mut(ROWS * cin).zip(dy.par_chunks(ROWS * cout)).for_each(|(d, g)| {
        gemm_tile(g.len() / cout, cout, cin, g, w, d);
    });
    // dW = dyᵀ · x and db = Σ dy, partial per block.
    let parts: Vec<(Vec<f32>, Vec<f64>)> = dy
        .par_chunks(ROWS * cout)
        .zip(x.par_chunks(ROWS * cin))
        .map(|(g, xb)| {
            let m = g.len() / cout;
            let mut pw = vec![0f32; cout * cin];
            gemm_at_b_acc(m, cout, cin, g, xb, &mut pw);
            let mut pb = vec![0f64; cout];
            for row in g.chunks_exact(cout) {
                for (a, &v) in pb.iter_mut().zip(row) {
                    *a += v as f64;
                }
            }
            (pw, pb)
        })
        .collect();
    let mut dw = vec![0f64; cout * cin];
    let mut db = vec![0f64; cout];
    for (pw, pb) in parts {
        dw.iter_mut().zip(pw).for_each(|(a, v)| *a += v as f64);
        db.iter_mut().zip(pb).for_each(|(a, v)| *a += v);
    }
    (dx, dw.iter().map(|&v| v as f32).collect(), db.iter().map(|&v| v as f32).collect())
}

/// Cross-entropy over logits `[N, C]` (logit j is class j + 1) against labels `0..=C`, label 0
/// ignored, optional per-class weights `[C]`; PyTorch's weighted mean. Returns `(loss, dlogits)`.
pub fn cross_entropy(logits: &[f32], c: usize, labels: &[u32], weights: Option<&[f32]>) -> Result<(f64, Vec<f32>)> {
    let n = logits.len().checked_div(c).unwrap_or(0);
    if labels.len() != n || weights.is_some_and(|w| w.len() != c) {
        return Err(Error::invalid("cross-entropy", format!("{} labels for {n} rows of {c} logits", labels.len())));
    }
    if let Some(&bad) = labels.iter().find(|&&l| l as usize > c) {
        return Err(Error::invalid("cross-entropy", format!("label {bad} outside 0..={c}")));
    }
    let wt = |l: u32| weights.map_or(1.0, |w| w[l as usize - 1] as f64);
    let total_w: f64 = labels.iter().filter(|&&l| l != 0).map(|&l| wt(l)).sum();
    let mut grad = vec![0f32; logits.len()];
    if total_w == 0.0 {
        return Ok((0.0, grad));
    }
    let losses: Vec<f64> = grad
        .par_chunks_mut(c)
        .enumerate()
        .map(|(r, g)| {
            let l = labels[r];
            if l == 0 {
                return 0.0;
            }
            let row = &logits[r * c..(r + 1) * c];
            let m = row.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
            let z: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
            let scale = wt(l) / total_w;
            for (j, gv) in g.iter_mut().enumerate() {
                let p = (row[j] as f64 - m).exp() / z;
                *gv = (scale * (p - if j + 1 == l as usize { 1.0 } else { 0.0 })) as f32;
            }
            wt(l) * (z.ln() + m - row[l as usize - 1] as f64)
        })
        .collect();
    Ok((losses.iter().sum::<f64>() / total_w, grad))
}
