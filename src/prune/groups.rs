//! Channel dependency groups, computed from the network description (never hand-listed): the
//! channels that must be removed together because one layer writes them and others read them,
//! residual and point/voxel adds tie, and concats place at an offset in their consumers' rows.
//! The idea is Torch-Pruning's DepGraph (Fang et al., CVPR 2023); here the graph is
//! [`NetDesc::dataflow`].

use crate::error::Result;
use crate::nn::arch::{NetDesc, Slot, SlotKind};

/// Channels that are kept or removed together.
#[derive(Debug, Clone)]
pub struct Group {
    /// Position in [`groups`]'s list.
    pub id: usize,
    /// Number of channels.
    pub width: usize,
    /// Every tensor axis that indexes these channels (producers and consumers).
    pub slots: Vec<Slot>,
    /// BatchNorm prefixes of the layers that produce these channels.
    pub bns: Vec<String>,
    /// False for the network's input features and its logits.
    pub prunable: bool,
}

impl Group {
    /// A short name: the first tensor that produces the channels.
    pub fn name(&self) -> &str {
        self.slots.iter().find(|s| s.produces).or(self.slots.first()).map_or("?", |s| s.tensor.as_str())
    }

    /// Producer tensors (layers whose outputs are these channels), without BatchNorm vectors.
    pub fn producers(&self) -> impl Iterator<Item = &Slot> {
        self.slots.iter().filter(|s| s.produces && s.kind == SlotKind::Weight)
    }

    /// Consumer tensors (layers that read these channels).
    pub fn consumers(&self) -> impl Iterator<Item = &Slot> {
        self.slots.iter().filter(|s| !s.produces)
    }
}

/// The dependency groups of `desc`, in order of first appearance.
pub fn groups(desc: &NetDesc) -> Result<Vec<Group>> {
    let flow = desc.dataflow()?;
    Ok(flow
        .groups()
        .into_iter()
        .enumerate()
        .map(|(id, s)| Group {
            id,
            width: s.width,
            slots: s.slots.clone(),
            bns: s.bns.clone(),
            prunable: !s.fixed && !s.bns.is_empty(),
        })
        .collect())
}

/// The groups a conv reads and writes: `(input groups, output groups)` per conv in
/// [`NetDesc::convs`] order (several inputs where a concat feeds it).
pub fn conv_links(desc: &NetDesc, groups: &[Group]) -> Vec<(Vec<usize>, Vec<usize>)> {
    desc.convs()
        .iter()
        .map(|c| {
            let rank = c.kernel_shape().len();
            let on = |axis: usize| -> Vec<usize> {
                groups
                    .iter()
                    .filter(|g| {
                        g.slots.iter().any(|s| s.kind == SlotKind::Weight && s.tensor == c.kernel && s.axis == axis)
                    })
                    .map(|g| g.id)
                    .collect()
            };
            (on(rank - 2), on(rank - 1))
        })
        .collect()
}

/// Every conv's `(cin, cout)` when group `g` keeps `widths[g]` channels.
pub fn conv_shapes(links: &[(Vec<usize>, Vec<usize>)], widths: &[usize]) -> Vec<(usize, usize)> {
    let sum = |ids: &[usize]| ids.iter().map(|&g| widths[g]).sum::<usize>();
    links.iter().map(|(i, o)| (sum(i), sum(o))).collect()
}
