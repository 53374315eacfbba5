//! Adaptive grouping of kernel offsets (TorchSparse, Tang et al., MLSys 2022): which offsets run
//! as one batched GEMM, padded to the largest map of the group.

use crate::error::{Error, Result};
use crate::kmap::KernelMap;

/// Knobs of the adaptive grouping.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupingParams {
    /// Largest fraction of padded rows a group may hold: `(G·Mmax − ΣM) / (G·Mmax)`.
    pub tolerance: f32,
    /// Size threshold: a group's padded rows `G·Mmax` stay at or below this; larger maps run alone.
    pub max_rows: usize,
}

/// How a conv layer chooses its groups.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Grouping {
    /// One offset per GEMM (the identity offset is always alone).
    Off,
    /// Fixed parameters for every layer.
    Fixed(GroupingParams),
    /// Per-layer parameters picked by timing candidates on the actual input (cached per layer).
    #[default]
    Auto,
    /// Every non-identity offset in one output-stationary group (CPU).
    OutputTiled,
    /// No timing: output-tiled on the CPU, which the tuner picks on every k = 2 and k = 3 layer
    /// of MinkUNet at cr = 0.5 and 1.0 since it runs in one pass (BENCHMARKS.md; 1×1 layers
    /// tie). For one-shot runs and training, where timing candidates would cost more than it
    /// saves. The GPU has its own rule (`Engine::plan_for`).
    Heuristic,
}

/// A set of offsets that run as one batched GEMM.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// Offset indices, a contiguous run of [`KernelMap::canonical_order`].
    pub offsets: Vec<usize>,
    /// Rows of each offset after padding (the largest map in the group).
    pub padded_rows: usize,
}

/// The execution plan of one conv layer: groups in canonical accumulation order.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Groups, executed and accumulated in this order.
    pub groups: Vec<Group>,
    /// The parameters that produced the plan (`None`: ungrouped).
    pub params: Option<GroupingParams>,
    /// CPU execution order: run each group output-stationary (tasks own output rows and walk
    /// the group's offsets) instead of weight-stationary (tasks own map pairs of one offset).
    pub output_tiled: bool,
}

