//! Pruning of MinkUNet and SPVCNN, read from the one network description
//! ([`crate::nn::arch::NetDesc`]).
//!
//! - [`groups`]: the channel dependency groups, computed from the description's dataflow.
//! - [`importance`]: per-channel scores (L1, L2, BatchNorm γ, first-order Taylor, random).
//! - [`channel`]: which channels each group keeps, the physically smaller network, and the
//!   masked full-width reference it must equal.
//!
//! A pruned network is a checkpoint with narrower tensors under the same names; its widths are
//! read back from the shapes, so `segment`, `eval`, `bench`, `train` and the library load it
//! like any other.
//!
//! ```no_run
//! use sparseconv::nn::{arch::ArchKind, checkpoint::Checkpoint};
//! use sparseconv::prune::{prune_channels, channel::{ChannelOptions, Selection}, importance::Criterion};
//! let ck = Checkpoint::load("data/models/minkunet_cr0.5.safetensors".as_ref())?;
//! let opts = ChannelOptions { ratio: 0.5, selection: Selection::Local, round_to: 16, min_width: 8 };
//! let p = prune_channels(&ck, ArchKind::MinkUNet, Criterion::L1, &opts, &[], 0)?;
//! p.save("minkunet_pruned.safetensors".as_ref())?;
//! # Ok::<(), sparseconv::Error>(())
//! ```

pub mod channel;
pub mod groups;
pub mod importance;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::io::tensors::Tensor;
use crate::nn::arch::{ArchKind, NetDesc};
use crate::nn::checkpoint::{save, Checkpoint};
use channel::{ChannelOptions, ChannelPlan, Selection};
use groups::Group;
use importance::Criterion;

/// Metadata keys a pruned file carries over from its source.
const KEPT_METADATA: [&str; 4] = ["arch", "cr", "classes", "voxel_size"];

/// A channel-pruned network, ready to save or load.
#[derive(Debug, Clone)]
pub struct Pruned {
    /// The network before pruning.
    pub before: NetDesc,
    /// The pruned network.
    pub after: NetDesc,
    /// The dependency groups of `before`.
    pub groups: Vec<Group>,
    /// Channels kept per group.
    pub plan: ChannelPlan,
    /// The pruned tensors.
    pub tensors: BTreeMap<String, Tensor<f32>>,
    /// Metadata for the pruned file.
    pub metadata: HashMap<String, String>,
}

impl Pruned {
    /// Write the pruned network as safetensors (f32).
    pub fn save(&self, path: &Path) -> Result<()> {
        save(path, &self.tensors, self.metadata.clone(), false)
    }

    /// The pruned network as an in-memory checkpoint.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint::from_tensors("<pruned>", self.tensors.clone(), self.metadata.clone())
    }
}

/// Channel-prune the network in `ck` (its widths read from the tensors): score each group's
/// channels by `criterion` (Taylor reads labelled scans under `data`), keep what `opts` says,
/// and slice every tensor.
pub fn prune_channels(
    ck: &Checkpoint,
    kind: ArchKind,
    criterion: Criterion,
    opts: &ChannelOptions,
    data: &[PathBuf],
    seed: u64,
) -> Result<Pruned> {
    opts.validate()?;
    let classes = ck.metadata().get("classes").and_then(|v| v.parse().ok()).unwrap_or(crate::io::kitti::NUM_CLASSES);
    let before = NetDesc::from_checkpoint(kind, ck, classes)?;
    let groups = groups::groups(&before)?;
    let grads = match criterion {
        Criterion::Taylor => Some(importance::taylor_gradients(ck, &before, data)?),
        _ => None,
    };
    let scores = importance::scores(&groups, ck.tensors(), criterion, grads.as_ref(), seed)?;
    let plan = channel::select(&groups, &scores, opts)?;
    let tensors = channel::apply(&groups, &plan, ck.tensors())?;
    let mut metadata: HashMap<String, String> = ck
        .metadata()
        .iter()
        .filter(|(k, _)| KEPT_METADATA.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.entry("arch".into()).or_insert_with(|| kind.name().to_string());
    let check = Checkpoint::from_tensors("<pruned>", tensors.clone(), HashMap::new());
    let after = NetDesc::from_checkpoint(kind, &check, classes)?;
    let how = format!(
        "channel {} {} ratio {} round-to {} min-width {}",
        criterion_name(criterion),
        if opts.selection == Selection::Global { "global" } else { "local" },
        opts.ratio,
        opts.round_to,
        opts.min_width
    );
    metadata.insert("pruned".into(), how);
    metadata.insert("widths".into(), after.widths_summary());
    Ok(Pruned { before, after, groups, plan, tensors, metadata })
}

fn criterion_name(c: Criterion) -> &'static str {
    match c {
        Criterion::L1 => "l1",
        Criterion::L2 => "l2",
        Criterion::BatchNorm => "bn",
        Criterion::Taylor => "taylor",
        Criterion::Random => "random",
    }
}
