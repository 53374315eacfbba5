//! Device-wide primitives for the sort-based kernel map: exclusive prefix sums by
//! reduce-then-scan (`shaders/scan.wgsl`) and a stable LSD radix sort of 64-bit keys held as
//! u32 pairs with a u32 value each (`shaders/radix_sort.wgsl`). Both only record work into an
//! encoder; nothing waits.

use super::shaders::{PipelineKey, Shader};
use super::{grid, GpuBuffer, GpuContext};
use crate::error::Result;

const BLOCK: usize = 1024;
/// Values of one radix digit (8 bits; `RADIX` in `shaders/radix_sort.wgsl`).
const RADIX: usize = 256;
const REDUCE: PipelineKey = PipelineKey::new(Shader::Scan, "reduce");
const SCAN: PipelineKey = PipelineKey::new(Shader::Scan, "scan");
const COUNT: PipelineKey = PipelineKey::new(Shader::RadixSort, "count");
const SCATTER: PipelineKey = PipelineKey::new(Shader::RadixSort, "scatter");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ScanParams {
    n: u32,
    row_groups: u32,
    with_offsets: u32,
    pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct SortParams {
    n: u32,
    shift: u32,
    blocks: u32,
    row_groups: u32,
}

/// Record an in-place exclusive prefix sum of the first `n` values of `data`.
pub fn exclusive_scan(ctx: &GpuContext, enc: &mut wgpu::CommandEncoder, data: &wgpu::Buffer, n: usize) -> Result<()> {
    let blocks = n.div_ceil(BLOCK).max(1);
    let g = grid(blocks as u32);
    let params = |with_offsets| ctx.uniform(&ScanParams { n: n as u32, row_groups: g.0, with_offsets, pad: 0 });
    if blocks == 1 {
        let unused = ctx.placeholder();
        ctx.dispatch(enc, SCAN, &[(0, &params(0)), (1, data), (2, unused)], (1, 1, 1));
        return Ok(());
    }
    let sums = ctx.scratch::<u32>("scan sums", blocks)?;
    let p = params(1);
    ctx.dispatch(enc, REDUCE, &[(0, &p), (1, data), (2, sums.raw())], (g.0, g.1, 1));
    exclusive_scan(ctx, enc, sums.raw(), blocks)?;
    ctx.dispatch(enc, SCAN, &[(0, &p), (1, data), (2, sums.raw())], (g.0, g.1, 1));
    Ok(())
}

/// 64-bit keys as (high, low) u32 halves, with one u32 value per key.
#[derive(Debug)]
pub struct KeyValues {
    /// Bits 32..63 of each key.
    pub hi: GpuBuffer<u32>,
    /// Bits 0..31 of each key.
    pub lo: GpuBuffer<u32>,
    /// The value carried with each key.
    pub val: GpuBuffer<u32>,
}

impl KeyValues {
    /// Uninitialised storage for `n` keys and values.
    pub fn alloc(ctx: &GpuContext, n: usize) -> Result<Self> {
        let b = |label| ctx.scratch::<u32>(label, n);
        Ok(Self { hi: b("keys hi")?, lo: b("keys lo")?, val: b("values")? })
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.hi.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.hi.is_empty()
    }
}

/// Record a stable sort of `input` by key into new buffers (`input` is left as it was).
/// `varying` has a bit set wherever two keys may differ (OR of `key ^ first_key`); 8-bit
/// digits with no such bit are skipped, so a scan's coordinates take about 5 passes, not 8, and
/// a 27-offset neighbour bitmask 4. (4-bit digits took 7 passes for the bitmask, each a count,
/// a scan and a scatter dispatch: most of a kernel-map build's dispatches.)
pub fn sort_pairs(
    ctx: &GpuContext,
    enc: &mut wgpu::CommandEncoder,
    input: &KeyValues,
    varying: u64,
) -> Result<KeyValues> {
    ctx.check_owns("gpu radix sort", &[&input.hi, &input.lo, &input.val])?;
    let n = input.len();
    let blocks = n.div_ceil(BLOCK).max(1);
    let g = grid(blocks as u32);
    let hist = ctx.scratch::<u32>("radix histogram", RADIX * blocks)?;
    let hist = hist.raw();
    let shifts: Vec<u32> = (0..8u32).map(|d| d * 8).filter(|&s| (varying >> s) & 0xff != 0).collect();
    let bufs = [KeyValues::alloc(ctx, n)?, KeyValues::alloc(ctx, n)?];
    if shifts.is_empty() {
        let bytes = (n as u64 * 4).max(4);
        for (s, d) in [(&input.hi, &bufs[0].hi), (&input.lo, &bufs[0].lo), (&input.val, &bufs[0].val)] {
            enc.copy_buffer_to_buffer(s.raw(), 0, d.raw(), 0, bytes.min(s.raw().size()));
        }
    }
    for (pass, &shift) in shifts.iter().enumerate() {
        let p = ctx.uniform(&SortParams { n: n as u32, shift, blocks: blocks as u32, row_groups: g.0 });
        let (src, dst) = match pass {
            0 => (input, &bufs[0]),
            _ if pass % 2 == 1 => (&bufs[0], &bufs[1]),
            _ => (&bufs[1], &bufs[0]),
        };
        // Auto-derived layouts hold only the bindings an entry point uses.
        ctx.dispatch(enc, COUNT, &[(0, &p), (1, src.hi.raw()), (2, src.lo.raw()), (4, hist)], (g.0, g.1, 1));
        exclusive_scan(ctx, enc, hist, RADIX * blocks)?;
        let all = [
            (0, &p),
            (1, src.hi.raw()),
            (2, src.lo.raw()),
            (3, src.val.raw()),
            (4, hist),
            (5, dst.hi.raw()),
            (6, dst.lo.raw()),
            (7, dst.val.raw()),
        ];
        ctx.dispatch(enc, SCATTER, &all, (g.0, g.1, 1));
    }
    let [a, b] = bufs;
    // After an odd number of passes the result is in the first set.
    Ok(if shifts.is_empty() || shifts.len() % 2 == 1 { a } else { b })
}
