//! MinkUNet as in SPVNAS / TorchSparse for SemanticKITTI (Tang et al., ECCV 2020), with the
//! same module names, so their checkpoints load unchanged.

use super::checkpoint::Checkpoint;
use super::layers::{Conv, Linear, Residual};
use crate::device::Engine;
use crate::error::{Error, Result};
use crate::kmap::KernelSpec;
use crate::tensor::SparseTensor;

/// Channel widths at `cr = 1`: stem, four down stages, four up stages.
pub const BASE_CHANNELS: [usize; 9] = [32, 32, 64, 128, 256, 256, 128, 96, 96];

/// Input features: x, y, z, remission.
pub const IN_CHANNELS: usize = 4;

/// Channel widths for width factor `cr` (`int(cr · c)` as in SPVNAS).
pub fn channels(cr: f32) -> Result<[usize; 9]> {
    if !(cr.is_finite() && cr > 0.0 && cr <= 8.0) {
        return Err(Error::invalid("--cr", format!("width factor must be in (0, 8], got {cr}")));
    }
    let mut cs = [0usize; 9];
    for (c, b) in cs.iter_mut().zip(BASE_CHANNELS) {
        *c = (cr as f64 * b as f64) as usize;
        if *c == 0 {
            return Err(Error::invalid("--cr", format!("width factor {cr} gives a layer with 0 channels")));
        }
    }
    Ok(cs)
}

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

/// The MinkUNet of SPVNAS (stem, 4 down stages, 4 up stages, linear classifier).
#[derive(Debug, Clone)]
pub struct MinkUNet {
    /// Width factor.
    pub cr: f32,
    /// Number of output classes.
    pub num_classes: usize,
    /// `stem.0` + `stem.1`, `stem.3` + `stem.4`.
    pub stem: [Conv; 2],
    /// `stage1` … `stage4`.
    pub stages: Vec<Down>,
    /// `up1` … `up4`.
    pub ups: Vec<Up>,
    /// `classifier.0`.
    pub classifier: Linear,
}

impl MinkUNet {
    /// Load from a checkpoint (BatchNorm folded into the convs), rejecting unknown tensors.
    pub fn load(ck: &Checkpoint, cr: f32, num_classes: usize) -> Result<Self> {
        let m = Self::load_parts(ck, cr, num_classes)?;
        ck.finish()?;
        Ok(m)
    }

    /// Load the tensors MinkUNet shares with SPVCNN, leaving others for the caller.
    pub fn load_parts(ck: &Checkpoint, cr: f32, num_classes: usize) -> Result<Self> {
        let cs = channels(cr)?;
        let k3 = KernelSpec::new(3, 1, 1)?;
        let k2s2 = KernelSpec::new(2, 2, 1)?;
        let stem = [
            Conv::load_bn(ck, "stem.0.kernel", "stem.1", k3, IN_CHANNELS, cs[0], false, true)?,
            Conv::load_bn(ck, "stem.3.kernel", "stem.4", k3, cs[0], cs[0], false, true)?,
        ];
        let mut stages = Vec::new();
        for s in 0..4 {
            let (cin, cout) = (cs[s], cs[s + 1]);
            let p = format!("stage{}", s + 1);
            stages.push(Down {
                down: Conv::load_bn(
                    ck,
                    &format!("{p}.0.net.0.kernel"),
                    &format!("{p}.0.net.1"),
                    k2s2,
                    cin,
                    cin,
                    false,
                    true,
                )?,
                blocks: [
                    Residual::load(ck, &format!("{p}.1"), cin, cout)?,
                    Residual::load(ck, &format!("{p}.2"), cout, cout)?,
                ],
            });
        }
        let mut ups = Vec::new();
        for u in 0..4 {
            let (cin, cout, skip) = (cs[4 + u], cs[5 + u], cs[3 - u]);
            let p = format!("up{}", u + 1);
            ups.push(Up {
                up: Conv::load_bn(
                    ck,
                    &format!("{p}.0.net.0.kernel"),
                    &format!("{p}.0.net.1"),
                    k2s2,
                    cin,
                    cout,
                    true,
                    true,
                )?,
                blocks: [
                    Residual::load(ck, &format!("{p}.1.0"), cout + skip, cout)?,
                    Residual::load(ck, &format!("{p}.1.1"), cout, cout)?,
                ],
            });
        }
        let classifier = Linear::load(ck, "classifier.0", cs[8], num_classes)?;
        Ok(Self { cr, num_classes, stem, stages, ups, classifier })
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
        self.classifier.forward(e, h.feats())
    }
}
