//! Kernel maps on the GPU by coordinate hashing: the neighbour table `[n_out, K]` (input row or
//! -1) from `shaders/kmap_hash.wgsl`, and the canonical [`KernelMap`] assembled from it.

use std::sync::Arc;

use super::shaders::{PipelineKey, Shader};
use super::{grid, sort, GpuBuffer, GpuContext};
use crate::coords;
use crate::error::{Error, Result};
use crate::kmap::{drop_offsets, output_stride, parent_key, scaled_offsets, KernelMap, KernelSpec, MapKind};
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
        ctx.check_owns("gpu hash table", &[inputs])?;
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
        ctx.check_owns("gpu kernel-map query", &[inputs, outputs, deltas])?;
        ctx.check_owns("gpu kernel-map query", &[&self.table])?;
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
    sorted_map(ctx, None, input, spec, None).map(|(m, _)| m)
}

/// [`build_sorted`], also returning the map's bitmask-sorted neighbour table on the device
/// when it fits one binding; the pairs then stay on the device until first needed.
/// Offsets `keep` drops (`None`: none) get no pairs and no table entries.
pub fn build_sorted_with_tables(
    ctx: &Arc<GpuContext>,
    input: &Arc<CoordSet>,
    spec: KernelSpec,
    keep: Option<&[bool]>,
) -> Result<(KernelMap, Option<DeviceNeighbours>)> {
    sorted_map(ctx, Some(ctx), input, spec, keep)
}

fn sorted_map(
    ctx: &GpuContext,
    lazy: Option<&Arc<GpuContext>>,
    input: &Arc<CoordSet>,
    spec: KernelSpec,
    keep: Option<&[bool]>,
) -> Result<(KernelMap, Option<DeviceNeighbours>)> {
    let offsets = scaled_offsets(&spec, input.stride())?;
    if let Some(k) = keep {
        KernelMap::check_keep(k, offsets.len())?;
    }
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
        let n_out = ctx.read(&GpuBuffer::<u32>::wrap(ctx, count, 1))?[0] as usize;
        let queries =
            sort::KeyValues { hi: pkeys.hi.view(n_out), lo: pkeys.lo.view(n_out), val: pkeys.val.view(n_out) };
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
        let kind = if sub { MapKind::Submanifold } else { MapKind::Down };
        if n == n_out {
            return finish_on_device(ctx, lazy, &bn, kind, spec, offsets, input.clone(), out, keep);
        }
        nbr.extend(ctx.read(&bn)?);
    }
    let mut per = pairs_from_neighbours(&nbr, kv);
    drop_offsets(&mut per, keep);
    let kind = if sub { MapKind::Submanifold } else { MapKind::Down };
    Ok((KernelMap::from_pairs(kind, spec, offsets, input.clone(), out, per).with_kept(keep), None))
}

/// A neighbour table on the device with rows sorted by bitmask (see
/// [`super::conv::SortedNeighbours`]), ready for the output-stationary conv.
#[derive(Debug)]
pub struct DeviceNeighbours {
    /// `[n_out, K]` input rows or -1, sorted rows.
    pub nbr: GpuBuffer<i32>,
    /// Output row of each sorted row.
    pub out_rows: GpuBuffer<u32>,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct TableParams {
    n: u32,
    volume: u32,
    row_threads: u32,
    n_t: u32,
}

const ROW_MASKS: PipelineKey = PipelineKey::new(Shader::NbrTable, "row_masks");
const PERMUTE_ROWS: PipelineKey = PipelineKey::new(Shader::NbrTable, "permute_rows");
const PAIR_FLAGS: PipelineKey = PipelineKey::new(Shader::NbrTable, "pair_flags");
const PAIR_COMPACT: PipelineKey = PipelineKey::new(Shader::NbrTable, "pair_compact");
const COLUMN_STARTS: PipelineKey = PipelineKey::new(Shader::NbrTable, "column_starts");
const FILL_EMPTY: PipelineKey = PipelineKey::new(Shader::NbrTable, "fill_empty");
const TRANSPOSE_SCATTER: PipelineKey = PipelineKey::new(Shader::NbrTable, "transpose_scatter");
const DROP_OFFSETS: PipelineKey = PipelineKey::new(Shader::NbrTable, "drop_offsets");

/// A map's counts and pairs as `finish_on_device` leaves them on the device.
struct DevicePairs {
    starts: GpuBuffer<u32>,
    ins: GpuBuffer<u32>,
    outs: GpuBuffer<u32>,
}

impl DevicePairs {
    fn starts(&self, ctx: &GpuContext) -> Result<Vec<usize>> {
        Ok(ctx.read(&self.starts)?.into_iter().map(|s| s as usize).collect())
    }

