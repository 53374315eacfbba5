//! SPVCNN's point branch (Liu et al., NeurIPS 2019; Tang et al., ECCV 2020): points with float
//! coordinates in voxel units, trilinear voxel→point interpolation and point→voxel averaging.

use std::sync::Arc;

use hashbrown::HashMap;
use rayon::prelude::*;

use crate::coords;
use crate::error::{Error, Result};
use crate::tensor::{CoordSet, SparseTensor};

/// Points: float coordinates in voxel units `(x, y, z)`, a batch index, and features `[P, C]`.
#[derive(Debug, Clone)]
pub struct PointTensor {
    /// Coordinates in voxel units (metres / voxel size).
    pub coords: Vec<[f32; 3]>,
    /// Batch index per point.
    pub batch: Vec<i32>,
    /// Features, row-major `[P, C]`.
    pub feats: Vec<f32>,
    /// Channels `C`.
    pub channels: usize,
}

impl PointTensor {
    /// Validate shapes and finiteness.
    pub fn new(coords: Vec<[f32; 3]>, batch: Vec<i32>, feats: Vec<f32>, channels: usize) -> Result<Self> {
        if batch.len() != coords.len() || feats.len() != coords.len() * channels {
            return Err(Error::tensor(
                "points",
                format!(
                    "{} coordinates, {} batch indices, {} feature values for {channels} channels",
                    coords.len(),
                    batch.len(),
                    feats.len()
                ),
            ));
        }
        if let Some(i) = coords.iter().position(|c| !c.iter().all(|v| v.is_finite())) {
            return Err(Error::tensor("points", format!("point {i} has a NaN or infinite coordinate")));
        }
        Ok(Self { coords, batch, feats, channels })
    }

    /// Number of points.
    pub fn len(&self) -> usize {
        self.coords.len()
    }

    /// True when there are no points.
    pub fn is_empty(&self) -> bool {
        self.coords.is_empty()
    }

    /// The same points with other features.
    pub fn with_feats(&self, feats: Vec<f32>, channels: usize) -> Result<Self> {
        Self::new(self.coords.clone(), self.batch.clone(), feats, channels)
    }

    /// Packed key of the voxel at tensor stride `s` holding point `i`: `s·floor(p/s)`.
    fn voxel_key(&self, i: usize, s: i32) -> Result<u64> {
        let p = self.coords[i];
        let mut c = [self.batch[i], 0, 0, 0];
        for a in 0..3 {
            let v = (p[a] / s as f32).floor() * s as f32;
            if !(v >= -(coords::COORD_LIMIT as f32) && v < coords::COORD_LIMIT as f32) {
                return Err(Error::tensor("points", format!("point {i} is outside the coordinate range")));
            }
            c[a + 1] = v as i32;
        }
        coords::check(c)?;
        Ok(coords::pack(c))
    }
}

fn row_index(x: &CoordSet) -> HashMap<u64, u32> {
    let keys: Vec<u64> = x.coords().par_iter().map(|&c| coords::pack(c)).collect();
    let mut index = HashMap::with_capacity(keys.len());
    index.extend(keys.into_iter().enumerate().map(|(i, k)| (k, i as u32)));
    index
}

/// Whether point `i` of `z` sits exactly on voxel `i` of `x` at stride 1, for every `i` (SPVCNN
/// fed with voxel centres, as the pipeline does, meets its stride-1 tensors this way). Then
/// interpolation and averaging are the identity: one trilinear tap of weight exactly 1, one
/// point per voxel. The shortcuts below give the same bits as the general paths.
fn on_voxels(x: &SparseTensor, z: &PointTensor) -> bool {
    x.stride() == 1
        && x.len() == z.len()
        && x.coords()
            .par_iter()
            .zip(&z.coords)
            .zip(&z.batch)
            .all(|((c, p), &b)| c[0] == b && (0..3).all(|a| c[a + 1] as f32 == p[a] && p[a].fract() == 0.0))
}

