//! Row-wise CPU ops between convolutions: channel concat and point-wise linear (ReLU and the
//! residual add are fused into the conv epilogue).

use rayon::prelude::*;

use super::gemm::gemm_tile;

/// Rows `[a_i | b_i]`: `[N, ca] ++ [N, cb] -> [N, ca + cb]`.
pub fn concat(a: &[f32], ca: usize, b: &[f32], cb: usize) -> Vec<f32> {
    let c = ca + cb;
    let n = if c == 0 { 0 } else { a.len() / ca.max(1) };
    let n = if ca == 0 { b.len() / cb.max(1) } else { n };
    let mut out = vec![0f32; n * c];
    out.par_chunks_mut(c.max(1)).enumerate().for_each(|(i, row)| {
        row[..ca].copy_from_slice(&a[i * ca..(i + 1) * ca]);
        row[ca..].copy_from_slice(&b[i * cb..(i + 1) * cb]);
    });
    out
}

/// `y = x · Wᵀ + b` with PyTorch's `[out, in]` weight layout, rows in parallel tiles.
pub fn linear(x: &[f32], cin: usize, w: &[f32], b: &[f32], cout: usize) -> Vec<f32> {
    let n = x.len().checked_div(cin).unwrap_or(0);
    // Wᵀ once, so every tile multiplies row-major operands.
    let mut wt = vec![0f32; cin * cout];
    for o in 0..cout {
        for i in 0..cin {
            wt[i * cout + o] = w[o * cin + i];
        }
    }
    let mut out = vec![0f32; n * cout];
    const T: usize = 256;
    out.par_chunks_mut(T * cout).enumerate().for_each_init(
        || (vec![0f32; T * cin], vec![0f32; T * cout]),
        |(a, c), (ti, oc)| {
            let rows = oc.len() / cout.max(1);
            a[..rows * cin].copy_from_slice(&x[ti * T * cin..(ti * T + rows) * cin]);
            a[rows * cin..].fill(0.0);
            gemm_tile(T, cin, cout, a, &wt, c);
            for r in 0..rows {
                for (o, (dst, src)) in oc[r * cout..(r + 1) * cout].iter_mut().zip(&c[r * cout..]).enumerate() {
                    *dst = *src + b[o];
                }
            }
        },
    );
    out
}