    fn pairs(&self, ctx: &GpuContext, total: usize) -> Result<(Vec<u32>, Vec<u32>)> {
        let (ins, outs) = (self.ins.clone_ref().view::<u32>(total), self.outs.clone_ref().view::<u32>(total));
        let mut both = ctx.read_all(&[&ins, &outs])?.into_iter();
        Ok((both.next().unwrap_or_default(), both.next().unwrap_or_default()))
    }
}

/// [`DevicePairs`] with the context that reads them, for a lazily fetched [`KernelMap`].
struct ContextPairs {
    ctx: Arc<GpuContext>,
    pairs: DevicePairs,
}

impl crate::kmap::MapSource for ContextPairs {
    fn starts(&self) -> Result<Vec<usize>> {
        self.pairs.starts(&self.ctx)
    }

    fn pairs(&self, total: usize) -> Result<(Vec<u32>, Vec<u32>)> {
        self.pairs.pairs(&self.ctx, total)
    }
}

/// From a neighbour table on the device: the map's pairs (compacted on the device, only they
/// come back) and the bitmask-sorted table for the conv, which stays.
fn finish_on_device(
    ctx: &GpuContext,
    lazy: Option<&Arc<GpuContext>>,
    nbr: &GpuBuffer<i32>,
    kind: MapKind,
    spec: KernelSpec,
    offsets: Vec<[i32; 3]>,
    input: Arc<CoordSet>,
    out: Arc<CoordSet>,
    keep: Option<&[bool]>,
) -> Result<(KernelMap, Option<DeviceNeighbours>)> {
    let (n, kv) = (out.len(), offsets.len());
    let total = n * kv;
    let g = grid((total as u32).div_ceil(256));
    let p = ctx.uniform(&TableParams { n: n as u32, volume: kv as u32, row_threads: g.0 * 256, n_t: 0 });
    let mut enc = ctx.encoder();
    if let Some(keep) = keep {
        // The queries ran for every offset (one dispatch); the dropped ones leave the table here.
        let flags: Vec<u32> = keep.iter().map(|&k| u32::from(k)).collect();
        let bkeep = ctx.to_device("kept offsets", &flags)?;
        ctx.dispatch(&mut enc, DROP_OFFSETS, &[(0, &p), (6, nbr.raw()), (12, bkeep.raw())], (g.0, g.1, 1));
    }
    // Pairs: flag, scan, compact, offset starts.
    let flags = ctx.scratch::<u32>("pair flags", total)?;
    ctx.dispatch(&mut enc, PAIR_FLAGS, &[(0, &p), (1, nbr.raw()), (7, flags.raw())], (g.0, g.1, 1));
    sort::exclusive_scan(ctx, &mut enc, flags.raw(), total)?;
    let (ins, outs) = (ctx.scratch::<u32>("in_idx", total)?, ctx.scratch::<u32>("out_idx", total)?);
    let binds = [(0, &p), (1, nbr.raw()), (8, flags.raw()), (9, ins.raw()), (10, outs.raw())];
    ctx.dispatch(&mut enc, PAIR_COMPACT, &binds, (g.0, g.1, 1));
    let starts = ctx.scratch::<u32>("starts", kv + 1)?;
    let binds = [(0, &p), (1, nbr.raw()), (8, flags.raw()), (11, starts.raw())];
    ctx.dispatch(&mut enc, COLUMN_STARTS, &binds, ((kv as u32 + 1).div_ceil(64), 1, 1));
    let sorted = sort_rows(ctx, &mut enc, nbr, n, kv)?;
    ctx.submit(enc);
    let source = DevicePairs { starts, ins, outs };
    let map = match lazy {
        // Counts and pairs stay on the device until something on the host asks for them.
        Some(c) => {
            let source = Arc::new(ContextPairs { ctx: c.clone(), pairs: source });
            KernelMap::with_source(kind, spec, offsets, input, out, source)
        }
        None => {
            let starts = source.starts(ctx)?;
            let (in_idx, out_idx) = source.pairs(ctx, starts[kv])?;
            KernelMap::from_flat(kind, spec, offsets, input, out, starts, in_idx, out_idx)
        }
    };
    Ok((map.with_kept(keep), Some(sorted)))
}

/// Record the bitmask sort of a table's `n` rows of `kv` entries.
fn sort_rows(
    ctx: &GpuContext,
    enc: &mut wgpu::CommandEncoder,
    nbr: &GpuBuffer<i32>,
    n: usize,
    kv: usize,
) -> Result<DeviceNeighbours> {
    let gr = grid((n as u32).div_ceil(256));
    let pr = ctx.uniform(&TableParams { n: n as u32, volume: kv as u32, row_threads: gr.0 * 256, n_t: 0 });
    let keys = sort::KeyValues::alloc(ctx, n)?;
    let binds = [(0, &pr), (1, nbr.raw()), (2, keys.hi.raw()), (3, keys.lo.raw()), (4, keys.val.raw())];
    ctx.dispatch(enc, ROW_MASKS, &binds, (gr.0, gr.1, 1));
    let varying = if kv >= 64 { u64::MAX } else { (1u64 << kv) - 1 };
    let sorted = sort::sort_pairs(ctx, enc, &keys, varying)?;
    let total = n * kv;
    let g = grid((total as u32).div_ceil(256));
    let p = ctx.uniform(&TableParams { n: n as u32, volume: kv as u32, row_threads: g.0 * 256, n_t: 0 });
    let table = ctx.scratch::<i32>("sorted neighbours", total)?;
    let binds = [(0, &p), (1, nbr.raw()), (5, sorted.val.raw()), (6, table.raw())];
    ctx.dispatch(enc, PERMUTE_ROWS, &binds, (g.0, g.1, 1));
    Ok(DeviceNeighbours { nbr: table, out_rows: sorted.val })
}

impl DeviceNeighbours {
    /// The sorted table of the transposed map (`n_t` rows: the original map's inputs), built on
    /// the device from this one. Submitted, not waited for.
    pub fn transposed(&self, ctx: &GpuContext, kv: usize, n_t: usize) -> Result<DeviceNeighbours> {
        ctx.check_owns("gpu transposed table", &[&self.nbr])?;
        ctx.check_owns("gpu transposed table", &[&self.out_rows])?;
        let n = self.out_rows.len();
        let table = ctx.scratch::<i32>("transposed neighbours", n_t * kv)?;
        let mut enc = ctx.encoder();
        let gf = grid(((n_t * kv) as u32).div_ceil(256));
        let pf = ctx.uniform(&TableParams { n: n as u32, volume: kv as u32, row_threads: gf.0 * 256, n_t: n_t as u32 });
        ctx.dispatch(&mut enc, FILL_EMPTY, &[(0, &pf), (6, table.raw())], (gf.0, gf.1, 1));
        let g = grid(((n * kv) as u32).div_ceil(256));
        let p = ctx.uniform(&TableParams { n: n as u32, volume: kv as u32, row_threads: g.0 * 256, n_t: n_t as u32 });
        let binds = [(0, &p), (1, self.nbr.raw()), (5, self.out_rows.raw()), (6, table.raw())];
        ctx.dispatch(&mut enc, TRANSPOSE_SCATTER, &binds, (g.0, g.1, 1));
        let sorted = sort_rows(ctx, &mut enc, &table, n_t, kv)?;
        ctx.submit(enc);
        Ok(sorted)
    }
}

/// The submanifold (stride 1) or downsampling map of `spec` on `input`, queried on the GPU.
/// Downsampled output coordinates (unique parents) are computed on the CPU.
pub fn build(ctx: &GpuContext, input: &Arc<CoordSet>, spec: KernelSpec) -> Result<KernelMap> {
    hashed_map(ctx, None, input, spec, None).map(|(m, _)| m)
}

/// [`build`], also returning the map's bitmask-sorted neighbour table on the device when it
/// fits one binding; the pairs then stay on the device until first needed.
/// Offsets `keep` drops (`None`: none) get no pairs and no table entries.
pub fn build_with_tables(
    ctx: &Arc<GpuContext>,
    input: &Arc<CoordSet>,
    spec: KernelSpec,
    keep: Option<&[bool]>,
) -> Result<(KernelMap, Option<DeviceNeighbours>)> {
    hashed_map(ctx, Some(ctx), input, spec, keep)
}

fn hashed_map(
    ctx: &GpuContext,
    lazy: Option<&Arc<GpuContext>>,
    input: &Arc<CoordSet>,
    spec: KernelSpec,
    keep: Option<&[bool]>,
) -> Result<(KernelMap, Option<DeviceNeighbours>)> {
    let offsets = scaled_offsets(&spec, input.stride())?;
    if let Some(k) = keep {
        KernelMap::check_keep(k, offsets.len())?;
    }
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
    let kind = if sub { MapKind::Submanifold } else { MapKind::Down };
    let (n_in, n_out, kv) = (input.len(), out.len(), offsets.len());
    if n_out > 0 && n_out * kv * 4 <= ctx.binding_limit() as usize {
        check_sizes(n_in, n_out, kv)?;
        let bin = ctx.to_device("in_coords", input.coords())?;
        let bdel = ctx.to_device("deltas", &deltas4(&offsets))?;
        let table = DeviceHashTable::build(ctx, &bin)?;
        let bout = if sub { bin.clone_ref() } else { ctx.to_device("out_coords", out.coords())? };
        let nbr = table.query(ctx, &bin, &bout, &bdel)?;
        return finish_on_device(ctx, lazy, &nbr, kind, spec, offsets, input.clone(), out, keep);
    }
    let nbr = neighbours(ctx, input.coords(), out.coords(), &offsets)?;
    let mut per = pairs_from_neighbours(&nbr, offsets.len());
    drop_offsets(&mut per, keep);
    Ok((KernelMap::from_pairs(kind, spec, offsets, input.clone(), out, per).with_kept(keep), None))
}