/// Voxelize points at stride 1 (`floor`), averaging features: SPVCNN's `initial_voxelize` with
/// equal point and voxel resolution. Returns the voxels (packed-key order) and each point's row.
pub fn initial_voxelize(z: &PointTensor) -> Result<(SparseTensor, Vec<u32>)> {
    let mut keyed: Vec<(u64, u32)> =
        (0..z.len()).into_par_iter().map(|i| Ok((z.voxel_key(i, 1)?, i as u32))).collect::<Result<_>>()?;
    // Stable: a voxel's points stay in point order, so its mean is summed in that order.
    radsort::sort_by_key(&mut keyed, |e| e.0);
    let starts = crate::voxel::run_starts(&keyed);
    let members: Vec<u32> = keyed.iter().map(|e| e.1).collect();
    let vf = mean_rows(&z.feats, z.channels, &members, &starts);
    let vc: Vec<[i32; 4]> = starts[..starts.len() - 1].iter().map(|&j| coords::unpack(keyed[j].0)).collect();
    let mut idx = vec![0u32; z.len()];
    for (v, w) in starts.windows(2).enumerate() {
        for &p in &members[w[0]..w[1]] {
            idx[p as usize] = v as u32;
        }
    }
    // Unpacked from distinct packed keys: unique and in range by construction.
    let set = Arc::new(CoordSet::new_unchecked(vc, 1));
    Ok((SparseTensor::new(set, vf, z.channels)?, idx))
}

/// Where each of `n` rows starts in a list grouped by row, given every entry's row (a counting
/// sort's offsets): `n + 1` values, the last the number of entries.
fn row_starts(rows: impl Iterator<Item = u32>, n: usize) -> Vec<usize> {
    let mut starts = vec![0usize; n + 1];
    for r in rows {
        starts[r as usize + 1] += 1;
    }
    for v in 0..n {
        starts[v + 1] += starts[v];
    }
    starts
}

/// Per group `g`: the mean of feature rows `members[starts[g]..starts[g + 1]]` (`[G, c]`),
/// summed in f64 in member order (empty groups give zeros). Parallel over groups, so the same
/// bits for any thread count.
fn mean_rows(f: &[f32], c: usize, members: &[u32], starts: &[usize]) -> Vec<f32> {
    let groups = starts.len().saturating_sub(1);
    let mut out = vec![0f32; groups * c];
    out.par_chunks_mut(c.max(1)).enumerate().for_each(|(g, row)| {
        let rows = &members[starts[g]..starts[g + 1]];
        if rows.is_empty() {
            return;
        }
        let mut acc = vec![0f64; c];
        for &p in rows {
            for (a, &v) in acc.iter_mut().zip(&f[p as usize * c..(p as usize + 1) * c]) {
                *a += v as f64;
            }
        }
        let n = rows.len() as f64;
        for (o, a) in row.iter_mut().zip(&acc) {
            *o = (a / n) as f32;
        }
    });
    out
}

/// Trilinear interpolation of voxel features at the points (TorchSparse `voxel_to_point`):
/// the 8 voxels around `s·floor(p/s)` (x outermost, z fastest) weighted by distance; absent
/// voxels get weight 0 and the rest are renormalized.
pub fn voxel_to_point(x: &SparseTensor, z: &PointTensor) -> Result<Vec<f32>> {
    let c = x.channels();
    if on_voxels(x, z) {
        return Ok(x.try_feats()?.to_vec());
    }
    let taps = trilinear_taps(x, z)?;
    let xf = x.try_feats()?;
    let mut out = vec![0f32; z.len() * c];
    out.par_chunks_mut(c.max(1)).zip(&taps).for_each(|(row, (rows, w))| {
        for (&r, &wj) in rows.iter().zip(w) {
            if r != u32::MAX {
                for (o, &v) in row.iter_mut().zip(&xf[r as usize * c..(r as usize + 1) * c]) {
                    *o += wj * v;
                }
            }
        }
    });
    Ok(out)
}

