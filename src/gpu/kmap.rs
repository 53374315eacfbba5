//! Kernel maps on the GPU by coordinate hashing: the neighbour table `[n_out, K]` (input row or
//! -1) from `shaders/kmap_hash.wgsl`, and the canonical [`KernelMap`] assembled from it.

use std::sync::Arc;

use super::shaders::{PipelineKey, Shader};
use super::{grid, GpuContext};
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

/// For every output row and offset `k`, the input row at `out + deltas[k]`, or -1:
/// row-major `[outputs.len(), deltas.len()]`.
pub fn neighbours(
    ctx: &GpuContext,
    inputs: &[[i32; 4]],
    outputs: &[[i32; 4]],
    deltas: &[[i32; 3]],
) -> Result<Vec<i32>> {
    let (n_in, n_out, kv) = (inputs.len(), outputs.len(), deltas.len());
    if n_in >= u32::MAX as usize / 2 || n_out.saturating_mul(kv) >= u32::MAX as usize {
        return Err(Error::invalid("gpu kernel map", format!("{n_in} inputs x {n_out} outputs is too large")));
    }
    if n_out == 0 || kv == 0 {
        return Ok(Vec::new());
    }
    // Load factor at most 1/2 keeps linear probes short.
    let cap = (2 * n_in).next_power_of_two().max(64);
    let d4: Vec<[i32; 4]> = deltas.iter().map(|d| [0, d[0], d[1], d[2]]).collect();
    let bin = ctx.upload("in_coords", inputs)?;
    let bdel = ctx.upload("deltas", &d4)?;
    let table = ctx.zeroed("hash table", cap as u64 * 4)?;
    // Output rows per query slice, so the slice's coordinates and neighbour rows fit a binding.
    let limit = ctx.binding_limit() as usize;
    let rows = (limit / (4 * kv).max(16)).max(1);
    let mut out = Vec::with_capacity(n_out * kv);
    for r0 in (0..n_out).step_by(rows) {
        let r1 = (r0 + rows).min(n_out);
        let n = r1 - r0;
        let bout = ctx.upload("out_coords", &outputs[r0..r1])?;
        let nbr = ctx.zeroed("neighbours", (n * kv) as u64 * 4)?;
        let (gi, gq) = (grid((n_in as u32).div_ceil(256)), grid(((n * kv) as u32).div_ceil(256)));
        let params = |row_groups: u32| Params {
            n_in: n_in as u32,
            n_out: n as u32,
            volume: kv as u32,
            mask: cap as u32 - 1,
            row_threads: row_groups * 256,
            pad: [0; 3],
        };
        let mut enc = ctx.encoder();
        if r0 == 0 {
            let pi = ctx.uniform(&params(gi.0));
            ctx.dispatch(&mut enc, INSERT, &[(0, &pi), (1, &bin), (2, &table)], (gi.0, gi.1, 1));
        }
        let pq = ctx.uniform(&params(gq.0));
        let binds = [(0, &pq), (1, &bin), (2, &table), (3, &bout), (4, &bdel), (5, &nbr)];
        ctx.dispatch(&mut enc, QUERY, &binds, (gq.0, gq.1, 1));
        out.extend(ctx.finish_and_read::<i32>(enc, &nbr, n * kv)?);
    }
    Ok(out)
}

/// Per-offset `(input rows, output rows)` lists from a neighbour table (output-row order).
pub fn pairs_from_neighbours(nbr: &[i32], volume: usize) -> Vec<(Vec<u32>, Vec<u32>)> {
    let mut per: Vec<(Vec<u32>, Vec<u32>)> = vec![(Vec::new(), Vec::new()); volume];
    for (o, row) in nbr.chunks_exact(volume.max(1)).enumerate() {
        for (k, &i) in row.iter().enumerate() {
            if i >= 0 {
                per[k].0.push(i as u32);
                per[k].1.push(o as u32);
            }
        }
    }
    per
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
