//! Voxelization (points to unique voxels, mean features, per-point inverse map) and devoxelization.

use std::sync::Arc;

use crate::coords;
use crate::error::{Error, Result};
use crate::tensor::{CoordSet, SparseTensor};

/// A point cloud: row-major `[N, dims]` f32, the first three columns x, y, z.
#[derive(Debug, Clone, PartialEq)]
pub struct PointCloud {
    /// Row-major point rows.
    pub data: Vec<f32>,
    /// Values per point (at least 3).
    pub dims: usize,
}

impl PointCloud {
    /// Validate a point matrix: `dims >= 3`, whole rows, finite x, y, z.
    pub fn new(data: Vec<f32>, dims: usize) -> Result<Self> {
        if dims < 3 {
            return Err(Error::tensor("points", format!("need at least x, y, z per point, got {dims} values")));
        }
        if !data.len().is_multiple_of(dims) {
            return Err(Error::tensor(
                "points",
                format!("{} values is not a whole number of {dims}-value points", data.len()),
            ));
        }
        if !all_finite(&data) {
            let i = data.chunks_exact(dims).position(|p| !p.iter().all(|v| v.is_finite())).unwrap_or(0);
            return Err(Error::tensor("points", format!("point {i} has a NaN or infinite value")));
        }
        Ok(Self { data, dims })
    }
    /// Number of points.
    pub fn len(&self) -> usize {
        self.data.len() / self.dims
    }
    /// True when there are no points.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    /// Point `i`.
    pub fn point(&self, i: usize) -> &[f32] {
        &self.data[i * self.dims..(i + 1) * self.dims]
    }
}

/// Whether every value is finite. Checks whole blocks without an early exit, so the loop
/// vectorizes (scans are validated on every read; the point-by-point search for the
/// offending point runs only when this fails).
pub fn all_finite(data: &[f32]) -> bool {
    data.chunks(1024).all(|c| c.iter().fold(true, |ok, v| ok & v.is_finite()))
}

/// Voxels of one or more scans and the way back to their points.
#[derive(Debug, Clone)]
pub struct Voxelized {
    /// Voxel coordinates (packed-key order: batch, x, y, z) with the mean of every point column.
    pub tensor: SparseTensor,
    /// For every input point (scans concatenated in order): its voxel row.
    pub inverse: Vec<u32>,
    /// Points per voxel.
    pub counts: Vec<u32>,
}

/// Voxel coordinate of a point: `floor(p / voxel_size)` per axis (f32, as NumPy float32 does).
pub fn voxel_coord(p: &[f32], voxel_size: f32, batch: i32) -> Result<[i32; 4]> {
    let mut c = [batch, 0, 0, 0];
    for a in 0..3 {
        let v = (p[a] / voxel_size).floor();
        if !(v >= -(coords::COORD_LIMIT as f32) && v < coords::COORD_LIMIT as f32) {
            return Err(Error::CoordRange {
                coord: [batch, (p[0] / voxel_size) as i32, (p[1] / voxel_size) as i32, (p[2] / voxel_size) as i32],
                msg: format!(
                    "point ({}, {}, {}) is more than {} voxels from the origin",
                    p[0],
                    p[1],
                    p[2],
                    coords::COORD_LIMIT
                ),
            });
        }
        c[a + 1] = v as i32;
    }
    Ok(c)
}

/// Voxelize one scan (batch index 0).
pub fn voxelize(cloud: &PointCloud, voxel_size: f32) -> Result<Voxelized> {
    voxelize_batch(std::slice::from_ref(cloud), voxel_size)
}

