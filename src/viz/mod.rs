//! Visualization of segmentations: class colours, the network's levels as it ran on a scan
//! (from the engine's layer trace), and the rerun recording (behind the `rerun` feature).

#[cfg(feature = "rerun")]
pub mod rerun;

use std::sync::Arc;

use crate::device::LayerTrace;
use crate::error::{Error, Result};
use crate::tensor::CoordSet;

/// RGB colour of each SemanticKITTI training id (0..=19) from the yaml's colour map.
pub fn class_colors(lm: &crate::io::kitti::LearningMap) -> Vec<[u8; 3]> {
    (0..=crate::io::kitti::NUM_CLASSES as u32)
        .map(|t| lm.colors.get(&lm.to_raw(t)).copied().unwrap_or([0, 0, 0]))
        .collect()
}

/// One resolution of the network as it ran on a scan: the voxels its convs wrote, and for a
/// voxel-pruned network how often each voxel was computed.
#[derive(Debug, Clone)]
pub struct Level {
    /// Tensor stride (1, 2, 4, 8, 16 for MinkUNet).
    pub stride: i32,
    /// The level's voxels (coordinates in stride-1 voxel units, multiples of `stride`).
    pub coords: Arc<CoordSet>,
    /// Convs that wrote this level.
    pub convs: usize,
    /// Of those, the voxel-pruned ones (a subset of their outputs computed).
    pub pruned_convs: usize,
    /// Per voxel: of the `pruned_convs`, how many computed it.
    pub computed: Vec<u16>,
}

/// The network's levels from a layer trace ([`crate::device::Engine::start_trace`] before the forward
/// pass, [`crate::device::Engine::take_trace`] after), finest first. A level is the first coordinate
/// set seen at its stride (MinkUNet's decoder writes the encoder's sets again; a voxel-pruned
/// downsampling conv makes the smaller set that the rest of that level then uses).
pub fn levels(trace: &[LayerTrace]) -> Vec<Level> {
    let mut out: Vec<Level> = Vec::new();
    for t in trace {
        let s = t.out_coords.stride();
        let lvl = match out.iter_mut().position(|l| l.stride == s) {
            Some(i) => &mut out[i],
            None => {
                out.push(Level {
                    stride: s,
                    coords: t.out_coords.clone(),
                    convs: 0,
                    pruned_convs: 0,
                    computed: vec![0; t.out_coords.len()],
                });
                out.last_mut().expect("just pushed")
            }
        };
        // Another set at the same stride (a point-voxel network re-voxelizing) is not this
        // level's: its rows would not line up.
        if t.out_coords.id() != lvl.coords.id() {
            continue;
        }
        lvl.convs += 1;
        if let Some(rows) = &t.computed_rows {
            lvl.pruned_convs += 1;
            for &r in rows.iter() {
                if let Some(c) = lvl.computed.get_mut(r as usize) {
                    *c += 1;
                }
            }
        }
    }
    out.sort_by_key(|l| l.stride);
    out
}

/// Class of each voxel of a coarser `level`: the most frequent label among the stride-1
/// voxels (`fine`, `labels` one per row) that fall into it (ties to the lower id; 0 where none
/// does).
pub fn majority_labels(fine: &CoordSet, labels: &[u32], level: &CoordSet, classes: usize) -> Result<Vec<u32>> {
    if labels.len() != fine.len() {
        return Err(Error::invalid("levels", "labels do not match the voxels"));
    }
    let s = level.stride();
    let mut row: hashbrown::HashMap<[i32; 4], u32> = hashbrown::HashMap::with_capacity(level.len());
    for (i, &c) in level.coords().iter().enumerate() {
        row.insert(c, i as u32);
    }
    let mut counts = vec![0u32; level.len() * classes];
    for (&c, &l) in fine.coords().iter().zip(labels) {
        let p = [c[0], c[1].div_euclid(s) * s, c[2].div_euclid(s) * s, c[3].div_euclid(s) * s];
        if let (Some(&r), true) = (row.get(&p), (l as usize) < classes) {
            counts[r as usize * classes + l as usize] += 1;
        }
    }
    Ok(counts
        .chunks_exact(classes)
        .map(|h| {
            let mut best = 0;
            for j in 1..classes {
                if h[j] > h[best] {
                    best = j;
                }
            }
            if h[best] == 0 {
                0
            } else {
                best as u32
            }
        })
        .collect())
}
