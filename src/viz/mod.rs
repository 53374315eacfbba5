//! Visualization of segmentations (behind the `rerun` cargo feature).

#[cfg(feature = "rerun")]
pub mod rerun;

/// RGB colour of each SemanticKITTI training id (0..=19) from the yaml's colour map.
pub fn class_colors(lm: &crate::io::kitti::LearningMap) -> Vec<[u8; 3]> {
    (0..=crate::io::kitti::NUM_CLASSES as u32)
        .map(|t| lm.colors.get(&lm.to_raw(t)).copied().unwrap_or([0, 0, 0]))
        .collect()
}
