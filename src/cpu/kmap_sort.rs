//! Kernel maps by merge-sort (PointAcc, Lin et al., MICRO 2021): sort the packed keys once;
//! shifting every key by one offset keeps them sorted, so each offset is one linear merge.

use std::sync::Arc;

use rayon::prelude::*;

use super::{query_plan, SharedMut};
use crate::coords;
use crate::error::Result;
use crate::kmap::{downsample_keys, scaled_offsets, KernelMap, KernelSpec, MapKind, NONE};
use crate::tensor::CoordSet;

/// Build the submanifold (stride 1) or downsampling map of `spec` on `input` by merging sorted keys.
pub fn build(input: &Arc<CoordSet>, spec: KernelSpec) -> Result<KernelMap> {
    let offsets = scaled_offsets(&spec, input.stride())?;
    let mut in_sorted: Vec<(u64, u32)> = input
        .coords()
        .par_iter()
        .enumerate()
        .map(|(i, &c)| (coords::pack(c), i as u32))
        .collect();
    radsort::sort_by_key(&mut in_sorted, |e| e.0);
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
    let n_out = out_sorted.len();
    let kv = offsets.len();
    let mut table = vec![NONE; kv * n_out];
    let (identity, tasks) = query_plan(&offsets, sub);
    if let Some(c) = identity {
        table[c * n_out..(c + 1) * n_out]
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = i as u32);
    }
    let tp = SharedMut(table.as_mut_ptr());
    let ins = &in_sorted[..];
    tasks.par_iter().for_each(|&(k, mirror)| {
        let dk = coords::delta_key(offsets[k]);
        let tp = tp;
        let mut j = 0usize;
        for &(ok, q) in out_sorted {
            let target = (ok as i64).wrapping_add(dk) as u64;
            // Shifted output keys ascend, so the input cursor only moves forward.
            while j < ins.len() && ins[j].0 < target {
                j += 1;
            }
            if j == ins.len() {
                break;
            }
            if ins[j].0 == target {
                let p = ins[j].1;
                // SAFETY: task k alone writes rows k and mirror(k); rows are disjoint between tasks.
                unsafe {
                    *tp.0.add(k * n_out + q as usize) = p;
                    if let Some(m) = mirror {
                        *tp.0.add(m * n_out + p as usize) = q;
                    }
                }
            }
        }
    });
    let kind = if sub { MapKind::Submanifold } else { MapKind::Down };
    Ok(KernelMap::from_table(kind, spec, offsets, input.clone(), out_coords, &table))
}