/// Voxelize several scans into one batch (scan `i` gets batch index `i`).
/// Features are the per-voxel mean of every point column, summed in point order in f64.
pub fn voxelize_batch(clouds: &[PointCloud], voxel_size: f32) -> Result<Voxelized> {
    if !(voxel_size.is_finite() && voxel_size > 0.0) {
        return Err(Error::invalid("voxelize", format!("voxel size must be positive, got {voxel_size}")));
    }
    if clouds.len() > coords::MAX_BATCH as usize + 1 {
        return Err(Error::invalid("voxelize", format!("at most {} scans per batch", coords::MAX_BATCH + 1)));
    }
    let dims = clouds.first().map_or(3, |c| c.dims);
    if let Some(c) = clouds.iter().find(|c| c.dims != dims) {
        return Err(Error::invalid("voxelize", format!("scans have {dims} and {} values per point", c.dims)));
    }
    let total: usize = clouds.iter().map(|c| c.len()).sum();
    if total > u32::MAX as usize {
        return Err(Error::invalid("voxelize", "more than 2^32 - 1 points"));
    }
    use rayon::prelude::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    // Points are numbered scan by scan in input order; `first[b]` is scan b's first number.
    let first: Vec<usize> = std::iter::once(0)
        .chain(clouds.iter().scan(0, |n, c| {
            *n += c.len();
            Some(*n)
        }))
        .collect();
    let point = |i: usize| {
        let b = first.partition_point(|&f| f <= i) - 1;
        clouds[b].point(i - first[b])
    };
    let mut parts = clouds.iter().enumerate().map(|(b, c)| {
        c.data
            .par_chunks_exact(dims)
            .enumerate()
            .map(|(i, p)| Ok((coords::pack(voxel_coord(p, voxel_size, b as i32)?), (first[b] + i) as u32)))
            .collect::<Result<Vec<(u64, u32)>>>()
    });
    let mut keyed = parts.next().transpose()?.unwrap_or_default();
    for part in parts {
        keyed.extend_from_slice(&part?);
    }
    // Stable: points of one voxel stay in input order, so the mean is summed deterministically.
    radsort::sort_by_key(&mut keyed, |e| e.0);
    let starts = run_starts(&keyed);
    let n_vox = starts.len() - 1;
    // One task per run of voxels; each voxel is summed by one task in point order (same bits
    // whatever the thread count); each point's inverse slot is written exactly once.
    let inverse_at: Vec<AtomicU32> = (0..total).map(|_| AtomicU32::new(0)).collect();
    let mut feats = vec![0f32; n_vox * dims];
    feats.par_chunks_mut(dims.max(1)).enumerate().for_each(|(v, out)| {
        let mut acc = [0f64; 8];
        let mut accv = vec![0f64; if dims > 8 { dims } else { 0 }];
        let acc: &mut [f64] = if dims <= 8 { &mut acc[..dims] } else { &mut accv };
        for &(_, pi) in &keyed[starts[v]..starts[v + 1]] {
            inverse_at[pi as usize].store(v as u32, Ordering::Relaxed);
            for (a, &x) in acc.iter_mut().zip(point(pi as usize)) {
                *a += x as f64;
            }
        }
        let n = (starts[v + 1] - starts[v]) as f64;
        for (o, a) in out.iter_mut().zip(acc.iter()) {
            *o = (a / n) as f32;
        }
    });
    let counts: Vec<u32> = starts.windows(2).map(|w| (w[1] - w[0]) as u32).collect();
    let coords_out: Vec<[i32; 4]> = starts[..n_vox].par_iter().map(|&j| coords::unpack(keyed[j].0)).collect();
    let inverse: Vec<u32> = inverse_at.into_iter().map(AtomicU32::into_inner).collect();
    let set = Arc::new(CoordSet::new_unchecked(coords_out, 1));
    Ok(Voxelized { tensor: SparseTensor::new(set, feats, dims)?, inverse, counts })
}

/// Bring voxel rows `[V, C]` back to points: point `i` gets row `inverse[i]`.
pub fn devoxelize(voxel_feats: &[f32], channels: usize, inverse: &[u32]) -> Result<Vec<f32>> {
    let v = voxel_feats.len().checked_div(channels).unwrap_or(0);
    if let Some(&bad) = inverse.iter().find(|&&r| r as usize >= v) {
        return Err(Error::invalid("devoxelize", format!("inverse map points at voxel {bad} of {v}")));
    }
    let mut out = Vec::with_capacity(inverse.len() * channels);
    for &r in inverse {
        out.extend_from_slice(&voxel_feats[r as usize * channels..(r as usize + 1) * channels]);
    }
    Ok(out)
}

