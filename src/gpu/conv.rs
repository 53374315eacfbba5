//! Sparse convolution on the GPU, output-stationary (`shaders/conv.wgsl`): needs no float
//! atomics (missing on DX12, OpenGL and the web) and gives the same bits on every run.

use super::shaders::{PipelineKey, Shader, F16};
use super::{grid, GpuBuffer, GpuContext};
use crate::error::{Error, Result};
use crate::kmap::KernelMap;
use crate::plan::Plan;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n_out: u32,
    cin: u32,
    cout: u32,
    volume: u32,
    flags: u32,
    row_tiles: u32,
    col_tiles: u32,
    pad: u32,
}

const TILE_ROWS: usize = 64;
const TILE_COLS: usize = 64;
const CONV: PipelineKey = PipelineKey::new(Shader::Conv, "main");
const GATHER_GEMM: PipelineKey = PipelineKey::new(Shader::Conv, "gather_gemm");
const SCATTER_SUM: PipelineKey = PipelineKey::new(Shader::Conv, "scatter_sum");

/// Storage precision of conv features and weights (accumulation is always f32).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Precision {
    /// Strict f32 (the default).
    #[default]
    F32,
    /// Inputs and weights rounded to f16 and packed in pairs: half the memory traffic, on every
    /// adapter (no SHADER_F16 needed). Relative error against f32 stays below 5e-3 on the
    /// tested layers (`tests/gpu.rs`).
    F16,
    /// CPU only: features and weights rounded to bf16, f32 sums, on CPUs with AVX512_BF16
    /// (`cpu/bf16.rs`; elsewhere the CPU runs f32). A GPU engine refuses it.
    Bf16,
}

/// Narrowest output width at which the GPU's default plan is grouped gather → GEMM → scatter
/// (H200, BENCHMARKS.md: output-stationary won up to 64 channels, grouped at 128: 1.76 against
/// 2.2 ms on the scan's k3 map at 91k voxels).
pub const GROUPED_MIN_COUT: usize = 128;
/// Fewest output rows for the grouped plan: it needs the map's counts and pairs on the host, a
/// wait for the device that only large maps repay.
pub const GROUPED_MIN_ROWS: usize = 50_000;
/// Padding tolerance of that grouped plan.
pub const GROUPED_TOLERANCE: f32 = 0.5;
/// Rows per group of that grouped plan (large enough to put every offset in a group).
pub const GROUPED_MAX_ROWS: usize = 1 << 20;

/// The GPU's plan for a conv of `map` with `cout` output channels, chosen without timing (a
/// timing would need a device sync per candidate): see [`GROUPED_MIN_COUT`].
pub fn default_plan(map: &KernelMap, cout: usize) -> crate::plan::Plan {
    if cout >= GROUPED_MIN_COUT && map.kind() == crate::kmap::MapKind::Submanifold && map.n_out() >= GROUPED_MIN_ROWS {
        crate::plan::Plan::grouped(
            map,
            crate::plan::GroupingParams { tolerance: GROUPED_TOLERANCE, max_rows: GROUPED_MAX_ROWS },
        )
    } else {
        output_stationary_plan()
    }
}

/// The output-stationary plan (one pass per output row; no groups).
pub fn output_stationary_plan() -> crate::plan::Plan {
    crate::plan::Plan { groups: Vec::new(), params: None, output_tiled: true }
}

/// The error of a GPU conv asked for bf16 (values in bf16 never reach the device: uploads refuse).
fn bf16_on_gpu() -> Error {
    Error::invalid("--precision", "bf16 is a CPU mode (AVX512_BF16); the GPU has f16")
}

