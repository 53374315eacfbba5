//! Kernel maps on the GPU by coordinate hashing: the neighbour table `[n_out, K]` (input row or
//! -1) from `shaders/kmap_hash.wgsl`, and the canonical [`KernelMap`] assembled from it.

use std::sync::Arc;

use super::shaders::{PipelineKey, Shader};
use super::{grid, sort, GpuBuffer, GpuContext};
use crate::coords;
use crate::error::{Error, Result};
use crate::kmap::{output_stride, parent_key, scaled_offsets, KernelMap, KernelSpec, MapKind};
use crate::tensor::CoordSet;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n_in: u32,
    n_out: u32,
    volume: u32,
    mask: u32,
    row_threads: u32,
    pad: [u32; 3],
}

const INSERT: PipelineKey = PipelineKey::new(Shader::KmapHash, "insert");
const QUERY: PipelineKey = PipelineKey::new(Shader::KmapHash, "query");

fn check_sizes(n_in: usize, n_out: usize, kv: usize) -> Result<()> {
    if n_in >= u32::MAX as usize / 2 || n_out.saturating_mul(kv) >= u32::MAX as usize {
        return Err(Error::invalid("gpu kernel map", format!("{n_in} inputs x {n_out} outputs is too large")));
    }
    Ok(())
}

/// A hash table of the input coordinates on the device (open addressing, load factor at most
/// 1/2 so linear probes stay short), ready for neighbour queries.
#[derive(Debug)]
pub struct DeviceHashTable {
    table: GpuBuffer<u32>,
    n_in: usize,
}

impl DeviceHashTable {
    /// Insert every row of `inputs` (submitted, not waited for).
    pub fn build(ctx: &GpuContext, inputs: &GpuBuffer<[i32; 4]>) -> Result<Self> {
        let n_in = inputs.len();
        check_sizes(n_in, 0, 0)?;
        let cap = (2 * n_in).next_power_of_two().max(64);
        let table = ctx.scratch::<u32>("hash table", cap)?;
        let gi = grid((n_in as u32).div_ceil(256));
        let pi = ctx.uniform(&Params {
            n_in: n_in as u32,
            n_out: 0,
            volume: 0,
            mask: cap as u32 - 1,
            row_threads: gi.0 * 256,
            pad: [0; 3],
        });
        let mut enc = ctx.encoder();
        // 0 marks an empty slot; a pooled buffer holds old contents.
        enc.clear_buffer(table.raw(), 0, None);
        ctx.dispatch(&mut enc, INSERT, &[(0, &pi), (1, inputs.raw()), (2, table.raw())], (gi.0, gi.1, 1));
        ctx.submit(enc);
        Ok(Self { table, n_in })
    }

    /// The neighbour table `[outputs.len(), deltas.len()]` (input row at `out + delta`, or -1),
    /// left on the device. `inputs` must be the buffer the table was built from.
    pub fn query(
        &self,
        ctx: &GpuContext,
        inputs: &GpuBuffer<[i32; 4]>,
        outputs: &GpuBuffer<[i32; 4]>,
        deltas: &GpuBuffer<[i32; 4]>,
    ) -> Result<GpuBuffer<i32>> {
        let (n, kv) = (outputs.len(), deltas.len());
        check_sizes(self.n_in, n, kv)?;
        if inputs.len() != self.n_in {
            return Err(Error::invalid("gpu kernel map", "queried with other inputs than the table holds"));
        }
        let nbr = ctx.scratch::<i32>("neighbours", n * kv)?;
        let gq = grid(((n * kv) as u32).div_ceil(256));
        let pq = ctx.uniform(&Params {
            n_in: self.n_in as u32,
            n_out: n as u32,
            volume: kv as u32,
            mask: self.table.len() as u32 - 1,
            row_threads: gq.0 * 256,
            pad: [0; 3],
        });
        let mut enc = ctx.encoder();
        let binds =
            [(0, &pq), (1, inputs.raw()), (2, self.table.raw()), (3, outputs.raw()), (4, deltas.raw()), (5, nbr.raw())];
        ctx.dispatch(&mut enc, QUERY, &binds, (gq.0, gq.1, 1));
        ctx.submit(enc);
        Ok(nbr)
    }
}

/// Offsets as the 4-wide rows the shaders read (batch component 0).
pub fn deltas4(deltas: &[[i32; 3]]) -> Vec<[i32; 4]> {
    deltas.iter().map(|d| [0, d[0], d[1], d[2]]).collect()
}

