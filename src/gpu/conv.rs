//! Sparse convolution on the GPU, output-stationary (`shaders/conv.wgsl`): needs no float
//! atomics (missing on DX12, OpenGL and the web) and gives the same bits on every run.

use super::shaders::{PipelineKey, Shader};
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
) -> Result<Vec<f32>> {
    let (n_out, kv) = (map.n_out(), map.volume());
    if n_out == 0 || cout == 0 {
        return Ok(vec![0.0; n_out * cout]);
    }
    let nbr = neighbour_table(map)?;
    let flags = u32::from(bias.is_some()) | (u32::from(residual.is_some()) << 1) | (u32::from(relu) << 2);
    let tiles = n_out.div_ceil(TILE_ROWS) as u32;
    let g = grid(tiles);
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
    let bx = ctx.upload("x", x)?;
    let bw = ctx.upload("weights", w)?;
    let bn = ctx.upload("neighbours", &nbr)?;
    let bb = ctx.upload("bias", bias.unwrap_or(&[]))?;
    let br = ctx.upload("residual", residual.unwrap_or(&[]))?;
    let by = ctx.zeroed("y", (n_out * cout) as u64 * 4)?;
    let mut enc = ctx.encoder();
    let cols = cout.div_ceil(TILE_COLS) as u32;
    ctx.dispatch(
        &mut enc,
        CONV,
        &[(0, &p), (1, &bx), (2, &bw), (3, &bn), (4, &bb), (5, &br), (6, &by)],
        (g.0, g.1, cols),
    );
    ctx.finish_and_read(enc, &by, n_out * cout)
}