/// The map as a neighbour table `[n_out, K]` (input row or -1). Every map kind has at most
/// one input per (output, offset).
pub fn neighbour_table(map: &KernelMap) -> Result<Vec<i32>> {
    use rayon::prelude::*;
    let (kv, n_out) = (map.volume(), map.n_out());
    // One column per offset in parallel, then rows assembled in parallel.
    let cols: Vec<Vec<i32>> = (0..kv)
        .into_par_iter()
        .map(|k| {
            let mut col = vec![-1i32; n_out];
            let (ins, outs) = map.pairs(k);
            for (&i, &o) in ins.iter().zip(outs) {
                if col[o as usize] >= 0 {
                    return Err(Error::invalid("gpu conv", "map has two inputs for one output and offset"));
                }
                col[o as usize] = i as i32;
            }
            Ok(col)
        })
        .collect::<Result<_>>()?;
    let mut nbr = vec![-1i32; n_out * kv];
    nbr.par_chunks_mut(kv.max(1)).enumerate().for_each(|(o, row)| {
        for (k, slot) in row.iter_mut().enumerate() {
            *slot = cols[k][o];
        }
    });
    Ok(nbr)
}

/// An error unless every operand belongs to `ctx` (another device's buffer would make wgpu
/// panic).
fn check_context(
    ctx: &GpuContext,
    values: &[&DeviceValues],
    tables: &[&GpuBuffer<i32>],
    bias: Option<&GpuBuffer<f32>>,
    residual: Option<&GpuBuffer<f32>>,
) -> Result<()> {
    if values.iter().any(|v| v.ctx != ctx.context_id()) {
        return Err(Error::invalid("gpu conv", "features or weights of another GPU context were passed"));
    }
    ctx.check_owns("gpu conv", tables)?;
    ctx.check_owns("gpu conv", &bias.into_iter().chain(residual).collect::<Vec<_>>())
}

/// The CPU conv's shape checks, and the residual's.
fn check_operands(
    map: &KernelMap,
    x: &[f32],
    cin: usize,
    w: &[f32],
    cout: usize,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
) -> Result<()> {
    map.check_operands(x, cin, w, cout, bias)?;
    let n_out = map.n_out();
    if residual.is_some_and(|r| r.len() != n_out * cout) {
        return Err(Error::tensor("residual", format!("expected [{n_out}, {cout}] values")));
    }
    Ok(())
}

/// The neighbour table with its rows sorted by neighbour bitmask (stable, so equal masks keep
/// output order), and the output row of each sorted row. Tiles of the output-stationary kernel
/// then hold rows that share their active offsets and skip the rest (the sorted implicit GEMM
/// of TorchSparse++, Tang et al., MICRO 2023): on the real scan a k3 tile of unsorted rows has
/// nearly every offset active while each row has about 4 of 27.
#[derive(Debug, Clone)]
pub struct SortedNeighbours {
    /// `[n_out, K]` input row or -1, rows in sorted order.
    pub nbr: Vec<i32>,
    /// Output row of each sorted row.
    pub out_rows: Vec<u32>,
}

impl SortedNeighbours {
    /// Sort the rows of `map`'s neighbour table.
    pub fn new(map: &KernelMap) -> Result<Self> {
        Ok(Self::from_table(&neighbour_table(map)?, map.volume()))
    }

    /// Sort the rows of a neighbour table `[n, volume]`. Offsets past 64 share mask bits: that
    /// only loosens the grouping, never the result.
    pub fn from_table(table: &[i32], volume: usize) -> Self {
        use rayon::prelude::*;
        let kv = volume.max(1);
        let masks: Vec<u64> = table
            .par_chunks_exact(kv)
            .map(|row| row.iter().enumerate().filter(|(_, &i)| i >= 0).fold(0u64, |m, (k, _)| m | 1 << (k % 64)))
            .collect();
        let mut out_rows: Vec<u32> = (0..masks.len() as u32).collect();
        radsort::sort_by_key(&mut out_rows, |&r| masks[r as usize]);
        let mut nbr = vec![0i32; table.len()];
        nbr.par_chunks_mut(kv).zip(out_rows.par_iter()).for_each(|(dst, &r)| {
            dst.copy_from_slice(&table[r as usize * kv..(r as usize + 1) * kv]);
        });
        Self { nbr, out_rows }
    }
}