/// For every output row and offset `k`, the input row at `out + deltas[k]`, or -1:
/// row-major `[outputs.len(), deltas.len()]`. Output rows are queried in slices when the table
/// would exceed one binding.
pub fn neighbours(
    ctx: &GpuContext,
    inputs: &[[i32; 4]],
    outputs: &[[i32; 4]],
    deltas: &[[i32; 3]],
) -> Result<Vec<i32>> {
    let (n_in, n_out, kv) = (inputs.len(), outputs.len(), deltas.len());
    check_sizes(n_in, n_out, kv)?;
    if n_out == 0 || kv == 0 {
        return Ok(Vec::new());
    }
    let bin = ctx.to_device("in_coords", inputs)?;
    let bdel = ctx.to_device("deltas", &deltas4(deltas))?;
    let table = DeviceHashTable::build(ctx, &bin)?;
    let limit = ctx.binding_limit() as usize;
    let rows = (limit / (4 * kv).max(16)).max(1);
    let mut out = Vec::with_capacity(n_out * kv);
    for r0 in (0..n_out).step_by(rows) {
        let r1 = (r0 + rows).min(n_out);
        let bout = ctx.to_device("out_coords", &outputs[r0..r1])?;
        out.extend(ctx.read(&table.query(ctx, &bin, &bout, &bdel)?)?);
    }
    Ok(out)
}