/// For every point: the rows of its (up to) 8 surrounding voxels of `x` and their normalized
/// trilinear weights (`u32::MAX` where the voxel does not exist).
fn trilinear_taps(x: &SparseTensor, z: &PointTensor) -> Result<Vec<([u32; 8], [f32; 8])>> {
    let s = x.stride();
    let sf = s as f32;
    let index = row_index(x.coord_set());
    let keys: Vec<u64> = (0..z.len()).into_par_iter().map(|i| z.voxel_key(i, s)).collect::<Result<_>>()?;
    Ok((0..z.len())
        .into_par_iter()
        .map(|i| {
            let p = z.coords[i];
            let mut w = [0f32; 8];
            let mut rows = [u32::MAX; 8];
            let lo: [f32; 3] = std::array::from_fn(|a| (p[a] / sf).floor() * sf);
            for (j, slot) in rows.iter_mut().enumerate() {
                let d = [(j >> 2) as i32 & 1, (j >> 1) as i32 & 1, j as i32 & 1];
                let f = |a: usize| if d[a] == 1 { p[a] - lo[a] } else { lo[a] + sf - p[a] };
                let wj = f(0) * f(1) * f(2) / (sf * sf * sf);
                // A tap of weight 0 adds nothing and changes no normalization: skip its lookup
                // (points on voxel corners, e.g. voxel centres at stride 1, have one tap, not 8).
                if wj == 0.0 {
                    continue;
                }
                let key = (keys[i] as i64 + coords::delta_key([d[0] * s, d[1] * s, d[2] * s])) as u64;
                if let Some(&r) = index.get(&key) {
                    *slot = r;
                    w[j] = wj;
                }
            }
            let sum: f32 = w.iter().sum::<f32>() + 1e-8;
            (rows, w.map(|v| v / sum))
        })
        .collect())
}

/// Backward of [`voxel_to_point`]: the gradient at the voxels of `x` from the gradient at the
/// points, `[x.len(), C]`. Each voxel sums its points' terms in point order (deterministic).
pub fn voxel_to_point_backward(x: &SparseTensor, z: &PointTensor, dout: &[f32]) -> Result<Vec<f32>> {
    let c = x.channels();
    if dout.len() != z.len() * c {
        return Err(Error::tensor("grad", format!("expected [{}, {c}], got {} values", z.len(), dout.len())));
    }
    if on_voxels(x, z) {
        return Ok(dout.to_vec());
    }
    let taps = trilinear_taps(x, z)?;
    // (voxel, point, weight), grouped by voxel with points in order.
    let mut t: Vec<(u32, u32, f32)> = Vec::with_capacity(z.len() * 8);
    for (i, (rows, w)) in taps.iter().enumerate() {
        for (&r, &wj) in rows.iter().zip(w) {
            if r != u32::MAX {
                t.push((r, i as u32, wj));
            }
        }
    }
    radsort::sort_by_key(&mut t, |e| e.0);
    let starts = row_starts(t.iter().map(|e| e.0), x.len());
    let mut dx = vec![0f32; x.len() * c];
    dx.par_chunks_mut(c.max(1)).enumerate().for_each(|(v, row)| {
        let mut acc = vec![0f64; c];
        for &(_, i, w) in &t[starts[v]..starts[v + 1]] {
            for (a, &g) in acc.iter_mut().zip(&dout[i as usize * c..(i as usize + 1) * c]) {
                *a += w as f64 * g as f64;
            }
        }
        for (o, a) in row.iter_mut().zip(acc) {
            *o = a as f32;
        }
    });
    Ok(dx)
}

