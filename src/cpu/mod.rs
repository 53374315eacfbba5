//! CPU backend: kernel-map builders (hash, merge-sort) and the grouped gather–GEMM–scatter convolution.

pub mod bf16;
pub mod conv;
pub mod elementwise;
pub mod fused;
pub mod gemm;
pub mod kmap_hash;
pub mod kmap_sort;
pub mod sparse;
pub mod tune;

use std::sync::Arc;

use crate::error::Result;
pub(crate) use crate::kmap::drop_offsets;
use crate::kmap::{KernelMap, KernelSpec, MapBuilder};
use crate::tensor::CoordSet;

/// Build the forward map of a conv on `input`: submanifold for stride 1, downsampling otherwise.
pub fn build_map(builder: MapBuilder, input: &Arc<CoordSet>, spec: KernelSpec) -> Result<KernelMap> {
    build_map_keeping(builder, input, spec, None)
}

/// [`build_map`] for the offsets `keep` marks only (`None`: all): the others are not queried
/// and get no pairs, so every conv on the map skips them (offset-pruned networks; see
/// [`KernelMap::keeping`]).
pub fn build_map_keeping(
    builder: MapBuilder,
    input: &Arc<CoordSet>,
    spec: KernelSpec,
    keep: Option<&[bool]>,
) -> Result<KernelMap> {
    if let Some(k) = keep {
        KernelMap::check_keep(k, spec.volume())?;
    }
    match builder {
        MapBuilder::Hash => kmap_hash::build(input, spec, keep),
        MapBuilder::Sort => kmap_sort::build(input, spec, keep),
    }
}

/// A raw pointer that rayon tasks may share when each task writes a disjoint set of elements.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<T>(pub *mut T);
// SAFETY: users guarantee that concurrent tasks write disjoint elements; the elements move
// between threads through the pointer, so they must themselves be `Send`.
unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer (a method, so closures capture the whole `Send` wrapper, not the field).
    #[inline(always)]
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// Run the queries in parallel and lay the results out per offset. Each group of tasks
/// `(k, mirror)` is answered by one call of `query`, which returns the pairs of each task's
/// offset `k`; a mirror offset gets the same pairs swapped (map(-δ) is the transpose of
/// map(δ)); the identity offset maps every row to itself.
pub(crate) fn assemble(
    kv: usize,
    n_out: usize,
    identity: Option<usize>,
    groups: &[Vec<(usize, Option<usize>)>],
    query: impl Fn(&[(usize, Option<usize>)]) -> Vec<(Vec<u32>, Vec<u32>)> + Sync,
) -> Vec<(Vec<u32>, Vec<u32>)> {
    use rayon::prelude::*;
    let found: Vec<Vec<(Vec<u32>, Vec<u32>)>> = groups.par_iter().map(|g| query(g)).collect();
    let mut per: Vec<(Vec<u32>, Vec<u32>)> = vec![(Vec::new(), Vec::new()); kv];
    if let Some(c) = identity {
        let all: Vec<u32> = (0..n_out as u32).collect();
        per[c] = (all.clone(), all);
    }
    for (g, res) in groups.iter().zip(found) {
        for (&(k, mirror), (ins, outs)) in g.iter().zip(res) {
            if let Some(m) = mirror {
                per[m] = (outs.clone(), ins.clone());
            }
            per[k] = (ins, outs);
        }
    }
    per
}

/// Offsets a builder must query, as `(offset, mirror)`: every offset except the identity;
/// of a mirror pair (submanifold maps) only the member in the half-space
/// `(dx, dy) > (0, 0) or (dx, dy) == (0, 0) and dz > 0`, since map(-δ) is the transpose of
/// map(δ). Choosing a half-space keeps whole z-columns together for the merge-sort builder.
/// Offsets `keep` drops are not queried (a pair is queried when either member is kept).
pub(crate) fn query_plan(
    offsets: &[[i32; 3]],
    submanifold: bool,
    keep: Option<&[bool]>,
) -> (Option<usize>, Vec<(usize, Option<usize>)>) {
    let kept = |k: usize| keep.is_none_or(|m| m.get(k).copied().unwrap_or(false));
    let centre = if submanifold { offsets.iter().position(|d| *d == [0, 0, 0]) } else { None };
    let mut tasks = Vec::new();
    for (k, d) in offsets.iter().enumerate() {
        if Some(k) == centre {
            continue;
        }
        let m = if submanifold { offsets.iter().position(|e| *e == [-d[0], -d[1], -d[2]]) } else { None };
        let upper = (d[0], d[1]) > (0, 0) || ((d[0], d[1]) == (0, 0) && d[2] > 0);
        if (m.is_none() || upper) && (kept(k) || m.is_some_and(kept)) {
            tasks.push((k, m));
        }
    }
    (centre.filter(|&c| kept(c)), tasks)
}
