//! Sparse convolution on the GPU, output-stationary (`shaders/conv.wgsl`): needs no float
//! atomics (missing on DX12, OpenGL and the web) and gives the same bits on every run.

use super::shaders::{PipelineKey, Shader, F16};
use super::{grid, GpuContext};
use crate::error::{Error, Result};
use crate::kmap::KernelMap;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n_out: u32,
    cin: u32,
    cout: u32,
    volume: u32,
    flags: u32,
    row_tiles: u32,
    pad: [u32; 2],
}

const TILE_ROWS: usize = 64;
const TILE_COLS: usize = 64;
const CONV: PipelineKey = PipelineKey::new(Shader::Conv, "main");

/// Storage precision of features and weights on the GPU (accumulation is always f32).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Precision {
    /// Strict f32 (the default).
    #[default]
    F32,
    /// Inputs and weights rounded to f16 and packed in pairs: half the memory traffic, on every
    /// adapter (no SHADER_F16 needed). Relative error against f32 stays below 5e-3 on the
    /// tested layers (`tests/gpu.rs`).
    F16,
}

/// The map as a neighbour table `[n_out, K]` (input row or -1). Every map kind has at most
/// one input per (output, offset).
pub fn neighbour_table(map: &KernelMap) -> Result<Vec<i32>> {
    let kv = map.volume();
    let mut nbr = vec![-1i32; map.n_out() * kv];
    for k in 0..kv {
        let (ins, outs) = map.pairs(k);
        for (&i, &o) in ins.iter().zip(outs) {
            let slot = &mut nbr[o as usize * kv + k];
            if *slot >= 0 {
                return Err(Error::invalid("gpu conv", "map has two inputs for one output and offset"));
            }
            *slot = i as i32;
        }
    }
    Ok(nbr)
}

/// `y = relu?(Σ_k gather_k(x) · W_k + bias + residual)` over `map`, weights `[K, Cin, Cout]`.
///
/// Work larger than one storage binding is split: output rows into slices (neighbour table,
/// residual and output are per row), input channels into slices (the conv is linear in them:
/// each slice adds onto the previous partial output, bias with the first, ReLU with the last).
#[allow(clippy::too_many_arguments)]
pub fn conv_forward(
    ctx: &GpuContext,
    map: &KernelMap,
    x: &[f32],
    cin: usize,
    w: &[f32],
    cout: usize,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    relu: bool,
    precision: Precision,
) -> Result<Vec<f32>> {
    let (n_in, n_out, kv) = (map.n_in(), map.n_out(), map.volume());
    crate::cpu::conv::check_shapes(map, x, cin, w, cout, bias)?;
    if residual.is_some_and(|r| r.len() != n_out * cout) {
        return Err(Error::tensor("residual", format!("expected [{n_out}, {cout}] values")));
    }
    if n_out == 0 || cout == 0 {
        return Ok(vec![0.0; n_out * cout]);
    }
    let nbr = neighbour_table(map)?;
    let limit = ctx.binding_limit() as usize / 4;
    // Rows per slice: neighbour rows (K values) and output rows (Cout values) must fit.
    let rows = (limit / kv.max(cout).max(1) / TILE_ROWS * TILE_ROWS).max(TILE_ROWS);
    // Input channels per slice: all input rows of the slice's channels, and its weights.
    let chans = (limit / n_in.max(kv * cout).max(1)).max(1).min(cin.max(1));
    if rows.saturating_mul(kv.max(cout)) > limit || chans.saturating_mul(n_in.max(kv * cout)) > limit {
        return Err(Error::invalid("gpu conv", "a single row or channel exceeds the adapter's binding limit"));
    }
    let mut y = vec![0f32; n_out * cout];
    for r0 in (0..n_out).step_by(rows) {
        let r1 = (r0 + rows).min(n_out);
        let mut acc: Option<Vec<f32>> = residual.map(|r| r[r0 * cout..r1 * cout].to_vec());
        for c0 in (0..cin.max(1)).step_by(chans) {
            let c1 = (c0 + chans).min(cin);
            // The channel slice of x and of every offset's weights (whole tensors when unsplit).
            let sliced: Option<(Vec<f32>, Vec<f32>)> = (c1 - c0 != cin).then(|| {
                let xs = x.chunks_exact(cin).flat_map(|row| row[c0..c1].iter().copied()).collect();
                let ws =
                    (0..kv).flat_map(|k| w[(k * cin + c0) * cout..(k * cin + c1) * cout].iter().copied()).collect();
                (xs, ws)
            });
            let (xv, wv): (&[f32], &[f32]) = match &sliced {
                Some((xs, ws)) => (xs, ws),
                None => (x, w),
            };
            let last = c1 == cin;
            let out = dispatch_conv(
                ctx,
                &nbr[r0 * kv..r1 * kv],
                (xv, c1 - c0),
                (wv, kv, cout),
                if c0 == 0 { bias } else { None },
                acc.as_deref(),
                relu && last,
                precision,
            )?;
            acc = Some(out);
        }
        if let Some(a) = acc {
            y[r0 * cout..r1 * cout].copy_from_slice(&a);
        }
    }
    Ok(y)
}