/// `y = relu?(Σ_k gather_k(x) · W_k + bias + residual)` over `map`, weights `[K, Cin, Cout]`.
///
/// Work larger than one storage binding is split: sorted rows into slices (each slice's
/// output comes back in sorted order and is put in place on the host), input channels into
/// slices (the conv is linear in them: each slice adds onto the previous partial output, bias
/// with the first, ReLU with the last).
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
    check_operands(map, x, cin, w, cout, bias, residual)?;
    if n_out == 0 || cout == 0 {
        return Ok(vec![0.0; n_out * cout]);
    }
    let sorted = SortedNeighbours::new(map)?;
    let limit = ctx.binding_limit() as usize / 4;
    // Rows per slice: neighbour rows (K values) and output rows (Cout values) must fit.
    let rows = (limit / kv.max(cout).max(1) / TILE_ROWS * TILE_ROWS).max(TILE_ROWS);
    // Input channels per slice: all input rows of the slice's channels, and its weights.
    let chans = (limit / n_in.max(kv * cout).max(1)).max(1).min(cin.max(1));
    if rows.saturating_mul(kv.max(cout)) > limit || chans.saturating_mul(n_in.max(kv * cout)) > limit {
        return Err(Error::invalid("gpu conv", "a single row or channel exceeds the adapter's binding limit"));
    }
    let whole = rows >= n_out;
    let mut y = vec![0f32; n_out * cout];
    for r0 in (0..n_out).step_by(rows) {
        let r1 = (r0 + rows).min(n_out);
        // Unsplit, the kernel writes rows in place; a slice writes its rows in sorted order.
        let slice_rows: Vec<u32> = if whole { sorted.out_rows.clone() } else { (0..(r1 - r0) as u32).collect() };
        let mut acc: Option<Vec<f32>> = residual.map(|r| {
            if whole {
                r.to_vec()
            } else {
                sorted.out_rows[r0..r1]
                    .iter()
                    .flat_map(|&o| r[o as usize * cout..(o as usize + 1) * cout].iter().copied())
                    .collect()
            }
        });
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
                (&sorted.nbr[r0 * kv..r1 * kv], &slice_rows),
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
            if whole {
                y = a;
            } else {
                for (t, &o) in sorted.out_rows[r0..r1].iter().enumerate() {
                    y[o as usize * cout..(o as usize + 1) * cout].copy_from_slice(&a[t * cout..(t + 1) * cout]);
                }
            }
        }
    }
    Ok(y)
}

/// Features or weights on the device in a [`Precision`]'s storage format (f32 words, or f16
/// pairs packed in u32 words).
#[derive(Debug)]
pub struct DeviceValues {
    raw: wgpu::Buffer,
    // The context that made it.
    ctx: u64,
    // The pooled buffer this owns, if any (returned to the pool on drop).
    _owned: Option<GpuBuffer<u32>>,
    precision: Precision,
}

impl DeviceValues {
    /// Upload `v` in `precision`'s storage format.
    pub fn upload(ctx: &GpuContext, label: &str, v: &[f32], precision: Precision) -> Result<Self> {
        let words: Vec<u32> = match precision {
            Precision::F32 => {
                let b = ctx.to_device(label, v)?;
                return Ok(Self { raw: b.raw().clone(), ctx: b.context_id(), _owned: None, precision });
            }
            // f16 pairs packed little-end first into u32 words, as `unpack2x16float` reads them.
            Precision::Bf16 => return Err(bf16_on_gpu()),
            Precision::F16 => v
                .chunks(2)
                .map(|p| {
                    let lo = half::f16::from_f32(p[0]).to_bits() as u32;
                    let hi = p.get(1).map_or(0, |&b| half::f16::from_f32(b).to_bits() as u32);
                    lo | (hi << 16)
                })
                .collect(),
        };
        let b = ctx.to_device(label, &words)?;
        Ok(Self { raw: b.raw().clone(), ctx: b.context_id(), _owned: None, precision })
    }

