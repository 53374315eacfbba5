//! Kernel maps by merge-sort (PointAcc, Lin et al., MICRO 2021): sort the packed keys once;
//! shifting every key by one offset keeps them sorted, so each offset is one linear merge.

use std::sync::Arc;

use rayon::prelude::*;

use super::{assemble, drop_offsets, query_plan};
use crate::coords;
use crate::error::Result;
use crate::kmap::{downsample_keys, output_stride, parent_key, scaled_offsets, KernelMap, KernelSpec, MapKind};
use crate::tensor::CoordSet;

/// Build the submanifold (stride 1) or downsampling map of `spec` on `input` by merging sorted keys.
pub fn build(input: &Arc<CoordSet>, spec: KernelSpec, keep: Option<&[bool]>) -> Result<KernelMap> {
    let offsets = scaled_offsets(&spec, input.stride())?;
    if spec.size == 2 && spec.stride == 2 && spec.dilation == 1 {
        return build_down_k2(input, spec, offsets, keep);
    }
    let mut in_sorted: Vec<(u64, u32)> =
        input.coords().par_iter().enumerate().map(|(i, &c)| (coords::pack(c), i as u32)).collect();
    // Rows produced by this crate are already in key order; sort only when they are not.
    if !in_sorted.is_sorted_by_key(|e| e.0) {
        radsort::sort_by_key(&mut in_sorted, |e| e.0);
    }
    let sub = spec.stride == 1;
    let (out_coords, out_sorted) = if sub {
        (input.clone(), None)
    } else {
        let (keys, s) = downsample_keys(input, &spec)?;
        let cs = CoordSet::new_unchecked(keys.iter().map(|&k| coords::unpack(k)).collect(), s);
        let sorted: Vec<(u64, u32)> = keys.into_iter().enumerate().map(|(i, k)| (k, i as u32)).collect();
        (Arc::new(cs), Some(sorted))
    };
    let out_sorted: &[(u64, u32)] = out_sorted.as_deref().unwrap_or(&in_sorted);
    let ins = &in_sorted[..];
    let (identity, tasks) = query_plan(&offsets, sub, keep);
    // One merge per z-column: offsets sharing (dx, dy) target a contiguous key range, since z
    // is the lowest key field.
    let mut columns: Vec<Vec<(usize, Option<usize>)>> = Vec::new();
    for t in tasks {
        let d = offsets[t.0];
        match columns.iter_mut().find(|c| offsets[c[0].0][..2] == d[..2]) {
            Some(c) => c.push(t),
            None => columns.push(vec![t]),
        }
    }
    let mut per = assemble(offsets.len(), out_sorted.len(), identity, &columns, |col| {
        let d0 = offsets[col[0].0];
        let dcol = coords::delta_key([d0[0], d0[1], 0]);
        let dzs: Vec<i64> = col.iter().map(|&(k, _)| offsets[k][2] as i64).collect();
        let (zlo, zhi) = (dzs.iter().copied().min().unwrap_or(0), dzs.iter().copied().max().unwrap_or(0));
        let mut lists: Vec<(Vec<u32>, Vec<u32>)> = vec![(Vec::new(), Vec::new()); col.len()];
        let mut j = 0usize;
        for &(ok, q) in out_sorted {
            let t = (ok as i64).wrapping_add(dcol);
            // Shifted output keys ascend, so the input cursor only moves forward.
            while j < ins.len() && (ins[j].0 as i64) < t + zlo {
                j += 1;
            }
            let mut jj = j;
            while jj < ins.len() && (ins[jj].0 as i64) <= t + zhi {
                let dz = ins[jj].0 as i64 - t;
                if let Some(slot) = dzs.iter().position(|&z| z == dz) {
                    lists[slot].0.push(ins[jj].1);
                    lists[slot].1.push(q);
                }
                jj += 1;
            }
        }
        lists
    });
    drop_offsets(&mut per, keep);
    let kind = if sub { MapKind::Submanifold } else { MapKind::Down };
    Ok(KernelMap::from_pairs(kind, spec, offsets, input.clone(), out_coords, per).with_kept(keep))
}

/// The k = 2, stride 2 downsampling map (every MinkUNet down stage) without merging: each input
/// row has exactly one parent `S·floor(c/S)` and reaches it through the offset `c - parent`
/// (each axis 0 or one tensor stride, which are exactly the k = 2 offsets). One stable sort of
/// `(parent key, row)` gives the output rows in key order and, in the same pass, every
/// offset's pairs in output-row order: the map the merge would build, pair for pair.
// One sort serves every offset, so dropped offsets save no work here; their pairs are dropped.
fn build_down_k2(
    input: &Arc<CoordSet>,
    spec: KernelSpec,
    offsets: Vec<[i32; 3]>,
    keep: Option<&[bool]>,
) -> Result<KernelMap> {
    let s = output_stride(input, &spec)?;
    let coords = input.coords();
    let mut keyed: Vec<(u64, u32)> =
        coords.par_iter().enumerate().map(|(i, &c)| Ok((parent_key(c, s)?, i as u32))).collect::<Result<_>>()?;
    radsort::sort_by_key(&mut keyed, |e| e.0);
    // Offset of a child by its axis steps (0 or 1 tensor stride each), as x·4 + y·2 + z.
    let mut slot = [usize::MAX; 8];
    for (k, d) in offsets.iter().enumerate() {
        let bit = |v: i32| usize::from(v != 0);
        slot[bit(d[0]) * 4 + bit(d[1]) * 2 + bit(d[2])] = k;
    }
    let mut per: Vec<(Vec<u32>, Vec<u32>)> =
        vec![(Vec::with_capacity(keyed.len() / 4), Vec::with_capacity(keyed.len() / 4)); offsets.len()];
    let mut out_keys: Vec<u64> = Vec::with_capacity(keyed.len() / 2);
    for &(pk, i) in &keyed {
        if out_keys.last() != Some(&pk) {
            out_keys.push(pk);
        }
        let q = (out_keys.len() - 1) as u32;
        let (c, p) = (coords[i as usize], coords::unpack(pk));
        let step = |a: usize| usize::from(c[a] != p[a]);
        let k = slot[step(1) * 4 + step(2) * 2 + step(3)];
        debug_assert!(k < offsets.len() && (1..4).all(|a| c[a] - p[a] == offsets[k][a - 1]));
        per[k].0.push(i);
        per[k].1.push(q);
    }
    drop_offsets(&mut per, keep);
    let out = CoordSet::new_unchecked(out_keys.into_iter().map(coords::unpack).collect(), s);
    Ok(KernelMap::from_pairs(MapKind::Down, spec, offsets, input.clone(), Arc::new(out), per).with_kept(keep))
}
