//! Sensitivity analysis: prune one dependency group at a time at each ratio (no fine-tuning),
//! evaluate mIoU on labelled scans and price the pruned network with a [`LatencyTable`]
//! measured on the target; a threshold on the mIoU drop then turns the curves into per-group
//! widths (a [`WidthPlan`]). The per-layer sweep of Li et al. ("Pruning Filters for Efficient
//! ConvNets", ICLR 2017) and NNI's sensitivity pruner, with latency beside accuracy.
//!
//! Scores are computed once; kernel maps and tuned plans are reused across every pruned
//! network (the scans and their coordinates do not change); ratios that round to the same
//! width are evaluated once.

use std::fmt::Write as _;
use std::time::Instant;

use super::channel::{self, ChannelOptions};
use super::groups::{self, Group};
use super::importance::{self, Criterion};
use super::latency::LatencyTable;
use super::plan::WidthPlan;
use crate::device::Engine;
use crate::error::{Error, Result};
use crate::metrics::Confusion;
use crate::nn::arch::{ArchKind, NetDesc};
use crate::nn::checkpoint::Checkpoint;
use crate::pipeline::{self, Model, Prepared};

/// Labelled scans to evaluate on.
pub struct EvalSet {
    /// Network inputs.
    pub scans: Vec<Prepared>,
    /// Training ids per point of each scan (0: ignored).
    pub labels: Vec<Vec<u32>>,
}

impl EvalSet {
    /// Check the pairing of scans and labels.
    pub fn new(scans: Vec<Prepared>, labels: Vec<Vec<u32>>) -> Result<Self> {
        if scans.is_empty() {
            return Err(Error::invalid("eval set", "no labelled scans"));
        }
        if scans.len() != labels.len() {
            return Err(Error::invalid("eval set", format!("{} scans but {} label files", scans.len(), labels.len())));
        }
        for (i, (s, l)) in scans.iter().zip(&labels).enumerate() {
            if s.points != l.len() {
                return Err(Error::invalid(
                    "eval set",
                    format!("scan {} has {} points but {} labels", i + 1, s.points, l.len()),
                ));
            }
        }
        Ok(Self { scans, labels })
    }

    /// mIoU (fraction) over every scan together, and the forward seconds. The engine's maps
    /// are kept between calls: the scans' coordinates do not change.
    pub fn evaluate(&self, e: &Engine, m: &Model) -> Result<(f64, f64)> {
        let mut total = Confusion::new();
        let mut secs = 0.0;
        for (s, gt) in self.scans.iter().zip(&self.labels) {
            let t0 = Instant::now();
            let logits = m.forward(e, &s.voxels)?;
            secs += t0.elapsed().as_secs_f64();
            let (_, pred) = pipeline::labels(&logits, s);
            total.add(&Confusion::from_labels(&pred, gt)?);
        }
        Ok((total.miou().unwrap_or(0.0), secs))
    }
}

/// One pruned group at one ratio.
#[derive(Debug, Clone)]
pub struct Point {
    /// Group index.
    pub group: usize,
    /// Group name.
    pub name: String,
    /// Fraction asked to remove.
    pub ratio: f64,
    /// Channels kept (after rounding) of `of`.
    pub width: usize,
    /// Channels before.
    pub of: usize,
    /// mIoU without fine-tuning.
    pub miou: f64,
    /// Predicted end-to-end seconds ([`LatencyTable::predict`]).
    pub predicted: f64,
    /// Measured forward seconds over the eval scans (one run: noisy).
    pub measured: f64,
}

/// A whole sweep.
#[derive(Debug, Clone)]
pub struct Sweep {
    /// Architecture.
    pub arch: ArchKind,
    /// The unpruned network's mIoU, predicted and measured seconds.
    pub base: (f64, f64, f64),
    /// Every (group, ratio).
    pub points: Vec<Point>,
    /// The groups swept over (all groups of the network, for the plan).
    pub groups: Vec<Group>,
}

