//! Forward-with-cache and backward of BatchNorm (training mode), ReLU, Linear and
//! cross-entropy. Row-major `[N, C]`; reductions run over fixed row blocks (f32 within runs of
//! 32 rows, f64 beyond), so gradients are deterministic whatever the thread count.

use rayon::prelude::*;

use crate::cpu::gemm::{gemm_at_b_acc, gemm_tile};
use crate::error::{Error, Result};

/// PyTorch's BatchNorm momentum for the running statistics.
pub const BN_MOMENTUM: f64 = 0.1;
const EPS: f64 = 1e-5;
const ROWS: usize = 2048;

/// What BatchNorm's backward needs from its forward: its input (x̂ is recomputed from it, which
/// costs less than writing and reading a second tensor) and the batch statistics.
pub struct BnCache {
    x: Vec<f32>,
    mean: Vec<f32>,
    inv_std: Vec<f32>,
}

/// BatchNorm in training mode: batch statistics, and the running statistics updated in place
/// (unbiased variance, momentum 0.1, as PyTorch). Takes its input by value and keeps it for the
/// backward pass.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_train(
    x: Vec<f32>,
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
    x: Vec<f32>,
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
    // Sum and sum of squares in one pass: f32 over runs of 32 rows (vectorizes), f64 beyond
    // (no cancellation at these magnitudes); fixed blocks reduced in order.
    let parts: Vec<Vec<f64>> = x
        .par_chunks(ROWS * c)
        .map(|blk| {
            let mut s = vec![0f64; 2 * c];
            let (mut a, mut q) = (vec![0f32; c], vec![0f32; c]);
            for run in blk.chunks(32 * c) {
                a.fill(0.0);
                q.fill(0.0);
                for row in run.chunks_exact(c) {
                    for j in 0..c {
                        a[j] += row[j];
                        q[j] += row[j] * row[j];
                    }
                }
                for j in 0..c {
                    s[j] += a[j] as f64;
                    s[c + j] += q[j] as f64;
                }
            }
            s
        })
        .collect();
    let mut s = vec![0f64; 2 * c];
    for p in parts {
        s.iter_mut().zip(p).for_each(|(t, v)| *t += v);
    }
    let mean: Vec<f64> = s[..c].iter().map(|v| v / n as f64).collect();
    let var: Vec<f64> = s[c..].iter().zip(&mean).map(|(q, m)| (q / n as f64 - m * m).max(0.0)).collect();
    let inv_std: Vec<f64> = var.iter().map(|v| 1.0 / (v + EPS).sqrt()).collect();
    // y = x·scale + shift per channel, then residual and ReLU; row blocks in parallel.
    let scale: Vec<f32> = (0..c).map(|j| (gamma[j] as f64 * inv_std[j]) as f32).collect();
    let shift: Vec<f32> = (0..c).map(|j| (beta[j] as f64 - gamma[j] as f64 * inv_std[j] * mean[j]) as f32).collect();
    let mut y = vec![0f32; x.len()];
    // Row by row with the options resolved outside the loop: an index modulo per value cost
    // about as much as the rest of the pass.
    y.par_chunks_mut(ROWS * c).enumerate().for_each(|(b, yb)| {
        let base = b * ROWS * c;
        let xb = &x[base..base + yb.len()];
        match residual {
            Some(res) => {
                let rb = &res[base..base + yb.len()];
                for ((yr, xr), rr) in yb.chunks_exact_mut(c).zip(xb.chunks_exact(c)).zip(rb.chunks_exact(c)) {
                    for j in 0..c {
                        let o = xr[j] * scale[j] + shift[j] + rr[j];
                        yr[j] = if relu { o.max(0.0) } else { o };
                    }
                }
            }
            None => {
                for (yr, xr) in yb.chunks_exact_mut(c).zip(xb.chunks_exact(c)) {
                    for j in 0..c {
                        let o = xr[j] * scale[j] + shift[j];
                        yr[j] = if relu { o.max(0.0) } else { o };
                    }
                }
            }
        }
    });
    for j in 0..c {
        running_mean[j] = ((1.0 - BN_MOMENTUM) * running_mean[j] as f64 + BN_MOMENTUM * mean[j]) as f32;
        let unbiased = var[j] * n as f64 / (n - 1) as f64;
        running_var[j] = ((1.0 - BN_MOMENTUM) * running_var[j] as f64 + BN_MOMENTUM * unbiased) as f32;
    }
    let cache = BnCache {
        x,
        mean: mean.iter().map(|&m| m as f32).collect(),
        inv_std: inv_std.iter().map(|&v| v as f32).collect(),
    };
    Ok((y, cache))
}