/// Backward of averaging points into voxels ([`point_to_voxel`], and [`initial_voxelize`] with
/// `voxel_of` its index): point `i` gets `dv[voxel_of[i]] / count` (0 for points in no voxel).
pub fn average_backward(voxel_of: &[Option<u32>], dv: &[f32], c: usize) -> Vec<f32> {
    let n = dv.len() / c.max(1);
    let mut counts = vec![0u32; n];
    for &r in voxel_of.iter().flatten() {
        counts[r as usize] += 1;
    }
    let mut dz = vec![0f32; voxel_of.len() * c];
    dz.par_chunks_mut(c.max(1)).zip(voxel_of).for_each(|(row, r)| {
        if let Some(r) = *r {
            let k = counts[r as usize] as f32;
            for (o, &g) in row.iter_mut().zip(&dv[r as usize * c..(r as usize + 1) * c]) {
                *o = g / k;
            }
        }
    });
    dz
}

/// The voxel row of `x` each point of `z` averages into (as [`point_to_voxel`] assigns them).
pub fn point_voxels(x: &SparseTensor, z: &PointTensor) -> Result<Vec<Option<u32>>> {
    if on_voxels(x, z) {
        return Ok((0..z.len() as u32).map(Some).collect());
    }
    let index = row_index(x.coord_set());
    (0..z.len()).into_par_iter().map(|i| Ok(index.get(&z.voxel_key(i, x.stride())?).copied())).collect()
}

/// Average point features into the voxels of `x` (TorchSparse `point_to_voxel`): each point
/// goes to `s·floor(p/s)`; voxels without points get zeros. Output lives on `x`'s coordinates.
pub fn point_to_voxel(x: &SparseTensor, z: &PointTensor) -> Result<SparseTensor> {
    if on_voxels(x, z) {
        return SparseTensor::new(x.coord_set().clone(), z.feats.clone(), z.channels);
    }
    point_to_voxel_at(x, z, &point_voxels(x, z)?)
}

