//! MinkUNet as in SPVNAS / TorchSparse for SemanticKITTI (Tang et al., ECCV 2020), with the
//! same module names, so their checkpoints load unchanged.

use super::arch::{ArchKind, NetDesc, StageDesc, POINT_MEETINGS};
use super::checkpoint::Checkpoint;
use super::layers::{share_map_offsets, Conv, Linear, Residual};
use crate::device::Engine;
use crate::error::{Error, Result};
use crate::tensor::SparseTensor;
use crate::voxel_prune::VoxelPlan;

pub use super::arch::{channels, BASE_CHANNELS, IN_CHANNELS};

/// One encoder stage: k2 s2 conv + BN + ReLU, then two residual blocks.
#[derive(Debug, Clone)]
pub struct Down {
    /// `stageN.0`.
    pub down: Conv,
    /// `stageN.1`, `stageN.2`.
    pub blocks: [Residual; 2],
}

/// One decoder stage: k2 s2 transposed conv + BN + ReLU, concat with the skip, two residual blocks.
#[derive(Debug, Clone)]
pub struct Up {
    /// `upN.0`.
    pub up: Conv,
    /// `upN.1.0`, `upN.1.1`.
    pub blocks: [Residual; 2],
}

/// The MinkUNet of SPVNAS (stem, 4 down stages, 4 up stages, linear classifier), with the
/// widths of its [`NetDesc`].
#[derive(Debug, Clone)]
pub struct MinkUNet {
    /// The description it was built from (widths, shortcuts, tensor names).
    pub desc: NetDesc,
    /// `stem.0` + `stem.1`, `stem.3` + `stem.4`.
    pub stem: [Conv; 2],
    /// `stage1` … `stage4`.
    pub stages: Vec<Down>,
    /// `up1` … `up4`.
    pub ups: Vec<Up>,
    /// `classifier.0`.
    pub classifier: Linear,
}

fn stage_parts(ck: &Checkpoint, st: &StageDesc) -> Result<(Conv, [Residual; 2])> {
    Ok((Conv::load(ck, &st.resample)?, [Residual::load(ck, &st.blocks[0])?, Residual::load(ck, &st.blocks[1])?]))
}

impl MinkUNet {
    /// The uniform network of width factor `cr` from a checkpoint (BatchNorm folded into the
    /// convs), rejecting tensors of another width or architecture.
    pub fn load(ck: &Checkpoint, cr: f32, num_classes: usize) -> Result<Self> {
        let m = Self::load_parts(ck, &NetDesc::uniform(ArchKind::MinkUNet, cr, num_classes)?)?;
        ck.finish()?;
        Ok(m)
    }

    /// The network `desc` (any per-layer widths) from a checkpoint, rejecting unknown tensors.
    pub fn from_desc(ck: &Checkpoint, desc: &NetDesc) -> Result<Self> {
        let m = Self::load_parts(ck, desc)?;
        ck.finish()?;
        Ok(m)
    }

    /// Load the tensors MinkUNet shares with SPVCNN, leaving others for the caller.
    pub fn load_parts(ck: &Checkpoint, desc: &NetDesc) -> Result<Self> {
        desc.dataflow()?;
        let stem = [Conv::load(ck, &desc.stem[0])?, Conv::load(ck, &desc.stem[1])?];
        let mut stages = Vec::new();
        for st in &desc.stages {
            let (down, blocks) = stage_parts(ck, st)?;
            stages.push(Down { down, blocks });
        }
        let mut ups = Vec::new();
        for st in &desc.ups {
            let (up, blocks) = stage_parts(ck, st)?;
            ups.push(Up { up, blocks });
        }
        let classifier = Linear::load(ck, &desc.classifier)?;
        let mut m = Self { desc: desc.clone(), stem, stages, ups, classifier };
        m.share_map_offsets();
        Ok(m)
    }

    /// Every conv, in [`NetDesc::convs`] order.
    pub fn convs_mut(&mut self) -> Vec<&mut Conv> {
        let mut out: Vec<&mut Conv> = self.stem.iter_mut().collect();
        let stages = self.stages.iter_mut().map(|d| (&mut d.down, &mut d.blocks));
        let ups = self.ups.iter_mut().map(|u| (&mut u.up, &mut u.blocks));
        for (resample, blocks) in stages.chain(ups) {
            out.push(resample);
            for b in blocks.iter_mut() {
                out.push(&mut b.c1);
                out.extend(b.shortcut.as_mut());
                out.push(&mut b.c2);
            }
        }
        out
    }

