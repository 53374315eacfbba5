//! SPVCNN (Tang et al., ECCV 2020): MinkUNet's voxel branch plus a point branch that carries
//! per-point features through three point-wise MLPs and meets the voxels by trilinear
//! devoxelization and point-to-voxel averaging. Module names follow SPVNAS.

use super::arch::{ArchKind, NetDesc, IN_CHANNELS};
use super::checkpoint::Checkpoint;
use super::layers::Linear;
use super::minkunet::MinkUNet;
use super::points::{initial_voxelize, point_to_voxel, voxel_to_point, PointTensor};
use crate::device::Engine;
use crate::error::{Error, Result};
use crate::tensor::SparseTensor;

/// SPVCNN: the MinkUNet body plus `point_transforms.{0,1,2}` (Linear + BatchNorm1d + ReLU).
#[derive(Debug, Clone)]
pub struct Spvcnn {
    /// Stem, stages, up stages and classifier, as in MinkUNet.
    pub body: MinkUNet,
    /// Point MLPs with BatchNorm folded in (ReLU after each).
    pub point_transforms: [Linear; 3],
}

impl Spvcnn {
    /// The uniform network of width factor `cr` from a checkpoint, rejecting unknown tensors.
    pub fn load(ck: &Checkpoint, cr: f32, num_classes: usize) -> Result<Self> {
        Self::from_desc(ck, &NetDesc::uniform(ArchKind::Spvcnn, cr, num_classes)?)
    }

    /// The network `desc` (any per-layer widths) from a checkpoint, rejecting unknown tensors.
    pub fn from_desc(ck: &Checkpoint, desc: &NetDesc) -> Result<Self> {
        if desc.kind != ArchKind::Spvcnn || desc.point_transforms.len() != 3 {
            return Err(Error::invalid("SPVCNN", "the description is not an SPVCNN with three point transforms"));
        }
        let body = MinkUNet::load_parts(ck, desc)?;
        let pts = desc.point_transforms.iter().map(|l| Linear::load(ck, l)).collect::<Result<Vec<_>>>()?;
        ck.finish()?;
        let point_transforms: [Linear; 3] =
            pts.try_into().map_err(|_| Error::invalid("SPVCNN", "expected three point transforms"))?;
        Ok(Self { body, point_transforms })
    }

    /// New point features: the voxels interpolated at the points plus point MLP `i` (with ReLU)
    /// of the previous point features.
    fn point_update(&self, e: &Engine, i: usize, h: &SparseTensor, z: &PointTensor) -> Result<Vec<f32>> {
        let mut f = voxel_to_point(h, z)?;
        let m = self.point_transforms[i].forward(e, &z.feats)?;
        for (a, m) in f.iter_mut().zip(m) {
            *a += m.max(0.0);
        }
        Ok(f)
    }

    /// Logits `[P, num_classes]` per point. `z` holds 4 features (x, y, z, remission) and
    /// coordinates in voxel units.
    pub fn forward(&self, e: &Engine, z: &PointTensor) -> Result<Vec<f32>> {
        if z.channels != IN_CHANNELS {
            return Err(Error::tensor(
                "feats",
                format!("SPVCNN takes {IN_CHANNELS} input features, got {}", z.channels),
            ));
        }
        if z.is_empty() {
            return Ok(Vec::new());
        }
        let b = &self.body;
        let (x0, _) = initial_voxelize(z)?;
        let x0 = b.stem(e, &x0)?;
        let z0 = z.with_feats(voxel_to_point(&x0, z)?, x0.channels())?;
        let first = point_to_voxel(&x0, &z0)?;
        let (mut h, mut skips) = b.encode(e, x0, Some(first))?;
        // Point branch meets the voxels after the encoder, after up2 and after up4.
        let mut z_cur = z0;
        let mut zi = 0;
        for ui in 0..b.ups.len() {
            if MinkUNet::meets_points_before(ui) {
                z_cur = z_cur.with_feats(self.point_update(e, zi, &h, &z_cur)?, h.channels())?;
                zi += 1;
                h = point_to_voxel(&h, &z_cur)?;
            }
            let skip = skips.pop().ok_or_else(|| Error::invalid("SPVCNN", "unbalanced skips"))?;
            h = b.up_stage(e, ui, &h, &skip)?;
        }
        b.classifier.forward(e, &self.point_update(e, zi, &h, &z_cur)?)
    }
}