/// One dispatch over a neighbour table slice; everything fits a binding.
fn dispatch_conv(
    ctx: &GpuContext,
    nbr: &[i32],
    (x, cin): (&[f32], usize),
    (w, kv, cout): (&[f32], usize, usize),
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    relu: bool,
    precision: Precision,
) -> Result<Vec<f32>> {
    let n_out = nbr.len() / kv;
    let flags = u32::from(bias.is_some()) | (u32::from(residual.is_some()) << 1) | (u32::from(relu) << 2);
    let g = grid(n_out.div_ceil(TILE_ROWS) as u32);
    let params = Params {
        n_out: n_out as u32,
        cin: cin as u32,
        cout: cout as u32,
        volume: kv as u32,
        flags,
        row_tiles: g.0,
        pad: [0; 2],
    };
    let p = ctx.uniform(&params);
    // f16 pairs packed little-end first into u32 words, as `unpack2x16float` reads them.
    let half = |v: &[f32]| -> Vec<u32> {
        v.chunks(2)
            .map(|p| {
                let lo = half::f16::from_f32(p[0]).to_bits() as u32;
                let hi = p.get(1).map_or(0, |&b| half::f16::from_f32(b).to_bits() as u32);
                lo | (hi << 16)
            })
            .collect()
    };
    let (bx, bw, key) = match precision {
        Precision::F32 => (ctx.upload("x", x)?, ctx.upload("weights", w)?, CONV),
        Precision::F16 => {
            (ctx.upload("x", &half(x))?, ctx.upload("weights", &half(w))?, PipelineKey { variant: F16, ..CONV })
        }
    };
    let bn = ctx.upload("neighbours", nbr)?;
    let bb = ctx.upload("bias", bias.unwrap_or(&[]))?;
    let br = ctx.upload("residual", residual.unwrap_or(&[]))?;
    let by = ctx.zeroed("y", (n_out * cout) as u64 * 4)?;
    let mut enc = ctx.encoder();
    let cols = cout.div_ceil(TILE_COLS) as u32;
    ctx.dispatch(
        &mut enc,
        key,
        &[(0, &p), (1, &bx), (2, &bw), (3, &bn), (4, &bb), (5, &br), (6, &by)],
        (g.0, g.1, cols),
    );
    ctx.finish_and_read(enc, &by, n_out * cout)
}

/// A dense GEMM `a [m, k] · b [k, n]` through the same kernel (one offset, every row its own
/// neighbour): the baseline the sparse layers are compared with in `benches/gpu.rs`.
pub fn dense_gemm(ctx: &GpuContext, a: &[f32], m: usize, k: usize, b: &[f32], n: usize) -> Result<Vec<f32>> {
    if a.len() != m * k || b.len() != k * n {
        return Err(Error::invalid("gpu gemm", "operand sizes do not match"));
    }
    let rows: Vec<i32> = (0..m as i32).collect();
    dispatch_conv(ctx, &rows, (a, k), (b, 1, n), None, None, false, Precision::F32)
}
