//! Kernel maps by coordinate hashing: one hashbrown table of packed input keys, parallel queries.

use std::sync::Arc;

use hashbrown::{HashMap, HashSet};
use rayon::prelude::*;

use super::{assemble, drop_offsets, query_plan};
use crate::coords;
use crate::error::Result;
use crate::kmap::{output_stride, parent_key, scaled_offsets, KernelMap, KernelSpec, MapKind};
use crate::tensor::CoordSet;

/// Build the submanifold (stride 1) or downsampling map of `spec` on `input` by hashing.
pub fn build(input: &Arc<CoordSet>, spec: KernelSpec, keep: Option<&[bool]>) -> Result<KernelMap> {
    let offsets = scaled_offsets(&spec, input.stride())?;
    let in_keys: Vec<u64> = input.coords().par_iter().map(|&c| coords::pack(c)).collect();
    let mut table: HashMap<u64, u32> = HashMap::with_capacity(in_keys.len());
    for (i, &k) in in_keys.iter().enumerate() {
        table.insert(k, i as u32);
    }
    let sub = spec.stride == 1;
    let (out_coords, out_keys) = if sub {
        (input.clone(), in_keys)
    } else {
        // Unique by hashing; sorted afterwards so both builders agree on the output row order.
        let s = output_stride(input, &spec)?;
        let mut set: HashSet<u64> = HashSet::with_capacity(in_keys.len() / 2);
        for &c in input.coords() {
            set.insert(parent_key(c, s)?);
        }
        let mut keys: Vec<u64> = set.into_iter().collect();
        radsort::sort(&mut keys);
        let cs = CoordSet::new_unchecked(keys.iter().map(|&k| coords::unpack(k)).collect(), s);
        (Arc::new(cs), keys)
    };
    let (identity, tasks) = query_plan(&offsets, sub, keep);
    let groups: Vec<Vec<(usize, Option<usize>)>> = tasks.into_iter().map(|t| vec![t]).collect();
    let mut per = assemble(offsets.len(), out_keys.len(), identity, &groups, |g| {
        let dk = coords::delta_key(offsets[g[0].0]);
        let (mut ins, mut outs) = (Vec::new(), Vec::new());
        for (q, &ok) in out_keys.iter().enumerate() {
            if let Some(&p) = table.get(&((ok as i64).wrapping_add(dk) as u64)) {
                ins.push(p);
                outs.push(q as u32);
            }
        }
        vec![(ins, outs)]
    });
    drop_offsets(&mut per, keep);
    let kind = if sub { MapKind::Submanifold } else { MapKind::Down };
    Ok(KernelMap::from_pairs(kind, spec, offsets, input.clone(), out_coords, per).with_kept(keep))
}