/// Per-offset `(input rows, output rows)` lists from a neighbour table (output-row order),
/// one offset per task.
pub fn pairs_from_neighbours(nbr: &[i32], volume: usize) -> Vec<(Vec<u32>, Vec<u32>)> {
    use rayon::prelude::*;
    let kv = volume.max(1);
    (0..volume)
        .into_par_iter()
        .map(|k| {
            let (mut ins, mut outs) = (Vec::new(), Vec::new());
            for (o, row) in nbr.chunks_exact(kv).enumerate() {
                if row[k] >= 0 {
                    ins.push(row[k] as u32);
                    outs.push(o as u32);
                }
            }
            (ins, outs)
        })
        .collect()
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct SortParams {
    n: u32,
    n_out: u32,
    volume: u32,
    stride: i32,
    row_threads: u32,
    row0: u32,
    pad: [u32; 2],
}

const KEYS: PipelineKey = PipelineKey::new(Shader::KmapSort, "keys");
const SORT_QUERY: PipelineKey = PipelineKey::new(Shader::KmapSort, "query");
const UNIQUE_FLAGS: PipelineKey = PipelineKey::new(Shader::KmapSort, "unique_flags");
const COMPACT: PipelineKey = PipelineKey::new(Shader::KmapSort, "compact");

/// Bits where some packed key of `keys` differs from the first: the radix digits worth sorting.
fn varying_bits(keys: impl Iterator<Item = u64>) -> u64 {
    let mut first = None;
    keys.fold(0, |acc, k| acc | (k ^ *first.get_or_insert(k)))
}

/// Record the packed keys (of parents at `stride` when it is above 1) of every coordinate.
fn record_keys(
    ctx: &GpuContext,
    enc: &mut wgpu::CommandEncoder,
    coords: &GpuBuffer<[i32; 4]>,
    stride: i32,
) -> Result<sort::KeyValues> {
    let n = coords.len();
    let kv = sort::KeyValues::alloc(ctx, n)?;
    let g = grid((n as u32).div_ceil(256));
    let p = ctx.uniform(&SortParams {
        n: n as u32,
        n_out: 0,
        volume: 0,
        stride,
        row_threads: g.0 * 256,
        row0: 0,
        pad: [0; 2],
    });
    let binds = [(0, &p), (1, coords.raw()), (2, kv.hi.raw()), (3, kv.lo.raw()), (4, kv.val.raw())];
    ctx.dispatch(enc, KEYS, &binds, (g.0, g.1, 1));
    Ok(kv)
}

/// The map of `spec` on `input` by sorting on the GPU: radix-sorted packed keys, unique parents
/// for downsampling (sort, flag run starts, scan, compact), one binary search per (output,
/// offset). Equal, pair for pair, to the CPU's maps.
pub fn build_sorted(ctx: &GpuContext, input: &Arc<CoordSet>, spec: KernelSpec) -> Result<KernelMap> {
    let offsets = scaled_offsets(&spec, input.stride())?;
    let sub = spec.stride == 1;
    let (n_in, kv) = (input.len(), offsets.len());
    check_sizes(n_in, n_in, kv)?;
    let bin = ctx.to_device("in_coords", input.coords())?;
    let mut enc = ctx.encoder();
    let in_keys = record_keys(ctx, &mut enc, &bin, 1)?;
    let sorted =
        sort::sort_pairs(ctx, &mut enc, &in_keys, varying_bits(input.coords().iter().map(|&c| coords::pack(c))))?;
    let (out, queries) = if sub {
        ctx.submit(enc);
        (input.clone(), in_keys)
    } else {
        let s = output_stride(input, &spec)?;
        let parents: Vec<u64> = input.coords().iter().map(|&c| parent_key(c, s)).collect::<Result<_>>()?;
        let pkeys = record_keys(ctx, &mut enc, &bin, s)?;
        let psorted = sort::sort_pairs(ctx, &mut enc, &pkeys, varying_bits(parents.into_iter()))?;
        let flags = ctx.scratch::<u32>("run starts", n_in)?;
        let flags = flags.raw();
        let count = ctx.zeroed("unique count", 4)?;
        let g = grid((n_in as u32).div_ceil(256));
        let p = ctx.uniform(&SortParams {
            n: n_in as u32,
            n_out: 0,
            volume: 0,
            stride: s,
            row_threads: g.0 * 256,
            row0: 0,
            pad: [0; 2],
        });
        let (sh, sl) = (psorted.hi.raw(), psorted.lo.raw());
        ctx.dispatch(&mut enc, UNIQUE_FLAGS, &[(0, &p), (5, sh), (6, sl), (10, flags)], (g.0, g.1, 1));
        sort::exclusive_scan(ctx, &mut enc, flags, n_in)?;
        // The unique keys land at the front of the parent buffers, which are free again.
        let (uh, ul) = (pkeys.hi.raw(), pkeys.lo.raw());
        let binds = [(0, &p), (2, uh), (3, ul), (5, sh), (6, sl), (10, flags), (11, &count)];
        ctx.dispatch(&mut enc, COMPACT, &binds, (g.0, g.1, 1));
        ctx.submit(enc);
        let n_out = ctx.read(&GpuBuffer::<u32>::wrap(count, 1))?[0] as usize;
        let queries =
            sort::KeyValues { hi: pkeys.hi.cast(n_out), lo: pkeys.lo.cast(n_out), val: pkeys.val.cast(n_out) };
        let (hi, lo) = (ctx.read(&queries.hi)?, ctx.read(&queries.lo)?);
        let coords: Vec<[i32; 4]> =
            hi.iter().zip(&lo).map(|(&h, &l)| coords::unpack((u64::from(h) << 32) | u64::from(l))).collect();
        (Arc::new(CoordSet::new_unchecked(coords, s)), queries)
    };
    let n_out = out.len();
    check_sizes(n_in, n_out, kv)?;
    let dk: Vec<[u32; 2]> = offsets
        .iter()
        .map(|&d| {
            let k = coords::delta_key(d) as u64;
            [(k >> 32) as u32, k as u32]
        })
        .collect();
    let bdel = ctx.to_device("deltas", &dk)?;
    // Output rows per query slice, so the slice's neighbour rows fit a binding.
    let rows = (ctx.binding_limit() as usize / (4 * kv).max(16)).max(1);
    let mut nbr = Vec::with_capacity(n_out * kv);
    for r0 in (0..n_out).step_by(rows) {
        let n = (r0 + rows).min(n_out) - r0;
        let bn = ctx.scratch::<i32>("neighbours", n * kv)?;
        let g = grid(((n * kv) as u32).div_ceil(256));
        let p = ctx.uniform(&SortParams {
            n: n_in as u32,
            n_out: n as u32,
            volume: kv as u32,
            stride: 1,
            row_threads: g.0 * 256,
            row0: r0 as u32,
            pad: [0; 2],
        });
        let mut enc = ctx.encoder();
        let binds = [
            (0, &p),
            (2, queries.hi.raw()),
            (3, queries.lo.raw()),
            (5, sorted.hi.raw()),
            (6, sorted.lo.raw()),
            (7, sorted.val.raw()),
            (8, bdel.raw()),
            (9, bn.raw()),
        ];
        ctx.dispatch(&mut enc, SORT_QUERY, &binds, (g.0, g.1, 1));
        ctx.submit(enc);
        nbr.extend(ctx.read(&bn)?);
    }
    let per = pairs_from_neighbours(&nbr, kv);
    let kind = if sub { MapKind::Submanifold } else { MapKind::Down };
    Ok(KernelMap::from_pairs(kind, spec, offsets, input.clone(), out, per))
}

/// The submanifold (stride 1) or downsampling map of `spec` on `input`, queried on the GPU.
/// Downsampled output coordinates (unique parents) are computed on the CPU.
pub fn build(ctx: &GpuContext, input: &Arc<CoordSet>, spec: KernelSpec) -> Result<KernelMap> {
    let offsets = scaled_offsets(&spec, input.stride())?;
    let sub = spec.stride == 1;
    let out = if sub {
        input.clone()
    } else {
        let s = output_stride(input, &spec)?;
        let mut keys: Vec<u64> = input.coords().iter().map(|&c| parent_key(c, s)).collect::<Result<_>>()?;
        radsort::sort(&mut keys);
        keys.dedup();
        Arc::new(CoordSet::new_unchecked(keys.into_iter().map(coords::unpack).collect(), s))
    };
    let nbr = neighbours(ctx, input.coords(), out.coords(), &offsets)?;
    let per = pairs_from_neighbours(&nbr, offsets.len());
    let kind = if sub { MapKind::Submanifold } else { MapKind::Down };
    Ok(KernelMap::from_pairs(kind, spec, offsets, input.clone(), out, per))
}