    /// Build each kernel map for the offsets its convs use (see [`share_map_offsets`]); call
    /// again after changing weights.
    pub fn share_map_offsets(&mut self) {
        let maps = self.desc.conv_maps();
        share_map_offsets(&mut self.convs_mut(), &maps);
    }

    /// Build every kernel map whole, whatever the weights (the reference for offset-pruned maps).
    pub fn full_maps(&mut self) {
        for c in self.convs_mut() {
            c.map_offsets = None;
        }
    }

    /// Prune voxels as `plan` says (replacing any earlier plan). A plan naming a conv the
    /// network lacks, or a transposed conv (its outputs are the skip's coordinates), is an error.
    pub fn set_voxel_plan(&mut self, plan: &VoxelPlan) -> Result<()> {
        let descs: Vec<(String, bool)> = self.desc.convs().iter().map(|c| (c.kernel.clone(), c.transposed)).collect();
        for name in plan.ratios.keys() {
            match descs.iter().find(|(n, _)| n == name) {
                None => {
                    return Err(Error::invalid(
                        "voxel plan",
                        format!("names conv `{name}`, which this {} lacks", self.desc.kind.name()),
                    ))
                }
                Some((_, true)) => {
                    return Err(Error::invalid(
                        "voxel plan",
                        format!("names `{name}`, a transposed conv: its outputs are fixed by the skip"),
                    ))
                }
                Some(_) => {}
            }
        }
        for (c, (name, _)) in self.convs_mut().into_iter().zip(&descs) {
            c.voxel = plan.layer(name);
        }
        Ok(())
    }

    /// Output classes.
    pub fn num_classes(&self) -> usize {
        self.desc.num_classes
    }

    /// Whether SPVCNN's point branch meets the voxels before up stage `i`.
    pub fn meets_points_before(i: usize) -> bool {
        POINT_MEETINGS.contains(&i)
    }

    /// The stem: two k3 convs with BN and ReLU.
    pub fn stem(&self, e: &Engine, x: &SparseTensor) -> Result<SparseTensor> {
        let h = self.stem[0].forward(e, x, None)?;
        self.stem[1].forward(e, &h, None)
    }

    /// The four down stages. They start from `first` when given (SPVCNN feeds the stem output
    /// back through its point branch), else from `stem_out`. Returns the bottleneck and the
    /// skips in stage order: the stem output, then the outputs of stages 1 to 3.
    pub fn encode(
        &self,
        e: &Engine,
        stem_out: SparseTensor,
        first: Option<SparseTensor>,
    ) -> Result<(SparseTensor, Vec<SparseTensor>)> {
        let (mut h, mut skip0) = match first {
            Some(f) => (f, Some(stem_out)),
            None => (stem_out, None),
        };
        let mut skips = Vec::with_capacity(self.stages.len());
        for st in &self.stages {
            let d = st.down.forward(e, &h, None)?;
            let prev = std::mem::replace(&mut h, d);
            skips.push(skip0.take().unwrap_or(prev));
            for b in &st.blocks {
                h = b.forward(e, &h)?;
            }
        }
        Ok((h, skips))
    }

    /// Up stage `i`: transposed conv onto the skip's coordinates, concat, two residual blocks.
    pub fn up_stage(&self, e: &Engine, i: usize, h: &SparseTensor, skip: &SparseTensor) -> Result<SparseTensor> {
        let up = &self.ups[i];
        let u = up.up.forward(e, h, Some(skip.coord_set()))?;
        let mut h = e.concat(&u, skip)?;
        for b in &up.blocks {
            h = b.forward(e, &h)?;
        }
        Ok(h)
    }

    /// Logits `[N, num_classes]` for the voxels of `x` (4 input channels), in `x`'s row order.
    pub fn forward(&self, e: &Engine, x: &SparseTensor) -> Result<Vec<f32>> {
        if x.channels() != IN_CHANNELS {
            return Err(Error::tensor(
                "feats",
                format!("MinkUNet takes {IN_CHANNELS} input features (x, y, z, remission), got {}", x.channels()),
            ));
        }
        if x.is_empty() {
            return Ok(Vec::new());
        }
        let (mut h, mut skips) = self.encode(e, self.stem(e, x)?, None)?;
        for i in 0..self.ups.len() {
            let skip = skips.pop().ok_or_else(|| Error::invalid("MinkUNet", "unbalanced skips"))?;
            h = self.up_stage(e, i, &h, &skip)?;
        }
        self.classifier.forward(e, h.try_feats()?)
    }
}