/// BatchNorm backward: `(dx, dγ, dβ)`. With `relu_out` (the output of a ReLU that followed the
/// BatchNorm), `dy` is the gradient at the ReLU's output and the ReLU's mask is applied on the fly.
pub fn batchnorm_backward(
    dy: &[f32],
    c: usize,
    gamma: &[f32],
    cache: &BnCache,
    relu_out: Option<&[f32]>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = dy.len().checked_div(c).unwrap_or(0);
    let (mean, inv) = (&cache.mean, &cache.inv_std);
    // The gradient at the BatchNorm output for rows `lo..hi` into `buf` (ReLU mask applied).
    let grad_rows = |lo: usize, hi: usize, buf: &mut Vec<f32>| {
        buf.clear();
        match relu_out {
            Some(y) => buf.extend(dy[lo..hi].iter().zip(&y[lo..hi]).map(|(&g, &o)| if o > 0.0 { g } else { 0.0 })),
            None => buf.extend_from_slice(&dy[lo..hi]),
        }
    };
    // Σ d and Σ d·x̂ in one pass over row blocks, reduced in block order.
    let parts: Vec<Vec<f64>> = (0..n.div_ceil(ROWS))
        .into_par_iter()
        .map(|b| {
            let (lo, hi) = (b * ROWS * c, ((b + 1) * ROWS).min(n) * c);
            let mut buf = Vec::with_capacity(hi - lo);
            grad_rows(lo, hi, &mut buf);
            // f32 over runs of 32 rows (vectorizes), f64 beyond.
            let mut s = vec![0f64; 2 * c];
            let (mut a, mut q) = (vec![0f32; c], vec![0f32; c]);
            for (dr, xr) in buf.chunks(32 * c).zip(cache.x[lo..hi].chunks(32 * c)) {
                a.fill(0.0);
                q.fill(0.0);
                for (d, x) in dr.chunks_exact(c).zip(xr.chunks_exact(c)) {
                    for j in 0..c {
                        a[j] += d[j];
                        q[j] += d[j] * ((x[j] - mean[j]) * inv[j]);
                    }
                }
                for j in 0..c {
                    s[j] += a[j] as f64;
                    s[c + j] += q[j] as f64;
                }
            }
            s
        })
        .collect();
    let mut s = vec![0f64; 2 * c];
    for p in parts {
        s.iter_mut().zip(p).for_each(|(a, v)| *a += v);
    }
    let (sum_dy, sum_dy_xhat) = s.split_at(c);
    // dx = γ/σ · (d − mean(d) − x̂ · mean(d·x̂)), row blocks in parallel.
    let a: Vec<f32> = (0..c).map(|j| gamma[j] * inv[j]).collect();
    let m1: Vec<f32> = (0..c).map(|j| (sum_dy[j] / n as f64) as f32).collect();
    let m2: Vec<f32> = (0..c).map(|j| (sum_dy_xhat[j] / n as f64) as f32).collect();
    let mut dx = vec![0f32; dy.len()];
    dx.par_chunks_mut(ROWS * c).enumerate().for_each(|(b, blk)| {
        let lo = b * ROWS * c;
        let mut buf = Vec::with_capacity(blk.len());
        grad_rows(lo, lo + blk.len(), &mut buf);
        for ((out, dr), xr) in blk.chunks_exact_mut(c).zip(buf.chunks_exact(c)).zip(cache.x[lo..].chunks_exact(c)) {
            for j in 0..c {
                let h = (xr[j] - mean[j]) * inv[j];
                out[j] = a[j] * (dr[j] - m1[j] - h * m2[j]);
            }
        }
    });
    (dx, sum_dy_xhat.iter().map(|&v| v as f32).collect(), sum_dy.iter().map(|&v| v as f32).collect())
}

/// ReLU backward from its output: `dx = dy` where `y > 0`, else 0.
pub fn relu_backward(y: &[f32], dy: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; dy.len()];
    out.par_chunks_mut(1 << 16).zip(y.par_chunks(1 << 16)).zip(dy.par_chunks(1 << 16)).for_each(|((o, y), d)| {
        for ((o, &y), &d) in o.iter_mut().zip(y).zip(d) {
            *o = if y > 0.0 { d } else { 0.0 };
        }
    });
    out
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
