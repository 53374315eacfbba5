//! Naive references the optimized kernels are tested against: a brute-force kernel map and a
//! dense-grid 3D convolution (f64 accumulation). Slow by design; for tests and `--check`.

use std::collections::{BTreeMap, BTreeSet};

use crate::coords::floor_div;
use crate::kmap::{kernel_offsets, KernelSpec};

/// Brute-force map: for every output and offset, look the neighbour up in an ordered map.
/// Returns per offset the sorted `(in_row, out_row)` pairs; `sign` is +1 for a forward conv
/// (input at `q + δ`) and -1 for a transposed conv (input at `q − δ`).
pub fn brute_force_map(
    inputs: &[[i32; 4]],
    outputs: &[[i32; 4]],
    spec: KernelSpec,
    in_stride: i32,
    sign: i32,
) -> Vec<Vec<(u32, u32)>> {
    let index: BTreeMap<[i32; 4], u32> = inputs.iter().enumerate().map(|(i, &c)| (c, i as u32)).collect();
    kernel_offsets(spec.size, in_stride * spec.dilation as i32)
        .iter()
        .map(|d| {
            let mut v: Vec<(u32, u32)> = outputs
                .iter()
                .enumerate()
                .filter_map(|(o, q)| {
                    let p = [q[0], q[1] + sign * d[0], q[2] + sign * d[1], q[3] + sign * d[2]];
                    index.get(&p).map(|&i| (i, o as u32))
                })
                .collect();
            v.sort_unstable();
            v
        })
        .collect()
}

/// Output coordinates of a downsampling conv, computed independently: sorted unique `S·floor(c/S)`.
pub fn downsampled_coords(inputs: &[[i32; 4]], s: i32) -> Vec<[i32; 4]> {
    let set: BTreeSet<[i32; 4]> =
        inputs.iter().map(|c| [c[0], floor_div(c[1], s) * s, floor_div(c[2], s) * s, floor_div(c[3], s) * s]).collect();
    set.into_iter().collect()
}

/// Dense-grid 3D convolution evaluated at `outputs`: the input is scattered into a dense
/// zero grid covering its bounding box, and each output sums `W[k]ᵀ · grid(q + sign·δ_k)`.
#[allow(clippy::too_many_arguments)]
pub fn dense_conv(
    inputs: &[[i32; 4]],
    feats: &[f32],
    cin: usize,
    outputs: &[[i32; 4]],
    weight: &[f32],
    cout: usize,
    spec: KernelSpec,
    in_stride: i32,
    sign: i32,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let f: Vec<f64> = feats.iter().map(|&v| v as f64).collect();
    let w: Vec<f64> = weight.iter().map(|&v| v as f64).collect();
    let b: Option<Vec<f64>> = bias.map(|b| b.iter().map(|&v| v as f64).collect());
    dense_conv_f64(inputs, &f, cin, outputs, &w, cout, spec, in_stride, sign, b.as_deref())
        .into_iter()
        .map(|v| v as f32)
        .collect()
}

/// [`dense_conv`] entirely in f64 (for finite-difference gradient checks).
#[allow(clippy::too_many_arguments)]
pub fn dense_conv_f64(
    inputs: &[[i32; 4]],
    feats: &[f64],
    cin: usize,
    outputs: &[[i32; 4]],
    weight: &[f64],
    cout: usize,
    spec: KernelSpec,
    in_stride: i32,
    sign: i32,
    bias: Option<&[f64]>,
) -> Vec<f64> {
    let mut out = vec![0f64; outputs.len() * cout];
    if let Some(b) = bias {
        out.chunks_mut(cout.max(1)).for_each(|r| r.copy_from_slice(b));
    }
    if inputs.is_empty() {
        return out;
    }
    let mut lo = [i32::MAX; 4];
    let mut hi = [i32::MIN; 4];
    for c in inputs {
        for a in 0..4 {
            lo[a] = lo[a].min(c[a]);
            hi[a] = hi[a].max(c[a]);
        }
    }
    let ext: Vec<usize> = (0..4).map(|a| (hi[a] - lo[a] + 1) as usize).collect();
    let cells = ext.iter().product::<usize>();
    let mut grid = vec![0f64; cells * cin];
    let mut present = vec![false; cells];
    let cell = |c: &[i32; 4]| -> Option<usize> {
        let mut idx = 0usize;
        for a in 0..4 {
            if c[a] < lo[a] || c[a] > hi[a] {
                return None;
            }
            idx = idx * ext[a] + (c[a] - lo[a]) as usize;
        }
        Some(idx)
    };
    for (i, c) in inputs.iter().enumerate() {
        let g = cell(c).expect("input inside its own bounding box");
        present[g] = true;
        grid[g * cin..(g + 1) * cin].copy_from_slice(&feats[i * cin..(i + 1) * cin]);
    }
    let offs = kernel_offsets(spec.size, in_stride * spec.dilation as i32);
    for (o, q) in outputs.iter().enumerate() {
        for (k, d) in offs.iter().enumerate() {
            let p = [q[0], q[1] + sign * d[0], q[2] + sign * d[1], q[3] + sign * d[2]];
            if let Some(g) = cell(&p).filter(|&g| present[g]) {
                for i in 0..cin {
                    let xv = grid[g * cin + i];
                    for j in 0..cout {
                        out[o * cout + j] += xv * weight[(k * cin + i) * cout + j];
                    }
                }
            }
        }
    }
    out
}