/// First position of every run of equal keys in `sorted` (sorted by key), then `sorted.len()`.
pub(crate) fn run_starts(sorted: &[(u64, u32)]) -> Vec<usize> {
    use rayon::prelude::*;
    (0..sorted.len())
        .into_par_iter()
        .filter(|&j| j == 0 || sorted[j].0 != sorted[j - 1].0)
        .chain(rayon::iter::once(sorted.len()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_semantics_mean_and_inverse() {
        let pts = vec![
            -0.01, 0.0, 0.0, 1.0, //
            -0.04, 0.01, 0.02, 3.0, //
            0.01, 0.0, 0.0, 5.0, //
            -0.051, 0.0, 0.0, 7.0,
        ];
        let v = voxelize(&PointCloud::new(pts, 4).unwrap(), 0.05).unwrap();
        assert_eq!(v.tensor.coords(), &[[0, -2, 0, 0], [0, -1, 0, 0], [0, 0, 0, 0]]);
        assert_eq!(v.inverse, vec![1, 1, 2, 0]);
        assert_eq!(v.counts, vec![1, 2, 1]);
        let f = v.tensor.feats();
        assert!((f[4] - (-0.025)).abs() < 1e-7 && f[7] == 2.0);
        let back = devoxelize(f, 4, &v.inverse).unwrap();
        assert_eq!(&back[0..4], &f[4..8]);
    }

    #[test]
    fn batches_and_bad_input() {
        let a = PointCloud::new(vec![0.0, 0.0, 0.0], 3).unwrap();
        let v = voxelize_batch(&[a.clone(), a.clone()], 0.1).unwrap();
        assert_eq!(v.tensor.coords(), &[[0, 0, 0, 0], [1, 0, 0, 0]]);
        // Two scans of different sizes: every point finds its own scan's voxel, means per scan.
        let c1 = PointCloud::new(vec![0.01, 0.02, 0.0, 1.0, 0.5, 0.5, 0.5, 2.0, 0.03, 0.01, 0.0, 3.0], 4).unwrap();
        let c2 = PointCloud::new(vec![-0.3, 0.1, 0.2, 4.0, 0.01, 0.02, 0.0, 5.0], 4).unwrap();
        let v = voxelize_batch(&[c1.clone(), c2.clone()], 0.1).unwrap();
        assert_eq!(v.tensor.len(), 4);
        for (g, (b, c, i)) in [(0, &c1, 0), (0, &c1, 1), (0, &c1, 2), (1, &c2, 0), (1, &c2, 1)].into_iter().enumerate()
        {
            let row = v.inverse[g] as usize;
            assert_eq!(v.tensor.coords()[row], voxel_coord(c.point(i), 0.1, b).unwrap(), "point {g}");
        }
        let row = v.inverse[0] as usize;
        assert_eq!(v.inverse[2] as usize, row);
        let mean = |a: f32, b: f32| ((a as f64 + b as f64) / 2.0) as f32;
        assert_eq!(&v.tensor.feats()[row * 4..row * 4 + 4], &[mean(0.01, 0.03), mean(0.02, 0.01), 0.0, 2.0]);
        assert_eq!(v.counts[row], 2);
        assert_ne!(v.inverse[4], v.inverse[0], "the same place in another scan is another voxel");
        assert!(PointCloud::new(vec![f32::NAN, 0.0, 0.0], 3).is_err());
        assert!(PointCloud::new(vec![0.0; 7], 3).is_err());
        assert!(voxelize(&a, 0.0).is_err());
        assert!(voxelize(&PointCloud::new(vec![1e9, 0.0, 0.0], 3).unwrap(), 0.05).is_err());
        let empty = voxelize(&PointCloud::new(vec![], 4).unwrap(), 0.05).unwrap();
        assert!(empty.tensor.is_empty() && empty.inverse.is_empty());
    }

    #[test]
    fn matches_a_naive_mean_with_the_same_bits_at_any_thread_count() {
        // A dense random cloud with many points per voxel and negative coordinates.
        let mut data = Vec::new();
        let mut r = 12345u64;
        for _ in 0..20_000 {
            for scale in [3.0f32, 3.0, 1.0, 1.0] {
                r = r.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                data.push(((r >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale);
            }
        }
        let cloud = PointCloud::new(data, 4).unwrap();
        let v = voxelize(&cloud, 0.1).unwrap();
        let mut naive: std::collections::BTreeMap<[i32; 4], (Vec<f64>, u32)> = Default::default();
        for i in 0..cloud.len() {
            let e = naive.entry(voxel_coord(cloud.point(i), 0.1, 0).unwrap()).or_insert((vec![0.0; 4], 0));
            e.0.iter_mut().zip(cloud.point(i)).for_each(|(a, &x)| *a += x as f64);
            e.1 += 1;
        }
        assert_eq!(v.tensor.len(), naive.len());
        for (row, (c, (sum, n))) in naive.iter().enumerate() {
            assert_eq!(v.tensor.coords()[row], *c);
            assert_eq!(v.counts[row], *n);
            for a in 0..4 {
                assert_eq!(v.tensor.feats()[row * 4 + a], (sum[a] / *n as f64) as f32);
            }
        }
        for i in 0..cloud.len() {
            assert_eq!(v.tensor.coords()[v.inverse[i] as usize], voxel_coord(cloud.point(i), 0.1, 0).unwrap());
        }
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let w = one.install(|| voxelize(&cloud, 0.1).unwrap());
        let bits = |t: &Voxelized| t.tensor.feats().iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&v), bits(&w));
        assert_eq!(v.inverse, w.inverse);
    }
}
