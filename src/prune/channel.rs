//! Channel pruning: choose the channels each dependency group keeps (local: the same ratio in
//! every group; global: one threshold over group-normalized scores), then either remove the
//! others — a physically smaller network, every tensor sliced along the axes the group's slots
//! name — or hold them at zero in the full network (the masked reference the pruned network
//! must equal).
//!
//! Holding a channel at zero means zeroing γ and β of every BatchNorm that produces it: the
//! BatchNorm output is then 0 for every voxel, a residual add of two zero channels stays 0, and
//! ReLU keeps it 0. A removed channel's β cannot instead be folded into the consumers' biases:
//! a sparse conv sums over a varying number of neighbours per voxel.

use std::collections::{BTreeMap, HashMap};

use super::groups::Group;
use crate::error::{Error, Result};
use crate::io::tensors::Tensor;

/// How the channels to remove are chosen across groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// Every group loses the same fraction of its channels.
    Local,
    /// One threshold over all groups' scores, each group's scores divided by their mean.
    Global,
}

/// Knobs of channel selection.
#[derive(Debug, Clone, Copy)]
pub struct ChannelOptions {
    /// Fraction of channels to remove, in [0, 1).
    pub ratio: f64,
    /// Local or global.
    pub selection: Selection,
    /// Kept widths are multiples of this (the AVX-512 microkernel wants Cout % 16 == 0).
    pub round_to: usize,
    /// No group keeps fewer channels (unless it had fewer to start with).
    pub min_width: usize,
}

impl ChannelOptions {
    /// Check the knobs.
    pub fn validate(&self) -> Result<()> {
        if !(self.ratio >= 0.0 && self.ratio < 1.0) {
            return Err(Error::invalid("--ratio", format!("must be in [0, 1), got {}", self.ratio)));
        }
        if self.round_to == 0 {
            return Err(Error::invalid("--round-to", "must be at least 1"));
        }
        if self.min_width == 0 {
            return Err(Error::invalid("--min-width", "must be at least 1"));
        }
        Ok(())
    }

    /// Channels a group of `width` keeps when selection asked for `wanted`: the nearest
    /// multiple of `round_to` (at least one multiple), at least `min_width`, at most `width`.
    pub fn kept(&self, width: usize, wanted: usize) -> usize {
        let r = self.round_to;
        let rounded = (wanted + r / 2) / r * r;
        rounded.max(r).max(self.min_width).min(width)
    }
}

/// Channels kept per group (sorted indices; every channel for groups that cannot be pruned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelPlan {
    /// Per group, in [`super::groups::groups`] order.
    pub keep: Vec<Vec<usize>>,
}

impl ChannelPlan {
    /// Channels removed from group `g`.
    pub fn removed(&self, groups: &[Group], g: usize) -> Vec<usize> {
        let kept = &self.keep[g];
        (0..groups[g].width).filter(|j| kept.binary_search(j).is_err()).collect()
    }
}

/// The `n` highest-scoring channels (ties to the lower index), sorted by index.
fn top(scores: &[f64], n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.truncate(n);
    idx.sort_unstable();
    idx
}

/// Choose the kept channels of every group from their scores.
pub fn select(groups: &[Group], scores: &[Vec<f64>], o: &ChannelOptions) -> Result<ChannelPlan> {
    o.validate()?;
    if scores.len() != groups.len() {
        return Err(Error::invalid("prune", "one score list per group expected"));
    }
    // Channels each group would keep before rounding.
    let wanted: Vec<usize> = match o.selection {
        Selection::Local => groups.iter().map(|g| ((g.width as f64) * (1.0 - o.ratio)).round() as usize).collect(),
        Selection::Global => {
            let mut all: Vec<(f64, usize)> = Vec::new();
            for (g, s) in groups.iter().zip(scores) {
                if !g.prunable {
                    continue;
                }
                let mean = s.iter().sum::<f64>() / s.len().max(1) as f64;
                all.extend(s.iter().map(|&v| (if mean > 0.0 { v / mean } else { v }, g.id)));
            }
            all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let cut = ((all.len() as f64) * o.ratio).floor() as usize;
            let mut removed = vec![0usize; groups.len()];
            for &(_, g) in &all[..cut] {
                removed[g] += 1;
            }
            groups.iter().map(|g| g.width - removed[g.id]).collect()
        }
    };
    let keep = groups
        .iter()
        .zip(scores)
        .zip(wanted)
        .map(|((g, s), w)| if g.prunable { top(s, o.kept(g.width, w)) } else { (0..g.width).collect() })
        .collect();
    Ok(ChannelPlan { keep })
}

