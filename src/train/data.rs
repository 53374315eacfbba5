//! Training data: SemanticKITTI folders and Open3D-ML NumPy scans, and random augmentation
//! (rotation about z, scaling, flips, jitter), seeded so every run is reproducible.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::kitti::{read_bin, read_label, LearningMap, NUM_CLASSES};
use crate::io::npy::{read_npy, read_points as read_npy_points};
use crate::voxel::PointCloud;

/// One labelled scan: points `[N, 4]` (x, y, z, remission) and training ids 0..=19.
#[derive(Debug, Clone)]
pub struct Sample {
    /// x, y, z, remission (0 where the source has none).
    pub points: PointCloud,
    /// Training id per point (0 = unlabeled, ignored by the loss).
    pub labels: Vec<u32>,
}

impl Sample {
    /// The points within `radius` metres of the scan's median x, y in the ground plane (a
    /// crop: fine-tuning steps on 2 cores cost in proportion to the voxels). The median, not
    /// the origin: Open3D-ML's scans are not all in the sensor frame.
    pub fn crop(&self, radius: f32) -> Sample {
        let r2 = radius * radius;
        let d = self.points.dims;
        let n = self.labels.len().min(self.points.len());
        let median = |a: usize| {
            let mut v: Vec<f32> = (0..n).map(|i| self.points.point(i)[a]).collect();
            v.sort_by(f32::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        };
        let (cx, cy) = (median(0), median(1));
        let (mut data, mut labels) = (Vec::new(), Vec::new());
        for (i, &l) in self.labels.iter().enumerate().take(n) {
            let p = self.points.point(i);
            let (x, y) = (p[0] - cx, p[1] - cy);
            if x * x + y * y <= r2 {
                data.extend_from_slice(p);
                labels.push(l);
            }
        }
        Sample { points: PointCloud { data, dims: d }, labels }
    }
}

/// `(scan, labels)` file pairs under `root/sequences/*/velodyne/*.bin` with
/// `root/sequences/*/labels/*.label`, sorted; scans without labels are skipped.
pub fn semantickitti_pairs(root: &Path) -> Result<Vec<(PathBuf, PathBuf)>> {
    let seqs = root.join("sequences");
    let rd = std::fs::read_dir(&seqs).map_err(|e| Error::io(&seqs, e))?;
    let mut out = Vec::new();
    for seq in rd.filter_map(|e| e.ok()).map(|e| e.path()) {
        let vel = seq.join("velodyne");
        let Ok(files) = std::fs::read_dir(&vel) else { continue };
        for f in files.filter_map(|e| e.ok()).map(|e| e.path()) {
            if f.extension().is_some_and(|x| x == "bin") {
                let stem = f.file_stem().map(|s| s.to_os_string()).unwrap_or_default();
                let lab = seq.join("labels").join(stem).with_extension("label");
                if lab.exists() {
                    out.push((f, lab));
                }
            }
        }
    }
    out.sort();
    if out.is_empty() {
        return Err(Error::format(root, "no sequences/*/velodyne/*.bin with matching labels/*.label"));
    }
    Ok(out)
}

/// A SemanticKITTI scan with its labels mapped to training ids.
pub fn load_semantickitti(scan: &Path, labels: &Path, lm: &LearningMap) -> Result<Sample> {
    let points = read_bin(scan)?;
    let raw = read_label(labels, Some(points.len()))?;
    Ok(Sample { points, labels: raw.iter().map(|&r| lm.to_train(r)).collect() })
}

/// An Open3D-ML scan: `points` f32 `[N, 3]` (remission 0) and `labels` `[N]` or `[N, 1]`,
/// already training ids.
pub fn load_npy(points: &Path, labels: &Path) -> Result<Sample> {
    let p = read_npy_points(points)?;
    let l = read_npy(labels)?;
    let ids = l.to_i64().ok_or_else(|| Error::format(labels, "labels must be integers"))?;
    if ids.len() != p.len() {
        return Err(Error::format(labels, format!("{} labels for {} points", ids.len(), p.len())));
    }
    if let Some(bad) = ids.iter().find(|&&v| !(0..=NUM_CLASSES as i64).contains(&v)) {
        return Err(Error::format(labels, format!("label {bad} outside 0..={NUM_CLASSES}")));
    }
    let mut data = Vec::with_capacity(p.len() * 4);
    for i in 0..p.len() {
        let q = p.point(i);
        data.extend_from_slice(&[q[0], q[1], q[2], if q.len() > 3 { q[3] } else { 0.0 }]);
    }
    Ok(Sample { points: PointCloud::new(data, 4)?, labels: ids.iter().map(|&v| v as u32).collect() })
}

/// Random augmentation of a training scan.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augment {
    /// Random rotation about z by a uniform angle.
    pub rotate: bool,
    /// Uniform scale factor range.
    pub scale: (f32, f32),
    /// Random flips of x and y (each with probability 1/2).
    pub flip: bool,
    /// Standard deviation of Gaussian jitter per coordinate, metres.
    pub jitter: f32,
}

