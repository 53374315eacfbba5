//! Pruning of MinkUNet and SPVCNN, read from the one network description
//! ([`crate::nn::arch::NetDesc`]).
//!
//! - [`groups`]: the channel dependency groups, computed from the description's dataflow.
//! - [`importance`]: per-channel scores (L1, L2, BatchNorm γ, first-order Taylor, random).
//! - [`channel`]: which channels each group keeps, the physically smaller network, and the
//!   masked full-width reference it must equal.
//! - [`offset`]: whole kernel offsets removed per conv; the CPU conv skips their pairs.
//! - [`sparsity`]: element, 1×16 block and N:M weight sparsity, run by the CPU sparse kernels.
//! - [`latency`]: per-conv latency tables measured on the target, to price candidate widths.
//! - [`sensitivity`]: one group pruned at a time, mIoU and latency per ratio; width plans.
//! - [`plan`]: width plans (with optional per-conv offset and sparse-format cuts), the file
//!   `prune --plan` applies.
//! - [`netadapt`]: NetAdapt, latency-driven iterative narrowing with short fine-tunes.
//! - [`amc`] with [`ddpg`]: AMC, a DDPG agent choosing per-group keep ratios under a FLOPs or
//!   latency budget.
//! - [`iterative`]: iterative global magnitude pruning on a schedule (AGP, fixed, geometric),
//!   each round fine-tuning, rewinding (lottery tickets) or re-initializing.
//! - [`finetune`]: the short fine-tune every search and comparison gives its networks.
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

pub mod amc;
pub mod channel;
pub mod ddpg;
pub mod finetune;
pub mod groups;
pub mod importance;
pub mod iterative;
pub mod latency;
pub mod netadapt;
pub mod offset;
pub mod plan;
pub mod sensitivity;
pub mod sparsity;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::tensors::Tensor;
use crate::nn::arch::{ArchKind, NetDesc};
use crate::nn::checkpoint::{save, Checkpoint};
use channel::{ChannelOptions, ChannelPlan, Selection};
use groups::Group;
use importance::Criterion;
use offset::OffsetPlan;
pub use plan::WidthPlan;

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
    /// Channels kept per group (all of them for offset pruning).
    pub plan: ChannelPlan,
    /// Offsets kept per conv (empty for channel pruning).
    pub offsets: OffsetPlan,
    /// The pruned tensors.
    pub tensors: BTreeMap<String, Tensor<f32>>,
    /// Metadata for the pruned file.
    pub metadata: HashMap<String, String>,
    /// What the pruner wants the user to know (layers it left alone, and why).
    pub notes: Vec<String>,
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

