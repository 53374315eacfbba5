//! How much each channel of a dependency group matters: magnitude over the whole group (L1 or
//! L2 over every kernel and linear slice that writes or reads the channel, as Torch-Pruning's
//! group importance), BatchNorm γ (network slimming, Liu et al. 2017), first-order Taylor
//! (|Σ w·∂L/∂w| per slice, Molchanov et al. 2019, with the training backward), or random.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::groups::Group;
use crate::bench::pseudo_random;
use crate::device::{Device, Engine};
use crate::error::{Error, Result};
use crate::io::kitti::NUM_CLASSES;
use crate::io::tensors::Tensor;
use crate::kmap::MapBuilder;
use crate::nn::arch::{NetDesc, SlotKind};
use crate::nn::checkpoint::Checkpoint;
use crate::pipeline::VOXEL_SIZE;
use crate::plan::Grouping;
use crate::train::net::TrainNet;
use crate::train::ops::cross_entropy;
use crate::train::trainer::{load_samples, voxel_labels};
use crate::voxel::voxelize;

/// A channel importance criterion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Criterion {
    /// Σ|w| over the group's kernel and linear slices.
    L1,
    /// √Σw² over the group's kernel and linear slices.
    L2,
    /// Σ|γ| over the group's BatchNorms.
    BatchNorm,
    /// Σ over slices of |Σ w·∂L/∂w| (loss gradients on labelled scans).
    Taylor,
    /// Seeded uniform noise: the baseline every criterion must beat.
    Random,
}

impl std::str::FromStr for Criterion {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "l1" => Criterion::L1,
            "l2" => Criterion::L2,
            "bn" => Criterion::BatchNorm,
            "taylor" => Criterion::Taylor,
            "random" => Criterion::Random,
            _ => {
                return Err(Error::invalid("--criterion", format!("expected l1, l2, bn, taylor or random, got `{s}`")))
            }
        })
    }
}

/// Sum of `f(value)` over each index of `axis` of `t`.
fn axis_sums(t: &Tensor<f32>, axis: usize, f: impl Fn(usize, f32) -> f64) -> Vec<f64> {
    let n = t.shape[axis];
    let stride: usize = t.shape[axis + 1..].iter().product();
    let mut out = vec![0f64; n];
    for (i, &v) in t.data.iter().enumerate() {
        out[(i / stride) % n] += f(i, v);
    }
    out
}

fn tensor<'a>(tensors: &'a BTreeMap<String, Tensor<f32>>, name: &str) -> Result<&'a Tensor<f32>> {
    tensors.get(name).ok_or_else(|| Error::tensor(name, "missing from the model"))
}

/// Importance of every channel of every group (empty for groups that cannot be pruned).
/// `grads` holds the loss gradient of every weight tensor, for [`Criterion::Taylor`].
pub fn scores(
    groups: &[Group],
    tensors: &BTreeMap<String, Tensor<f32>>,
    criterion: Criterion,
    grads: Option<&BTreeMap<String, Vec<f32>>>,
    seed: u64,
) -> Result<Vec<Vec<f64>>> {
    let mut out = Vec::with_capacity(groups.len());
    for g in groups {
        if !g.prunable {
            out.push(Vec::new());
            continue;
        }
        let mut s = vec![0f64; g.width];
        match criterion {
            Criterion::Random => {
                s = pseudo_random(g.width, seed ^ ((g.id as u64 + 1) * 0x9E37), 1.0)
                    .iter()
                    .map(|&v| v as f64 + 1.0)
                    .collect()
            }
            Criterion::BatchNorm => {
                for bn in &g.bns {
                    for (a, &v) in s.iter_mut().zip(&tensor(tensors, &format!("{bn}.weight"))?.data) {
                        *a += v.abs() as f64;
                    }
                }
            }
            Criterion::L1 | Criterion::L2 | Criterion::Taylor => {
                for slot in g.slots.iter().filter(|s| s.kind == SlotKind::Weight) {
                    let t = tensor(tensors, &slot.tensor)?;
                    let sums = match criterion {
                        Criterion::L1 => axis_sums(t, slot.axis, |_, v| v.abs() as f64),
                        Criterion::L2 => axis_sums(t, slot.axis, |_, v| (v as f64) * (v as f64)),
                        _ => {
                            let gr = grads.and_then(|m| m.get(&slot.tensor)).ok_or_else(|| {
                                Error::invalid("--criterion taylor", format!("no gradient for `{}`", slot.tensor))
                            })?;
                            axis_sums(t, slot.axis, |i, v| v as f64 * gr[i] as f64).into_iter().map(f64::abs).collect()
                        }
                    };
                    for (j, a) in s.iter_mut().enumerate() {
                        *a += sums[slot.offset + j];
                    }
                }
                if criterion == Criterion::L2 {
                    s.iter_mut().for_each(|v| *v = v.sqrt());
                }
            }
        }
        out.push(s);
    }
    Ok(out)
}

/// Loss gradients of every weight tensor of `desc`, summed over the labelled scans under
/// `data` (SemanticKITTI roots or Open3D-ML `points_*.npy`): one training-mode forward and
/// backward per scan, on the CPU.
pub fn taylor_gradients(ck: &Checkpoint, desc: &NetDesc, data: &[PathBuf]) -> Result<BTreeMap<String, Vec<f32>>> {
    let samples = load_samples(data)?;
    if samples.is_empty() {
        return Err(Error::invalid("--criterion taylor", "needs labelled scans (--data DIR with sequences/*/labels)"));
    }
    let mut net = TrainNet::from_desc(ck, desc)?;
    let e = Engine::new(Device::Cpu, MapBuilder::Sort, Grouping::Heuristic);
    let mut sum: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    for s in samples {
        let vox = voxelize(&s.points, VOXEL_SIZE)?;
        let labels = voxel_labels(&vox.inverse, &s.labels, vox.tensor.len());
        let (logits, tape) = net.forward(&e, vox.tensor)?;
        let (_, dlogits) = cross_entropy(&logits, NUM_CLASSES, &labels, None)?;
        let grads = net.backward(&e, &tape, &dlogits)?;
        for (i, g) in grads.into_iter().enumerate() {
            if g.is_empty() {
                continue;
            }
            let acc = sum.entry(net.params.name(i).to_string()).or_insert_with(|| vec![0.0; g.len()]);
            acc.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
        }
    }
    Ok(sum)
}