    /// Features on the device in `precision`: f32 features used in place (the caller keeps
    /// `buf` alive while this is in use), or converted to packed f16 on the device.
    pub fn from_features(ctx: &GpuContext, buf: &GpuBuffer<f32>, precision: Precision) -> Result<Self> {
        Ok(match precision {
            Precision::F32 => {
                ctx.check_owns("conv features", &[buf])?;
                Self { raw: buf.raw().clone(), ctx: buf.context_id(), _owned: None, precision }
            }
            Precision::Bf16 => return Err(bf16_on_gpu()),
            Precision::F16 => {
                let packed = super::elementwise::pack_half(ctx, buf)?;
                Self { raw: packed.raw().clone(), ctx: packed.context_id(), _owned: Some(packed), precision }
            }
        })
    }
}

/// The device-resident form of [`conv_forward`] for one dispatch (everything fits a binding):
/// `nbr` is a (sorted) neighbour table `[rows, K]` and `out_rows` the output row of each of its
/// rows, `x` holds `[n_in, cin]`, `w` `[K, cin, cout]`; the output has `out_rows.len()` rows.
/// Records and submits the kernel and returns without waiting; the output stays on the device.
#[allow(clippy::too_many_arguments)]
pub fn conv_on_device(
    ctx: &GpuContext,
    (nbr, out_rows): (&GpuBuffer<i32>, &GpuBuffer<u32>),
    (x, cin): (&DeviceValues, usize),
    (w, kv, cout): (&DeviceValues, usize, usize),
    bias: Option<&GpuBuffer<f32>>,
    residual: Option<&GpuBuffer<f32>>,
    relu: bool,
) -> Result<GpuBuffer<f32>> {
    let n_out = nbr.len() / kv.max(1);
    // Every output value is written (out_rows is a permutation of the rows): no clearing.
    let by = ctx.scratch::<f32>("y", n_out * cout)?;
    conv_on_device_into(ctx, (nbr, out_rows), (x, cin), (w, kv, cout), bias, residual, relu, &by)?;
    Ok(by)
}

/// [`conv_on_device`] writing into `y`, which may hold more rows than the table: only the
/// rows `out_rows` names are written (a voxel-pruned conv's table holds only its kept rows;
/// the others were filled before). `residual` has `y`'s rows.
#[allow(clippy::too_many_arguments)]
pub fn conv_on_device_into(
    ctx: &GpuContext,
    (nbr, out_rows): (&GpuBuffer<i32>, &GpuBuffer<u32>),
    (x, cin): (&DeviceValues, usize),
    (w, kv, cout): (&DeviceValues, usize, usize),
    bias: Option<&GpuBuffer<f32>>,
    residual: Option<&GpuBuffer<f32>>,
    relu: bool,
    by: &GpuBuffer<f32>,
) -> Result<()> {
    if x.precision != w.precision {
        return Err(Error::invalid("gpu conv", "features and weights are stored in different precisions"));
    }
    let n_out = nbr.len() / kv.max(1);
    check_context(ctx, &[x, w], &[nbr], bias, residual)?;
    ctx.check_owns("gpu conv", &[out_rows])?;
    if out_rows.len() != n_out {
        return Err(Error::invalid("gpu conv", "neighbour table and output rows differ in length"));
    }
    let flags = u32::from(bias.is_some()) | (u32::from(residual.is_some()) << 1) | (u32::from(relu) << 2);
    let g = grid(n_out.div_ceil(TILE_ROWS) as u32);
    let params = Params {
        n_out: n_out as u32,
        cin: cin as u32,
        cout: cout as u32,
        volume: kv as u32,
        flags,
        row_tiles: g.0,
        col_tiles: 0,
        pad: 0,
    };
    let p = ctx.uniform(&params);
    let key = match x.precision {
        Precision::F32 => CONV,
        Precision::F16 | Precision::Bf16 => PipelineKey { variant: F16, ..CONV },
    };
    ctx.check_owns("gpu conv", &[by])?;
    if by.len() < n_out * cout || residual.is_some_and(|r| r.len() != by.len()) {
        return Err(Error::invalid("gpu conv", "output or residual smaller than the table's rows"));
    }
    if n_out == 0 {
        return Ok(());
    }
    // Absent operands still need a binding: a tiny placeholder the kernel never reads.
    let empty = ctx.placeholder();
    let bb = bias.map_or(empty, |b| b.raw());
    let br = residual.map_or(empty, |b| b.raw());
    let mut enc = ctx.encoder();
    let cols = cout.div_ceil(TILE_COLS) as u32;
    ctx.dispatch(
        &mut enc,
        key,
        &[(0, &p), (1, &x.raw), (2, &w.raw), (3, nbr.raw()), (4, bb), (5, br), (6, by.raw()), (7, out_rows.raw())],
        (g.0, g.1, cols),
    );
    ctx.submit(enc);
    Ok(())
}

