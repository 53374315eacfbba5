//! Row-wise kernels that keep features on the GPU between convs (`shaders/elementwise.wgsl`):
//! channel concat and f32 -> packed f16 conversion.

use super::shaders::{PipelineKey, Shader};
use super::{grid, GpuBuffer, GpuContext};
use crate::error::{Error, Result};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    ca: u32,
    cb: u32,
    row_threads: u32,
}

const CONCAT: PipelineKey = PipelineKey::new(Shader::Elementwise, "concat");
const PACK_HALF: PipelineKey = PipelineKey::new(Shader::Elementwise, "pack_half");

/// `[a | b]` row by row: `a` is `[n, ca]`, `b` is `[n, cb]`.
pub fn concat(
    ctx: &GpuContext,
    a: &GpuBuffer<f32>,
    ca: usize,
    b: &GpuBuffer<f32>,
    cb: usize,
) -> Result<GpuBuffer<f32>> {
    ctx.check_owns("gpu concat", &[a, b])?;
    let n = a.len().checked_div(ca).unwrap_or_else(|| b.len() / cb.max(1));
    if a.len() != n * ca || b.len() != n * cb {
        return Err(Error::invalid("gpu concat", "the two tensors hold different row counts"));
    }
    let total = n * (ca + cb);
    let y = ctx.scratch::<f32>("concat", total)?;
    let g = grid((total as u32).div_ceil(256));
    let p = ctx.uniform(&Params { n: n as u32, ca: ca as u32, cb: cb as u32, row_threads: g.0 * 256 });
    let mut enc = ctx.encoder();
    ctx.dispatch(&mut enc, CONCAT, &[(0, &p), (1, a.raw()), (2, b.raw()), (3, y.raw())], (g.0, g.1, 1));
    ctx.submit(enc);
    Ok(y)
}

/// f32 values as f16 pairs packed in u32 words (little end first), as the conv's f16 variant
/// reads them. Rounding is the adapter's `pack2x16float`: within one f16 step of
/// [`half::f16::from_f32`] (`tests/gpu.rs`).
pub fn pack_half(ctx: &GpuContext, a: &GpuBuffer<f32>) -> Result<GpuBuffer<u32>> {
    ctx.check_owns("gpu f16 packing", &[a])?;
    let n = a.len();
    let words = n.div_ceil(2);
    let out = ctx.scratch::<u32>("packed halves", words)?;
    let g = grid((words as u32).div_ceil(256));
    let p = ctx.uniform(&Params { n: n as u32, ca: 0, cb: 0, row_threads: g.0 * 256 });
    let mut enc = ctx.encoder();
    ctx.dispatch(&mut enc, PACK_HALF, &[(0, &p), (1, a.raw()), (4, out.raw())], (g.0, g.1, 1));
    ctx.submit(enc);
    Ok(out)
}

const ROW_SUMS: PipelineKey = PipelineKey::new(Shader::Elementwise, "row_sums");
const FILL_ROWS: PipelineKey = PipelineKey::new(Shader::Elementwise, "fill_rows");

/// Per-row sums of `|v|` (`squares` false) or `v²` over the `c` channels of `a` (`[n, c]`),
/// in the order of [`crate::voxel_prune::importance`] (eight lane sums, then the lanes in
/// order): the L1 sums equal the CPU's bit for bit; squares may differ where the adapter
/// contracts a multiply-add.
pub fn row_sums(ctx: &GpuContext, a: &GpuBuffer<f32>, c: usize, squares: bool) -> Result<GpuBuffer<f32>> {
    ctx.check_owns("gpu row sums", &[a])?;
    if c == 0 || !a.len().is_multiple_of(c) {
        return Err(Error::invalid("gpu row sums", "the buffer is not a whole number of rows"));
    }
    let n = a.len() / c;
    let y = ctx.scratch::<f32>("row sums", n.max(1))?;
    if n == 0 {
        return Ok(y);
    }
    let g = grid((n as u32).div_ceil(256));
    let p = ctx.uniform(&Params { n: n as u32, ca: c as u32, cb: u32::from(squares), row_threads: g.0 * 256 });
    let mut enc = ctx.encoder();
    ctx.dispatch(&mut enc, ROW_SUMS, &[(0, &p), (1, a.raw()), (3, y.raw())], (g.0, g.1, 1));
    ctx.submit(enc);
    Ok(y)
}

/// What [`fill_rows`] writes into each listed row.
#[derive(Clone, Copy)]
pub enum RowSource<'a> {
    /// Zeros.
    Zero,
    /// The same row of this buffer (`[n, c]`).
    Copy(&'a GpuBuffer<f32>),
    /// Its ReLU.
    Relu(&'a GpuBuffer<f32>),
}

/// Overwrite the rows `rows` of `y` (`[n, c]`) from `src`, on the device.
pub fn fill_rows(
    ctx: &GpuContext,
    y: &GpuBuffer<f32>,
    c: usize,
    rows: &GpuBuffer<u32>,
    src: RowSource<'_>,
) -> Result<()> {
    let (mode, a) = match src {
        RowSource::Zero => (0u32, None),
        RowSource::Copy(a) => (1, Some(a)),
        RowSource::Relu(a) => (2, Some(a)),
    };
    ctx.check_owns("gpu row fill", &[y])?;
    ctx.check_owns("gpu row fill", &[rows])?;
    if let Some(a) = a {
        ctx.check_owns("gpu row fill", &[a])?;
        if a.len() != y.len() {
            return Err(Error::invalid("gpu row fill", "source and output hold different sizes"));
        }
    }
    let total = rows.len() * c;
    if total == 0 {
        return Ok(());
    }
    let g = grid((total as u32).div_ceil(256));
    let p = ctx.uniform(&Params { n: rows.len() as u32, ca: c as u32, cb: mode, row_threads: g.0 * 256 });
    let empty = ctx.placeholder();
    let ab = a.map_or(empty, |a| a.raw());
    let mut enc = ctx.encoder();
    ctx.dispatch(&mut enc, FILL_ROWS, &[(0, &p), (1, ab), (3, y.raw()), (5, rows.raw())], (g.0, g.1, 1));
    ctx.submit(enc);
    Ok(())
}
