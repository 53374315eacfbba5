//! Short fine-tunes of pruned networks on scans in memory: what NetAdapt runs per proposal and
//! after its last iteration, and what AMC and the comparisons give every policy alike (AdamW at
//! a constant rate, no warm-up, the masks and structure of the checkpoint kept), and adaptive
//! BatchNorm, which evaluations of pruned networks without fine-tuning run first.

use std::path::PathBuf;

use crate::device::{Device, Engine};
use crate::error::{Error, Result};
use crate::io::kitti::NUM_CLASSES;
use crate::kmap::MapBuilder;
use crate::nn::arch::ArchKind;
use crate::nn::checkpoint::Checkpoint;
use crate::pipeline::VOXEL_SIZE;
use crate::plan::Grouping;
use crate::train::data::Sample;
use crate::train::net::TrainNet;
use crate::train::trainer::{TrainConfig, Trainer};
use crate::voxel::voxelize_batch;

/// How long and how fast.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FineTune {
    /// Optimizer steps (one scan each).
    pub steps: usize,
    /// Learning rate (AdamW, constant).
    pub lr: f64,
    /// Seed of the order and augmentation.
    pub seed: u64,
}

impl FineTune {
    /// Reject a rate no run can use.
    pub fn validate(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::invalid("--lr", "must be positive"));
        }
        Ok(())
    }

    fn config(&self, kind: ArchKind, scans: usize, cosine: bool) -> TrainConfig {
        TrainConfig {
            arch: kind.name().into(),
            // Placeholder path: the scans are passed in memory.
            data: vec![PathBuf::from("<in memory>")],
            epochs: self.steps.div_ceil(scans.max(1)).max(1),
            lr: self.lr,
            warmup: 0,
            schedule: if cosine { "cosine".into() } else { "constant".into() },
            seed: self.seed,
            ..TrainConfig::default()
        }
    }

    /// A trainer from `ck` (its masks held) on `train`, its rate constant or decaying by a
    /// cosine over `steps`; the caller steps it.
    pub fn trainer(&self, kind: ArchKind, ck: &Checkpoint, train: &[Sample], cosine: bool) -> Result<Trainer> {
        self.validate()?;
        Trainer::from_checkpoint(self.config(kind, train.len(), cosine), ck, train.to_vec(), Vec::new())
    }

    /// `ck` after `steps` steps on `train` (a copy of `ck` for zero steps), with `ck`'s metadata.
    pub fn run(&self, kind: ArchKind, ck: &Checkpoint, train: &[Sample]) -> Result<Checkpoint> {
        self.validate()?;
        let tensors = if self.steps == 0 {
            ck.tensors().clone()
        } else {
            if train.is_empty() {
                return Err(Error::invalid("--data", "no fine-tuning scans"));
            }
            let mut t = self.trainer(kind, ck, train, false)?;
            for _ in 0..self.steps {
                t.train_step()?;
            }
            t.params().tensors()
        };
        Ok(Checkpoint::from_tensors("<fine-tuned>", tensors, ck.metadata().clone()))
    }
}

/// `ck` with every BatchNorm's running statistics taken from its own activations on `scans`
/// ([`TrainNet::recalibrate_bn`]; EagleEye's adaptive BatchNorm).
pub fn adaptive_bn(kind: ArchKind, ck: &Checkpoint, scans: &[Sample]) -> Result<Checkpoint> {
    let mut net = TrainNet::load_arch(kind.name(), ck, 0.5, NUM_CLASSES).map_err(|e| e.in_file(ck.path()))?;
    let inputs = scans
        .iter()
        .map(|s| Ok(voxelize_batch(std::slice::from_ref(&s.points), VOXEL_SIZE)?.tensor))
        .collect::<Result<Vec<_>>>()?;
    let e = Engine::new(Device::Cpu, MapBuilder::Sort, Grouping::Heuristic);
    net.recalibrate_bn(&e, inputs)?;
    let mut tensors = ck.tensors().clone();
    tensors.extend(net.params.tensors());
    Ok(Checkpoint::from_tensors("<adaptive bn>", tensors, ck.metadata().clone()))
}