/// One dispatch over a neighbour table slice, from and to host memory.
#[allow(clippy::too_many_arguments)]
fn dispatch_conv(
    ctx: &GpuContext,
    (nbr, out_rows): (&[i32], &[u32]),
    (x, cin): (&[f32], usize),
    (w, kv, cout): (&[f32], usize, usize),
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    relu: bool,
    precision: Precision,
) -> Result<Vec<f32>> {
    let bx = DeviceValues::upload(ctx, "x", x, precision)?;
    let bw = DeviceValues::upload(ctx, "weights", w, precision)?;
    let bn = ctx.to_device("neighbours", nbr)?;
    let bo = ctx.to_device("out rows", out_rows)?;
    let bb = bias.map(|b| ctx.to_device("bias", b)).transpose()?;
    let br = residual.map(|r| ctx.to_device("residual", r)).transpose()?;
    let y = conv_on_device(ctx, (&bn, &bo), (&bx, cin), (&bw, kv, cout), bb.as_ref(), br.as_ref(), relu)?;
    ctx.read(&y)
}

/// One chunk of groups whose product rows fit one temporary binding.
#[derive(Debug)]
struct Chunk {
    /// Per group: gathered input rows `[members, padded]` (-1 pads), member table, padded rows.
    groups: Vec<(GpuBuffer<i32>, GpuBuffer<[u32; 4]>, usize)>,
    /// `[n_out, offsets of the chunk]`: temp row of each (output, offset) pair, or -1.
    pidx: GpuBuffer<i32>,
    /// Offsets in the chunk and its product rows.
    offsets: usize,
    rows: usize,
}

/// The weight-stationary execution of one map under a grouping [`Plan`] (gather -> batched
/// GEMM per group -> scatter as a per-output sum), prepared on the device once per map and run
/// for any features and weights of matching shape.
#[derive(Debug)]
pub struct WeightStationary {
    chunks: Vec<Chunk>,
    n_out: usize,
}