impl Default for Augment {
    fn default() -> Self {
        Self { rotate: true, scale: (0.95, 1.05), flip: true, jitter: 0.01 }
    }
}

/// SplitMix64: a small deterministic generator for augmentation.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u = self.uniform().max(1e-300);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// Apply `aug` to a sample with randomness from `rng`; labels and remission are unchanged.
pub fn augment(s: &Sample, aug: &Augment, rng: &mut Rng) -> Sample {
    let theta = if aug.rotate { rng.uniform() * 2.0 * std::f64::consts::PI } else { 0.0 };
    let (sin, cos) = theta.sin_cos();
    let k = aug.scale.0 as f64 + rng.uniform() * (aug.scale.1 - aug.scale.0) as f64;
    let fx = if aug.flip && rng.uniform() < 0.5 { -1.0 } else { 1.0 };
    let fy = if aug.flip && rng.uniform() < 0.5 { -1.0 } else { 1.0 };
    let d = s.points.dims;
    let mut data = s.points.data.clone();
    for p in data.chunks_exact_mut(d) {
        let (x, y, z) = (p[0] as f64 * fx, p[1] as f64 * fy, p[2] as f64);
        let (xr, yr) = (cos * x - sin * y, sin * x + cos * y);
        let j = aug.jitter as f64;
        p[0] = (k * xr + j * rng.normal()) as f32;
        p[1] = (k * yr + j * rng.normal()) as f32;
        p[2] = (k * z + j * rng.normal()) as f32;
    }
    Sample { points: PointCloud { data, dims: d }, labels: s.labels.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data")
    }

    #[test]
    fn loads_bundled_folders_and_npy() {
        let pairs = semantickitti_pairs(&root().join("semantickitti")).unwrap();
        assert_eq!(pairs.len(), 1);
        let lm = LearningMap::load(&root().join("semantickitti/semantic-kitti.yaml")).unwrap();
        let s = load_semantickitti(&pairs[0].0, &pairs[0].1, &lm).unwrap();
        assert_eq!(s.labels.len(), 124_668);
        let n =
            load_npy(&root().join("open3dml/points_000700.npy"), &root().join("open3dml/labels_000700.npy")).unwrap();
        assert_eq!((n.points.len(), n.points.dims), (85_962, 4));
        assert!(n.points.data.chunks(4).all(|p| p[3] == 0.0));
        assert!(n.labels.contains(&9), "road present");
        assert!(semantickitti_pairs(&root().join("nuscenes")).is_err());
    }

    #[test]
    fn augmentation_is_rigid_up_to_scale_and_reproducible() {
        let s = Sample {
            points: PointCloud::new(vec![3.0, 4.0, 1.0, 0.7, -1.0, 2.0, -2.0, 0.1], 4).unwrap(),
            labels: vec![9, 1],
        };
        let aug = Augment { rotate: true, scale: (1.0, 1.0), flip: true, jitter: 0.0 };
        let a = augment(&s, &aug, &mut Rng::new(3));
        let b = augment(&s, &aug, &mut Rng::new(3));
        assert_eq!(a.points, b.points, "same seed, same sample");
        let r = |p: &[f32]| (p[0] * p[0] + p[1] * p[1]).sqrt();
        assert!((r(a.points.point(0)) - 5.0).abs() < 1e-5, "xy radius kept");
        assert_eq!(a.points.point(0)[2], 1.0, "z kept");
        assert_eq!(a.points.point(0)[3], 0.7, "remission kept");
        assert_eq!(a.labels, s.labels);
        let c = augment(&s, &aug, &mut Rng::new(4));
        assert_ne!(a.points, c.points, "another seed, another rotation");
    }
}
