//! CPU backend: kernel-map builders (hash, merge-sort) and the grouped gather–GEMM–scatter convolution.

pub mod conv;
pub mod gemm;
pub mod kmap_hash;
pub mod kmap_sort;
pub mod tune;

use std::sync::Arc;

use crate::error::Result;
use crate::kmap::{KernelMap, KernelSpec, MapBuilder};
use crate::tensor::CoordSet;

/// Build the forward map of a conv on `input`: submanifold for stride 1, downsampling otherwise.
pub fn build_map(builder: MapBuilder, input: &Arc<CoordSet>, spec: KernelSpec) -> Result<KernelMap> {
    match builder {
        MapBuilder::Hash => kmap_hash::build(input, spec),
        MapBuilder::Sort => kmap_sort::build(input, spec),
    }
}

/// A raw pointer that rayon tasks may share when each task writes a disjoint set of elements.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<T>(pub *mut T);
// SAFETY: users guarantee that concurrent tasks write disjoint elements.
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

/// Offsets a builder must query: every offset except the identity, and for symmetric
/// (submanifold) maps only one offset of each mirror pair, since map(-δ) is the transpose
/// of map(δ).
pub(crate) fn query_plan(offsets: &[[i32; 3]], submanifold: bool) -> (Option<usize>, Vec<(usize, Option<usize>)>) {
    let identity = if submanifold {
        offsets.iter().position(|d| *d == [0, 0, 0])
    } else {
        None
    };
    let mut tasks = Vec::new();
    for (k, d) in offsets.iter().enumerate() {
        if Some(k) == identity {
            continue;
        }
        let m = if submanifold {
            offsets.iter().position(|e| *e == [-d[0], -d[1], -d[2]])
        } else {
            None
        };
        match m {
            Some(m) if m < k => continue,
            _ => tasks.push((k, m)),
        }
    }
    (identity, tasks)
}