/// Keep `widths[g]` channels of every group, the highest-scoring ones (per-layer widths from a
/// plan, a sensitivity sweep or a search); groups that cannot be pruned keep all.
pub fn select_widths(groups: &[Group], scores: &[Vec<f64>], widths: &[usize]) -> Result<ChannelPlan> {
    if scores.len() != groups.len() || widths.len() != groups.len() {
        return Err(Error::invalid("prune", "one score list and one width per group expected"));
    }
    let mut keep = Vec::with_capacity(groups.len());
    for ((g, s), &w) in groups.iter().zip(scores).zip(widths) {
        if !g.prunable && w != g.width {
            return Err(Error::invalid("width plan", format!("group `{}` cannot be pruned", g.name())));
        }
        if w == 0 || w > g.width {
            return Err(Error::invalid(
                "width plan",
                format!("group `{}` has {} channels, cannot keep {w}", g.name(), g.width),
            ));
        }
        keep.push(if g.prunable { top(s, w) } else { (0..g.width).collect() });
    }
    Ok(ChannelPlan { keep })
}

/// Per (tensor, axis): which indices survive.
fn keep_masks(
    groups: &[Group],
    plan: &ChannelPlan,
    tensors: &BTreeMap<String, Tensor<f32>>,
) -> Result<HashMap<(String, usize), Vec<bool>>> {
    let mut masks: HashMap<(String, usize), Vec<bool>> = HashMap::new();
    for (g, group) in groups.iter().enumerate() {
        let removed = plan.removed(groups, g);
        for slot in &group.slots {
            let t = tensors.get(&slot.tensor).ok_or_else(|| Error::tensor(&slot.tensor, "missing from the model"))?;
            let n = *t.shape.get(slot.axis).ok_or_else(|| Error::tensor(&slot.tensor, "has too few axes"))?;
            if slot.offset + group.width > n {
                return Err(Error::tensor(&slot.tensor, format!("axis {} has {n} entries", slot.axis)));
            }
            let m = masks.entry((slot.tensor.clone(), slot.axis)).or_insert_with(|| vec![true; n]);
            for &j in &removed {
                m[slot.offset + j] = false;
            }
        }
    }
    Ok(masks)
}

/// `t` with only the indices `keep` along `axis`.
fn slice_axis(t: &Tensor<f32>, axis: usize, keep: &[bool]) -> Tensor<f32> {
    let n = t.shape[axis];
    let inner: usize = t.shape[axis + 1..].iter().product();
    let outer: usize = t.shape[..axis].iter().product();
    let kept = keep.iter().filter(|&&k| k).count();
    let mut data = Vec::with_capacity(outer * kept * inner);
    for o in 0..outer {
        for (j, _) in keep.iter().enumerate().filter(|(_, &k)| k) {
            let base = (o * n + j) * inner;
            data.extend_from_slice(&t.data[base..base + inner]);
        }
    }
    let mut shape = t.shape.clone();
    shape[axis] = kept;
    Tensor { shape, data }
}

/// Training-state prefixes whose tensors have the shape of the weight they belong to.
const SHADOWS: [&str; 2] = ["mask.", "rewind."];

/// The physically smaller network: every tensor sliced to the kept channels. Masks and rewind
/// points of a training checkpoint are sliced with their weights; optimizer moments are dropped.
pub fn apply(
    groups: &[Group],
    plan: &ChannelPlan,
    tensors: &BTreeMap<String, Tensor<f32>>,
) -> Result<BTreeMap<String, Tensor<f32>>> {
    let masks = keep_masks(groups, plan, tensors)?;
    let mut out = BTreeMap::new();
    for (name, t) in tensors {
        if name.starts_with("optim.") {
            continue;
        }
        let base = SHADOWS.iter().find_map(|p| name.strip_prefix(p)).unwrap_or(name);
        let mut t = t.clone();
        for axis in 0..t.shape.len() {
            if let Some(m) = masks.get(&(base.to_string(), axis)) {
                if m.len() != t.shape[axis] {
                    return Err(Error::tensor(name.as_str(), format!("axis {axis} does not match `{base}`")));
                }
                t = slice_axis(&t, axis, m);
            }
        }
        out.insert(name.clone(), t);
    }
    Ok(out)
}

/// The full-width network with the removed channels held at zero (γ = β = 0 in every
/// BatchNorm that produces them): the reference the pruned network must equal.
pub fn masked(
    groups: &[Group],
    plan: &ChannelPlan,
    tensors: &BTreeMap<String, Tensor<f32>>,
) -> Result<BTreeMap<String, Tensor<f32>>> {
    let mut out = tensors.clone();
    for (g, group) in groups.iter().enumerate() {
        let removed = plan.removed(groups, g);
        for bn in &group.bns {
            for leaf in ["weight", "bias"] {
                let name = format!("{bn}.{leaf}");
                let t = out.get_mut(&name).ok_or_else(|| Error::tensor(name.as_str(), "missing from the model"))?;
                for &j in &removed {
                    t.data[j] = 0.0;
                }
            }
        }
    }
    Ok(out)
}