impl WeightStationary {
    /// Upload the plan's gather lists and pair-index tables; `None` when the map has no pairs or
    /// a group's products, the inputs or the outputs exceed one binding (the output-stationary
    /// path splits those).
    pub fn prepare(ctx: &GpuContext, map: &KernelMap, plan: &Plan, cin: usize, cout: usize) -> Result<Option<Self>> {
        let limit = ctx.binding_limit() as usize / 4;
        let (n_out, kv) = (map.n_out(), map.volume());
        if map.n_in() * cin.max(1) > limit || kv * cin * cout > limit || n_out * cout.max(kv) > limit {
            return Ok(None);
        }
        let mut chunks = Vec::new();
        let mut cur: Vec<&crate::plan::Group> = Vec::new();
        let mut cur_rows = 0usize;
        let rows_of = |g: &crate::plan::Group| g.offsets.iter().map(|&k| map.size(k)).sum::<usize>();
        let mut flush = |cur: &mut Vec<&crate::plan::Group>| -> Result<()> {
            if cur.is_empty() {
                return Ok(());
            }
            let offs: Vec<usize> = cur.iter().flat_map(|g| g.offsets.iter().copied()).collect();
            let mut pidx = vec![-1i32; n_out * offs.len()];
            let mut base = 0usize;
            let mut groups = Vec::new();
            let mut j = 0usize;
            for g in cur.iter() {
                let padded = g.padded_rows.max(1);
                let mut rows = vec![-1i32; g.offsets.len() * padded];
                let mut members = Vec::new();
                for (m, &k) in g.offsets.iter().enumerate() {
                    let (ins, outs) = map.pairs(k);
                    for (i, (&a, &o)) in ins.iter().zip(outs).enumerate() {
                        rows[m * padded + i] = a as i32;
                        pidx[o as usize * offs.len() + j] = (base + i) as i32;
                    }
                    members.push([k as u32, base as u32, ins.len() as u32, 0]);
                    base += ins.len();
                    j += 1;
                }
                groups.push((ctx.to_device("gather rows", &rows)?, ctx.to_device("members", &members)?, padded));
            }
            chunks.push(Chunk { groups, pidx: ctx.to_device("pair index", &pidx)?, offsets: offs.len(), rows: base });
            cur.clear();
            Ok(())
        };
        for g in &plan.groups {
            let rows = rows_of(g);
            if rows * cout > limit || g.offsets.len() * g.padded_rows > limit || n_out * (g.offsets.len()) > limit {
                return Ok(None);
            }
            let offs: usize = cur.iter().map(|g| g.offsets.len()).sum::<usize>() + g.offsets.len();
            if (cur_rows + rows) * cout > limit || n_out * offs > limit {
                flush(&mut cur)?;
                cur_rows = 0;
            }
            cur.push(g);
            cur_rows += rows;
        }
        flush(&mut cur)?;
        Ok((!chunks.is_empty()).then_some(Self { chunks, n_out }))
    }

    /// Chunks of groups (more than one when the products exceed one binding).
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// `y = relu?(Σ_k gather_k(x) · W_k + bias + residual)`, recorded and submitted; the output
    /// stays on the device. Sums run in the plan's offset order, the same on every run.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        ctx: &GpuContext,
        (x, cin): (&DeviceValues, usize),
        (w, cout): (&DeviceValues, usize),
        bias: Option<&GpuBuffer<f32>>,
        residual: Option<&GpuBuffer<f32>>,
        relu: bool,
    ) -> Result<GpuBuffer<f32>> {
        if x.precision != w.precision {
            return Err(Error::invalid("gpu conv", "features and weights are stored in different precisions"));
        }
        let key = |k: PipelineKey| match x.precision {
            Precision::F32 => k,
            Precision::F16 | Precision::Bf16 => PipelineKey { variant: F16, ..k },
        };
        let tables: Vec<&GpuBuffer<i32>> = self.chunks.iter().map(|c| &c.pidx).collect();
        check_context(ctx, &[x, w], &tables, bias, residual)?;
        let y = ctx.scratch::<f32>("y", self.n_out * cout)?;
        let empty = ctx.placeholder();
        let col_tiles = cout.div_ceil(TILE_COLS).max(1);
        let mut enc = ctx.encoder();
        let n_chunks = self.chunks.len();
        for (c, chunk) in self.chunks.iter().enumerate() {
            let temp = ctx.scratch::<f32>("products", chunk.rows * cout)?;
            for (rows, members, padded) in &chunk.groups {
                let g = grid(padded.div_ceil(TILE_ROWS) as u32);
                let p = ctx.uniform(&Params {
                    n_out: *padded as u32,
                    cin: cin as u32,
                    cout: cout as u32,
                    volume: members.len() as u32,
                    flags: 0,
                    row_tiles: g.0,
                    col_tiles: col_tiles as u32,
                    pad: 0,
                });
                let binds = [(0, &p), (1, &x.raw), (2, &w.raw), (3, rows.raw()), (6, temp.raw()), (8, members.raw())];
                ctx.dispatch(&mut enc, key(GATHER_GEMM), &binds, (g.0, g.1, (members.len() * col_tiles) as u32));
            }
            let first = c == 0;
            let flags = if first { u32::from(bias.is_some()) | (u32::from(residual.is_some()) << 1) } else { 8 }
                | (u32::from(relu && c + 1 == n_chunks) << 2);
            let threads = (self.n_out * cout.div_ceil(4)) as u32;
            let g = grid(threads.div_ceil(256));
            let p = ctx.uniform(&Params {
                n_out: self.n_out as u32,
                cin: cin as u32,
                cout: cout as u32,
                volume: chunk.offsets as u32,
                flags,
                row_tiles: g.0,
                col_tiles: 0,
                pad: 0,
            });
            let binds = [
                (0, &p),
                (3, chunk.pidx.raw()),
                (4, bias.map_or(empty, |b| b.raw())),
                (5, residual.map_or(empty, |b| b.raw())),
                (6, y.raw()),
                (9, temp.raw()),
            ];
            ctx.dispatch(&mut enc, key(SCATTER_SUM), &binds, (g.0, g.1, 1));
        }
        ctx.submit(enc);
        Ok(y)
    }
}