/// How many channels each group keeps.
#[derive(Debug, Clone, Copy)]
pub enum ChannelTarget<'a> {
    /// A ratio, local or global, rounded.
    Options(&'a ChannelOptions),
    /// Exact widths per group ([`groups::groups`] order), e.g. from a [`WidthPlan`].
    Widths(&'a [usize]),
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
    prune_channels_to(ck, kind, criterion, ChannelTarget::Options(opts), data, seed)
}

/// [`prune_channels`] to any [`ChannelTarget`].
pub fn prune_channels_to(
    ck: &Checkpoint,
    kind: ArchKind,
    criterion: Criterion,
    target: ChannelTarget<'_>,
    data: &[PathBuf],
    seed: u64,
) -> Result<Pruned> {
    let classes = ck.metadata().get("classes").and_then(|v| v.parse().ok()).unwrap_or(crate::io::kitti::NUM_CLASSES);
    let before = NetDesc::from_checkpoint(kind, ck, classes)?;
    let groups = groups::groups(&before)?;
    let grads = match criterion {
        Criterion::Taylor => Some(importance::taylor_gradients(ck, &before, data)?),
        _ => None,
    };
    let scores = importance::scores(&groups, ck.tensors(), criterion, grads.as_ref(), seed)?;
    let (plan, how) = match target {
        ChannelTarget::Options(opts) => (
            channel::select(&groups, &scores, opts)?,
            format!(
                "channel {} {} ratio {} round-to {} min-width {}",
                criterion_name(criterion),
                if opts.selection == Selection::Global { "global" } else { "local" },
                opts.ratio,
                opts.round_to,
                opts.min_width
            ),
        ),
        ChannelTarget::Widths(w) => (
            channel::select_widths(&groups, &scores, w)?,
            format!("channel {} to planned widths", criterion_name(criterion)),
        ),
    };
    let tensors = channel::apply(&groups, &plan, ck.tensors())?;
    let mut metadata = carried_metadata(ck, kind);
    let check = Checkpoint::from_tensors("<pruned>", tensors.clone(), HashMap::new());
    let after = NetDesc::from_checkpoint(kind, &check, classes)?;
    metadata.insert("pruned".into(), how);
    metadata.insert("widths".into(), after.widths_summary());
    Ok(Pruned { before, after, groups, plan, offsets: OffsetPlan::new(), tensors, metadata, notes: Vec::new() })
}

/// Offset-prune the network in `ck`: remove `ratio` of every conv's kernel offsets (or of all
/// offsets, with `Global`) by L1 magnitude, zeroing them and listing the kept ones.
pub fn prune_offsets(
    ck: &Checkpoint,
    kind: ArchKind,
    ratio: f64,
    selection: Selection,
    scope: offset::OffsetScope,
) -> Result<Pruned> {
    let classes = ck.metadata().get("classes").and_then(|v| v.parse().ok()).unwrap_or(crate::io::kitti::NUM_CLASSES);
    let before = NetDesc::from_checkpoint(kind, ck, classes)?;
    let groups = groups::groups(&before)?;
    let plan = ChannelPlan { keep: groups.iter().map(|g| (0..g.width).collect()).collect() };
    let offsets = offset::select(&before, ck.tensors(), ratio, selection, scope)?;
    let (tensors, listed) = offset::apply(&offsets, ck.tensors())?;
    let mut metadata = carried_metadata(ck, kind);
    metadata.extend(listed);
    let kept: usize = offsets.values().map(Vec::len).sum();
    let total: usize = before.convs().iter().filter(|c| c.spec.volume() > 1).map(|c| c.spec.volume()).sum();
    metadata.insert(
        "pruned".into(),
        format!(
            "offset l1 {}{} ratio {ratio}: {kept} of {total} offsets kept",
            if selection == Selection::Global { "global" } else { "local" },
            if scope == offset::OffsetScope::Map { " per map" } else { "" }
        ),
    );
    Ok(Pruned { after: before.clone(), before, groups, plan, offsets, tensors, metadata, notes: Vec::new() })
}

/// Weight-sparsify the network in `ck`: `sparsity` of every conv's weights (elements or 1×16
/// blocks by magnitude, per layer or global), or N:M along `Cin`; the pruned convs keep their
/// kernels in that format.
pub fn prune_sparse(
    ck: &Checkpoint,
    kind: ArchKind,
    format: crate::sparse_weights::Format,
    sparsity: f64,
    selection: Selection,
) -> Result<Pruned> {
    let classes = ck.metadata().get("classes").and_then(|v| v.parse().ok()).unwrap_or(crate::io::kitti::NUM_CLASSES);
    let before = NetDesc::from_checkpoint(kind, ck, classes)?;
    let groups = groups::groups(&before)?;
    let plan = ChannelPlan { keep: groups.iter().map(|g| (0..g.width).collect()).collect() };
    let (tensors, formats, report) = sparsity::prune(&before, ck.tensors(), format, sparsity, selection)?;
    let mut metadata = carried_metadata(ck, kind);
    metadata.extend(formats);
    let mean = report.pruned.iter().map(|p| p.1).sum::<f64>() / report.pruned.len().max(1) as f64;
    metadata.insert(
        "pruned".into(),
        format!(
            "{} {} sparsity {sparsity}: {} convs at {:.1}% zeros on average, {} left dense",
            format.name(),
            if selection == Selection::Global { "global" } else { "local" },
            report.pruned.len(),
            100.0 * mean,
            report.skipped.len()
        ),
    );
    let notes = report.skipped.iter().map(|(n, why)| format!("left dense: {n} ({why})")).collect();
    Ok(Pruned { after: before.clone(), before, groups, plan, offsets: OffsetPlan::new(), tensors, metadata, notes })
}

/// Apply a [`WidthPlan`]: every group keeps its planned channels (chosen by `criterion`), then
/// every conv cut of the plan (offsets by L1, or sparse formats by magnitude) is applied to the
/// narrowed network.
pub fn prune_to_plan(
    ck: &Checkpoint,
    kind: ArchKind,
    criterion: Criterion,
    plan: &plan::WidthPlan,
    data: &[PathBuf],
    seed: u64,
) -> Result<Pruned> {
    let classes = ck.metadata().get("classes").and_then(|v| v.parse().ok()).unwrap_or(crate::io::kitti::NUM_CLASSES);
    let desc = NetDesc::from_checkpoint(kind, ck, classes)?;
    let widths = plan.widths(kind, &groups::groups(&desc)?)?;
    plan.check_convs(&desc)?;
    let mut p = prune_channels_to(ck, kind, criterion, ChannelTarget::Widths(&widths), data, seed)?;
    if plan.convs.is_empty() {
        return Ok(p);
    }
    let (tensors, meta) = cut_convs(&p.after, &p.tensors, &plan.convs)?;
    p.offsets = plan
        .convs
        .iter()
        .filter_map(|(n, c)| match c {
            plan::ConvCut::Offsets { .. } => meta
                .get(&format!("{}{n}", offset::KEPT_OFFSETS))
                .map(|v| (n.clone(), v.split(',').filter_map(|x| x.parse().ok()).collect())),
            plan::ConvCut::Sparse(..) => None,
        })
        .collect();
    p.tensors = tensors;
    p.metadata.extend(meta);
    let how = p.metadata.get("pruned").cloned().unwrap_or_default();
    p.metadata.insert("pruned".into(), format!("{how}; {} conv cuts", plan.convs.len()));
    Ok(p)
}

/// Apply per-conv cuts to the tensors of `desc`: offsets kept by L1 of their slices, or the
/// kernel magnitude-pruned into a sparse format. Returns the tensors (with masks) and the
/// metadata entries (kept offsets, formats).
pub fn cut_convs(
    desc: &NetDesc,
    tensors: &BTreeMap<String, Tensor<f32>>,
    cuts: &[(String, plan::ConvCut)],
) -> Result<(offset::Tensors, HashMap<String, String>)> {
    let convs = desc.convs();
    let mut offsets = OffsetPlan::new();
    let mut out = tensors.clone();
    let mut meta = HashMap::new();
    for (name, cut) in cuts {
        let c = convs.iter().find(|c| &c.kernel == name).ok_or_else(|| Error::tensor(name.as_str(), "no such conv"))?;
        match *cut {
            plan::ConvCut::Offsets { kept, .. } => {
                let t = tensors.get(name).ok_or_else(|| Error::tensor(name.as_str(), "missing from the model"))?;
                offsets.insert(name.clone(), offset::largest(t, kept));
            }
            plan::ConvCut::Sparse(f, s) => {
                let (k, v) = sparsity::prune_one(&mut out, name, c.cin, c.cout, f, s)?;
                meta.insert(k, v);
            }
        }
    }
    let (out, listed) = offset::apply(&offsets, &out)?;
    meta.extend(listed);
    Ok((out, meta))
}

/// The source's architecture metadata, for a pruned file.
fn carried_metadata(ck: &Checkpoint, kind: ArchKind) -> HashMap<String, String> {
    let mut m: HashMap<String, String> = ck
        .metadata()
        .iter()
        .filter(|(k, _)| {
            KEPT_METADATA.contains(&k.as_str())
                || k.starts_with(offset::KEPT_OFFSETS)
                || k.starts_with(crate::nn::checkpoint::SPARSE_FORMAT)
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    m.entry("arch".into()).or_insert_with(|| kind.name().to_string());
    m
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