/// [`point_to_voxel`] with each point's voxel already found ([`point_voxels`]), for callers
/// that keep it (the training tape).
pub fn point_to_voxel_at(x: &SparseTensor, z: &PointTensor, voxel_of: &[Option<u32>]) -> Result<SparseTensor> {
    if voxel_of.len() != z.len() || voxel_of.iter().flatten().any(|&r| r as usize >= x.len()) {
        return Err(Error::tensor(
            "points",
            format!("{} voxel indices for {} points and {} voxels", voxel_of.len(), z.len(), x.len()),
        ));
    }
    // Points grouped by voxel, in point order within a voxel (a counting sort).
    let starts = row_starts(voxel_of.iter().flatten().copied(), x.len());
    let mut next = starts.clone();
    let mut members = vec![0u32; starts[x.len()]];
    for (i, r) in voxel_of.iter().enumerate() {
        if let Some(r) = *r {
            members[next[r as usize]] = i as u32;
            next[r as usize] += 1;
        }
    }
    let feats = mean_rows(&z.feats, z.channels, &members, &starts);
    SparseTensor::new(x.coord_set().clone(), feats, z.channels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(coords: Vec<[i32; 4]>, stride: i32, feats: Vec<f32>, c: usize) -> SparseTensor {
        SparseTensor::new(Arc::new(CoordSet::new(coords, stride).unwrap()), feats, c).unwrap()
    }

    #[test]
    fn trilinear_weights_by_hand() {
        // Voxels at stride 2: (0,0,0) = 1, (2,0,0) = 3, (0,0,2) = 10; the rest absent.
        let x = tensor(vec![[0, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 2]], 2, vec![1.0, 3.0, 10.0], 1);
        // Point at (0.5, 0, 1): weights x: 0.75 / 0.25, y: 1 / 0, z: 0.5 / 0.5.
        let z = PointTensor::new(vec![[0.5, 0.0, 1.0], [-0.5, 0.0, 0.0]], vec![0, 0], vec![0.0; 2], 1).unwrap();
        let f = voxel_to_point(&x, &z).unwrap();
        // corners present: (0,0,0) w=.75*.5=.375, (0,0,2) w=.375, (2,0,0) w=.25*.5=.125 ; sum .875
        let want = (0.375 * 1.0 + 0.375 * 10.0 + 0.125 * 3.0) / 0.875;
        assert!((f[0] - want).abs() < 1e-5, "{} vs {want}", f[0]);
        // A negative point floors to (-2,0,0), whose corners (-2..0) include (0,0,0) only.
        assert!((f[1] - 1.0).abs() < 1e-5, "{}", f[1]);
        // Averaging back: both points land in voxels (0,0,0) and (-2,0,0); only (0,0,0) exists.
        let z2 = z.with_feats(vec![4.0, 8.0], 1).unwrap();
        let v = point_to_voxel(&x, &z2).unwrap();
        assert_eq!(v.feats(), &[4.0, 0.0, 0.0]);
    }

    #[test]
    fn integer_points_at_stride_1_pick_their_voxel() {
        let z = PointTensor::new(
            vec![[3.0, -2.0, 5.0], [3.5, -1.5, 5.9], [-7.0, 0.0, 0.0]],
            vec![0, 0, 1],
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            2,
        )
        .unwrap();
        let (x, idx) = initial_voxelize(&z).unwrap();
        assert_eq!(x.coords(), &[[0, 3, -2, 5], [1, -7, 0, 0]]);
        assert_eq!(idx, vec![0, 0, 1]);
        assert_eq!(x.feats(), &[2.0, 3.0, 5.0, 6.0]);
        let back = voxel_to_point(
            &x,
            &PointTensor::new(vec![[3.0, -2.0, 5.0], [-7.0, 0.0, 0.0]], vec![0, 1], vec![0.0; 4], 2).unwrap(),
        )
        .unwrap();
        assert_eq!(back, vec![2.0, 3.0, 5.0, 6.0]);
    }

    /// Points on the voxels in row order take the shortcuts; the same points in another order
    /// take the general paths. Both give the same bits.
    #[test]
    fn points_on_voxels_shortcut_matches_the_general_path() {
        let coords: Vec<[i32; 4]> = (0..40).map(|i| [i % 2, (i * 7) % 11 - 5, (i * 3) % 5 - 2, i / 2 - 9]).collect();
        let feats: Vec<f32> = (0..80).map(|i| (i as f32 * 0.37).sin()).collect();
        let x = tensor(coords.clone(), 1, feats, 2);
        let pts: Vec<[f32; 3]> = coords.iter().map(|c| [c[1] as f32, c[2] as f32, c[3] as f32]).collect();
        let batch: Vec<i32> = coords.iter().map(|c| c[0]).collect();
        let pf: Vec<f32> = (0..80).map(|i| (i as f32 * 0.11).cos()).collect();
        let z = PointTensor::new(pts.clone(), batch.clone(), pf.clone(), 2).unwrap();
        assert!(on_voxels(&x, &z));
        // Reversed order: same points, general paths.
        let rev = |v: &[f32]| -> Vec<f32> { v.chunks(2).rev().flatten().copied().collect() };
        let zr =
            PointTensor::new(pts.iter().rev().copied().collect(), batch.iter().rev().copied().collect(), rev(&pf), 2)
                .unwrap();
        assert!(!on_voxels(&x, &zr));
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&voxel_to_point(&x, &z).unwrap()), bits(&rev(&voxel_to_point(&x, &zr).unwrap())));
        assert_eq!(bits(point_to_voxel(&x, &z).unwrap().feats()), bits(point_to_voxel(&x, &zr).unwrap().feats()));
        let g: Vec<f32> = (0..80).map(|i| (i as f32 * 0.07).sin()).collect();
        assert_eq!(
            bits(&voxel_to_point_backward(&x, &z, &g).unwrap()),
            bits(&voxel_to_point_backward(&x, &zr, &rev(&g)).unwrap())
        );
        let pv: Vec<Option<u32>> = point_voxels(&x, &zr).unwrap().into_iter().rev().collect();
        assert_eq!(point_voxels(&x, &z).unwrap(), pv);
    }
}