/// Sweep every prunable group of `ck` over `ratios` (widths rounded by `opts`), ranking
/// channels by `criterion`. `progress(done, total)` after each evaluation.
#[allow(clippy::too_many_arguments)]
pub fn sweep(
    ck: &Checkpoint,
    kind: ArchKind,
    criterion: Criterion,
    ratios: &[f64],
    opts: &ChannelOptions,
    eval: &EvalSet,
    e: &Engine,
    table: &LatencyTable,
    mut progress: impl FnMut(usize, usize),
) -> Result<Sweep> {
    if ratios.is_empty() || ratios.iter().any(|r| !(0.0..1.0).contains(r)) {
        return Err(Error::invalid("--ratios", "give ratios in [0, 1)"));
    }
    if criterion == Criterion::Taylor {
        return Err(Error::invalid("--criterion", "the sweep ranks by weights only: l1, l2, bn or random"));
    }
    table.check_target(e)?;
    let classes = ck.metadata().get("classes").and_then(|v| v.parse().ok()).unwrap_or(crate::io::kitti::NUM_CLASSES);
    let desc = NetDesc::from_checkpoint(kind, ck, classes)?;
    let groups = groups::groups(&desc)?;
    let scores = importance::scores(&groups, ck.tensors(), criterion, None, 0)?;
    let full: Vec<usize> = groups.iter().map(|g| g.width).collect();
    let base_model = Model::from_desc(ck, &desc)?;
    // Warm-up: builds the maps and tunes every layer of the full network.
    eval.evaluate(e, &base_model)?;
    let (base_miou, base_secs) = eval.evaluate(e, &base_model)?;
    let base = (base_miou, table.predict(&desc)?, base_secs);
    let prunable: Vec<&Group> = groups.iter().filter(|g| g.prunable).collect();
    let total = prunable.len() * ratios.len();
    let mut points = Vec::with_capacity(total);
    for g in prunable {
        let mut seen: Vec<(usize, f64, f64, f64)> = Vec::new();
        for &r in ratios {
            let width = opts.kept(g.width, ((g.width as f64) * (1.0 - r)).round() as usize);
            let (miou, predicted, measured) = if width == g.width {
                base
            } else if let Some(&(_, m, p, t)) = seen.iter().find(|s| s.0 == width) {
                (m, p, t)
            } else {
                let mut widths = full.clone();
                widths[g.id] = width;
                let plan = channel::select_widths(&groups, &scores, &widths)?;
                let tensors = channel::apply(&groups, &plan, ck.tensors())?;
                let pck = Checkpoint::from_tensors("<sensitivity>", tensors, ck.metadata().clone());
                let pdesc = NetDesc::from_checkpoint(kind, &pck, classes)?;
                let m = Model::from_desc(&pck, &pdesc)?;
                let (miou, secs) = eval.evaluate(e, &m)?;
                let v = (miou, table.predict(&pdesc)?, secs);
                seen.push((width, v.0, v.1, v.2));
                v
            };
            points.push(Point {
                group: g.id,
                name: g.name().to_string(),
                ratio: r,
                width,
                of: g.width,
                miou,
                predicted,
                measured,
            });
            progress(points.len(), total);
        }
    }
    Ok(Sweep { arch: kind, base, points, groups })
}

impl Sweep {
    /// The sweep as CSV (mIoU in percent, times in ms), the unpruned network first as group -1.
    pub fn to_csv(&self) -> String {
        let mut s = String::from("group,name,ratio,width,of,miou,predicted_ms,saved_ms,measured_ms\n");
        let (bm, bp, bt) = self.base;
        let _ = writeln!(s, "-1,unpruned,0,0,0,{:.3},{:.3},0,{:.3}", bm * 100.0, bp * 1e3, bt * 1e3);
        for p in &self.points {
            let _ = writeln!(
                s,
                "{},{},{},{},{},{:.3},{:.3},{:.3},{:.3}",
                p.group,
                p.name,
                p.ratio,
                p.width,
                p.of,
                p.miou * 100.0,
                p.predicted * 1e3,
                (bp - p.predicted) * 1e3,
                p.measured * 1e3
            );
        }
        s
    }

    /// Per group, the narrowest width whose mIoU stays within `threshold` (a fraction, e.g.
    /// 0.01 for one point) of the unpruned network; groups whose every pruned width loses more
    /// keep all their channels.
    pub fn plan(&self, threshold: f64) -> Result<WidthPlan> {
        if !(threshold.is_finite() && threshold >= 0.0) {
            return Err(Error::invalid("--threshold", format!("must be a non-negative mIoU drop, got {threshold}")));
        }
        let widths: Vec<usize> = self
            .groups
            .iter()
            .map(|g| {
                self.points
                    .iter()
                    .filter(|p| p.group == g.id && p.miou >= self.base.0 - threshold)
                    .map(|p| p.width)
                    .min()
                    .unwrap_or(g.width)
            })
            .collect();
        WidthPlan::new(self.arch, &self.groups, &widths)
    }
}