/// [`conv_forward`] under a grouping plan: output-tiled plans run the output-stationary kernel,
/// the others gather -> GEMM -> scatter per group ([`WeightStationary`]), falling back to the
/// output-stationary kernel (which splits) when the work exceeds one binding.
#[allow(clippy::too_many_arguments)]
pub fn conv_forward_planned(
    ctx: &GpuContext,
    map: &KernelMap,
    plan: &Plan,
    x: &[f32],
    cin: usize,
    w: &[f32],
    cout: usize,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    relu: bool,
    precision: Precision,
) -> Result<Vec<f32>> {
    check_operands(map, x, cin, w, cout, bias, residual)?;
    plan.check(map)?;
    let n_out = map.n_out();
    let ws = match plan.output_tiled || n_out == 0 || cout == 0 || map.total_pairs() == 0 {
        true => None,
        false => WeightStationary::prepare(ctx, map, plan, cin, cout)?,
    };
    let Some(ws) = ws else {
        return conv_forward(ctx, map, x, cin, w, cout, bias, residual, relu, precision);
    };
    let bx = DeviceValues::upload(ctx, "x", x, precision)?;
    let bw = DeviceValues::upload(ctx, "weights", w, precision)?;
    let bb = bias.map(|b| ctx.to_device("bias", b)).transpose()?;
    let br = residual.map(|r| ctx.to_device("residual", r)).transpose()?;
    let y = ws.run(ctx, (&bx, cin), (&bw, cout), bb.as_ref(), br.as_ref(), relu)?;
    ctx.read(&y)
}

/// A dense GEMM `a [m, k] · b [k, n]` through the same kernel (one offset, every row its own
/// neighbour): the baseline the sparse layers are compared with in `benches/gpu.rs`.
pub fn dense_gemm(ctx: &GpuContext, a: &[f32], m: usize, k: usize, b: &[f32], n: usize) -> Result<Vec<f32>> {
    if a.len() != m * k || b.len() != k * n {
        return Err(Error::invalid("gpu gemm", "operand sizes do not match"));
    }
    let rows: Vec<i32> = (0..m as i32).collect();
    let out_rows: Vec<u32> = (0..m as u32).collect();
    dispatch_conv(ctx, (&rows, &out_rows), (a, k), (b, 1, n), None, None, false, Precision::F32)
}