impl Plan {
    /// Check a plan against the map it runs on: every offset exists, appears once, and fits
    /// its group's padded rows. The kernels size their buffers from `padded_rows` and index
    /// the weights by offset, so a plan built for another map (the fields are public) is
    /// refused here rather than trusted.
    pub fn check(&self, map: &KernelMap) -> Result<()> {
        let kv = map.volume();
        let mut seen = vec![false; kv];
        for g in &self.groups {
            for &k in &g.offsets {
                if k >= kv || std::mem::replace(&mut seen[k], true) {
                    return Err(Error::invalid("plan", format!("offset {k} is outside the map's {kv} or repeated")));
                }
                if map.size(k) > g.padded_rows && g.offsets.len() > 1 {
                    return Err(Error::invalid(
                        "plan",
                        format!("offset {k} has {} pairs but its group pads to {}", map.size(k), g.padded_rows),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Every non-empty offset alone.
    pub fn ungrouped(map: &KernelMap) -> Plan {
        let groups = map
            .canonical_order()
            .into_iter()
            .filter(|&k| map.size(k) > 0)
            .map(|k| Group { offsets: vec![k], padded_rows: map.size(k) })
            .collect();
        Plan { groups, params: None, output_tiled: false }
    }

    /// Group contiguous runs of the canonical order (mirror pairs kept together) while the
    /// padding fraction stays within `tolerance` and the padded size within `max_rows`.
    /// The identity offset (submanifold centre) is always alone: it runs as one dense GEMM.
    pub fn grouped(map: &KernelMap, p: GroupingParams) -> Plan {
        let order: Vec<usize> = map.canonical_order().into_iter().filter(|&k| map.size(k) > 0).collect();
        let mut groups: Vec<Group> = Vec::new();
        let mut cur: Vec<usize> = Vec::new();
        let (mut cur_max, mut cur_sum) = (0usize, 0usize);
        let mut i = 0;
        while i < order.len() {
            let k = order[i];
            // A unit is an offset and, right after it in the order, its mirror.
            let mut unit = vec![k];
            if let Some(m) = map.mirror()[k] {
                if m != k && order.get(i + 1) == Some(&m) {
                    unit.push(m);
                }
            }
            i += unit.len();
            if Some(k) == map.identity() {
                groups.push(Group { offsets: unit, padded_rows: map.size(k) });
                continue;
            }
            let u_max = unit.iter().map(|&k| map.size(k)).max().unwrap_or(0);
            let u_sum: usize = unit.iter().map(|&k| map.size(k)).sum();
            let new_max = cur_max.max(u_max);
            let padded = new_max * (cur.len() + unit.len());
            let waste = padded - (cur_sum + u_sum);
            let fits = !cur.is_empty() && waste as f64 <= p.tolerance as f64 * padded as f64 && padded <= p.max_rows;
            if !fits && !cur.is_empty() {
                groups.push(Group { offsets: std::mem::take(&mut cur), padded_rows: cur_max });
                cur_max = 0;
                cur_sum = 0;
            }
            cur.extend_from_slice(&unit);
            cur_max = cur_max.max(u_max);
            cur_sum += u_sum;
        }
        if !cur.is_empty() {
            groups.push(Group { offsets: cur, padded_rows: cur_max });
        }
        Plan { groups, params: Some(p), output_tiled: false }
    }

    /// All non-identity offsets in one group, executed output-stationary.
    pub fn output_tiled(map: &KernelMap) -> Plan {
        let order: Vec<usize> = map.canonical_order().into_iter().filter(|&k| map.size(k) > 0).collect();
        let mut groups = Vec::new();
        let rest: Vec<usize> = order.iter().copied().filter(|&k| Some(k) != map.identity()).collect();
        if let Some(c) = map.identity().filter(|&c| map.size(c) > 0) {
            groups.push(Group { offsets: vec![c], padded_rows: map.size(c) });
        }
        if !rest.is_empty() {
            let m = rest.iter().map(|&k| map.size(k)).max().unwrap_or(0);
            groups.push(Group { offsets: rest, padded_rows: m });
        }
        Plan { groups, params: None, output_tiled: true }
    }

    /// The same plan without the offsets `skip` marks (pruned offsets): their groups lose them,
    /// empty groups go, padding shrinks to the largest kept map of each group.
    pub fn skipping(mut self, map: &KernelMap, skip: &[bool]) -> Plan {
        for g in &mut self.groups {
            g.offsets.retain(|&k| !skip.get(k).copied().unwrap_or(false));
            g.padded_rows = g.offsets.iter().map(|&k| map.size(k)).max().unwrap_or(0);
        }
        self.groups.retain(|g| !g.offsets.is_empty());
        self
    }

    /// Map pairs the plan's groups run (without padding).
    pub fn pairs(&self, map: &KernelMap) -> usize {
        self.groups.iter().flat_map(|g| &g.offsets).map(|&k| map.size(k)).sum()
    }

    /// Map pairs the plan's groups run when only the output rows `keep` marks are computed.
    pub fn pairs_kept(&self, map: &KernelMap, keep: &[bool]) -> usize {
        let kept =
            |k: usize| map.pairs(k).1.iter().filter(|&&o| keep.get(o as usize).copied().unwrap_or(false)).count();
        self.groups.iter().flat_map(|g| &g.offsets).map(|&k| kept(k)).sum()
    }

    /// Short description: `ungrouped`, `output-tiled`, or the grouping parameters and group count.
    pub fn label(&self) -> String {
        match (self.output_tiled, self.params) {
            (true, _) => "output-tiled".into(),
            (false, Some(p)) => format!("tol {} max {} -> {} groups", p.tolerance, p.max_rows, self.groups.len()),
            (false, None) => "ungrouped".into(),
        }
    }

    /// Fraction of padded rows over all groups.
    pub fn padding_fraction(&self, map: &KernelMap) -> f64 {
        let padded: usize = self.groups.iter().map(|g| g.padded_rows * g.offsets.len()).sum();
        if padded == 0 {
            return 0.0;
        }
        1.0 - map.total_pairs() as f64 / padded as f64
    }
}
