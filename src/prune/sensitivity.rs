//! Sensitivity analysis: prune one dependency group at a time at each ratio (no fine-tuning),
//! evaluate mIoU on labelled scans and price the pruned network with a [`LatencyTable`]
//! measured on the target; a threshold on the mIoU drop then turns the curves into per-group
//! widths (a [`WidthPlan`]). The per-layer sweep of Li et al. ("Pruning Filters for Efficient
//! ConvNets", ICLR 2017) and NNI's sensitivity pruner, with latency beside accuracy.
//!
//! Finer granularities sweep one conv at a time instead ([`sweep_convs`]): a ratio of its
//! kernel offsets removed (by L1), or of its weights zeroed in a sparse format; each point is
//! priced with the table's measured cuts, and a threshold turns them into per-conv cuts of a
//! plan.
//!
//! Scores are computed once; kernel maps and tuned plans are reused across every pruned
//! network (the scans and their coordinates do not change); ratios that round to the same
//! width (or offset count) are evaluated once, and only the pruned unit's tensors change.

use std::fmt::Write as _;
use std::time::Instant;

use super::channel::{self, ChannelOptions};
use super::groups::{self, Group};
use super::importance::{self, Criterion};
use super::latency::LatencyTable;
use super::plan::{ConvCut, WidthPlan};
use crate::device::Engine;
use crate::error::{Error, Result};
use crate::metrics::Confusion;
use crate::nn::arch::{ArchKind, ConvDesc, NetDesc};
use crate::nn::checkpoint::Checkpoint;
use crate::pipeline::{self, Model, Prepared};
use crate::sparse_weights::Format;

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

/// What a sweep prunes one unit at a time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Granularity {
    /// Channels of one dependency group.
    Channel,
    /// Kernel offsets of one conv.
    Offset,
    /// Weights of one conv, kept in a sparse format.
    Sparse(Format),
}

impl Granularity {
    /// `channel`, `offset`, `element`, `block` or `N:M`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "channel" => Ok(Self::Channel),
            "offset" => Ok(Self::Offset),
            _ => Format::parse(s).map(Self::Sparse).map_err(|_| {
                Error::invalid("--granularity", format!("expected channel, offset, element, block or N:M, got `{s}`"))
            }),
        }
    }

    /// What one unit is, for axis labels.
    pub fn unit(self) -> &'static str {
        match self {
            Self::Channel => "channels of the group",
            Self::Offset => "kernel offsets of the conv",
            Self::Sparse(_) => "weights of the conv",
        }
    }
}

/// One unit swept: a dependency group or a conv.
#[derive(Debug, Clone)]
pub struct Unit {
    /// Group index, or conv index ([`NetDesc::convs`] order).
    pub id: usize,
    /// Group name or conv kernel name.
    pub name: String,
    /// Channels, offsets or weights before pruning.
    pub of: usize,
}

/// One pruned unit at one ratio.
#[derive(Debug, Clone)]
pub struct Point {
    /// Unit index ([`Unit::id`]).
    pub group: usize,
    /// Unit name.
    pub name: String,
    /// Fraction asked to remove.
    pub ratio: f64,
    /// Channels, offsets or nonzero weights kept (after rounding) of `of`.
    pub width: usize,
    /// Channels, offsets or weights before.
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
    /// What was pruned.
    pub granularity: Granularity,
    /// Every (unit, ratio).
    pub points: Vec<Point>,
    /// The units swept.
    pub units: Vec<Unit>,
    /// All groups of the network (for the plan).
    pub groups: Vec<Group>,
    /// The unpruned network.
    pub desc: NetDesc,
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
    let units = groups
        .iter()
        .filter(|g| g.prunable)
        .map(|g| Unit { id: g.id, name: g.name().to_string(), of: g.width })
        .collect();
    Ok(Sweep { arch: kind, granularity: Granularity::Channel, base, points, units, groups, desc })
}

/// The cut of `ratio` at `granularity` for conv `c`, and the units it keeps of how many.
fn conv_cut(c: &ConvDesc, granularity: Granularity, ratio: f64) -> Option<(ConvCut, usize, usize)> {
    let vol = c.spec.volume();
    let weights = vol * c.cin * c.cout;
    match granularity {
        Granularity::Channel => None,
        Granularity::Offset if vol > 1 => {
            let kept = (vol - ((vol as f64) * ratio).round() as usize).max(1);
            Some((ConvCut::Offsets { kept, of: vol }, kept, vol))
        }
        Granularity::Offset => None,
        Granularity::Sparse(f) => {
            let fits = match f {
                Format::Block => c.cout.is_multiple_of(crate::sparse_weights::BLOCK),
                Format::NM(_, m) => c.cin.is_multiple_of(m as usize),
                Format::Element => true,
            };
            let kept = match f {
                Format::NM(n, m) => weights / m as usize * n as usize,
                _ => weights - ((weights as f64) * ratio).round() as usize,
            };
            fits.then_some((ConvCut::Sparse(f, ratio), kept, weights))
        }
    }
}

/// Sweep every conv of `ck` the `granularity` applies to (offsets: convs of more than one
/// offset; sparse formats: the convs the format fits) over `ratios`, one conv at a time.
/// Needs a table with the matching cuts ([`LatencyTable::measure_cuts`]).
#[allow(clippy::too_many_arguments)]
pub fn sweep_convs(
    ck: &Checkpoint,
    kind: ArchKind,
    granularity: Granularity,
    ratios: &[f64],
    eval: &EvalSet,
    e: &Engine,
    table: &LatencyTable,
    mut progress: impl FnMut(usize, usize),
) -> Result<Sweep> {
    if granularity == Granularity::Channel {
        return Err(Error::invalid("--granularity", "channel groups are swept by `sweep`"));
    }
    if ratios.is_empty() || ratios.iter().any(|r| !(0.0..1.0).contains(r)) {
        return Err(Error::invalid("--ratios", "give ratios in [0, 1)"));
    }
    table.check_target(e)?;
    let classes = ck.metadata().get("classes").and_then(|v| v.parse().ok()).unwrap_or(crate::io::kitti::NUM_CLASSES);
    let desc = NetDesc::from_checkpoint(kind, ck, classes)?;
    let groups = groups::groups(&desc)?;
    let base_model = Model::from_desc(ck, &desc)?;
    eval.evaluate(e, &base_model)?;
    let (base_miou, base_secs) = eval.evaluate(e, &base_model)?;
    let base = (base_miou, table.predict(&desc)?, base_secs);
    let convs = desc.convs();
    let mut units = Vec::new();
    let mut todo = Vec::new();
    for (i, c) in convs.iter().enumerate() {
        let cuts: Vec<(f64, ConvCut, usize, usize)> =
            ratios.iter().filter_map(|&r| conv_cut(c, granularity, r).map(|(cut, k, of)| (r, cut, k, of))).collect();
        if let Some(&(_, _, _, of)) = cuts.first() {
            units.push(Unit { id: i, name: c.kernel.clone(), of });
            todo.push((i, cuts));
        }
    }
    if todo.is_empty() {
        return Err(Error::invalid("--granularity", "no conv of this network can be pruned this way"));
    }
    let total: usize = todo.iter().map(|t| t.1.len()).sum();
    let mut points = Vec::with_capacity(total);
    for (i, cuts) in todo {
        let c = convs[i];
        let mut seen: Vec<(usize, f64, f64, f64)> = Vec::new();
        for (r, cut, kept, of) in cuts {
            let v = if kept == of {
                base
            } else if let Some(&(_, m, p, t)) = seen.iter().find(|s| s.0 == kept) {
                (m, p, t)
            } else {
                let one = [(c.kernel.clone(), cut)];
                let (tensors, meta) = super::cut_convs(&desc, ck.tensors(), &one)?;
                let mut md = ck.metadata().clone();
                md.extend(meta);
                let pck = Checkpoint::from_tensors("<sensitivity>", tensors, md);
                let m = Model::from_desc(&pck, &desc)?;
                let (miou, secs) = eval.evaluate(e, &m)?;
                let v = (miou, table.predict_cuts(&desc, &one)?, secs);
                seen.push((kept, v.0, v.1, v.2));
                v
            };
            points.push(Point {
                group: i,
                name: c.kernel.clone(),
                ratio: r,
                width: kept,
                of,
                miou: v.0,
                predicted: v.1,
                measured: v.2,
            });
            progress(points.len(), total);
        }
    }
    Ok(Sweep { arch: kind, granularity, base, points, units, groups, desc })
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
        if self.granularity != Granularity::Channel {
            let full: Vec<usize> = self.groups.iter().map(|g| g.width).collect();
            let mut plan = WidthPlan::new(self.arch, &self.groups, &full)?;
            for u in &self.units {
                let best = self
                    .points
                    .iter()
                    .filter(|p| p.group == u.id && p.miou >= self.base.0 - threshold && p.width < p.of)
                    .max_by(|a, b| a.ratio.total_cmp(&b.ratio));
                let c = self.desc.convs()[u.id];
                if let Some((cut, _, _)) = best.and_then(|p| conv_cut(c, self.granularity, p.ratio)) {
                    plan.convs.push((u.name.clone(), cut));
                }
            }
            return Ok(plan);
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

    /// The sensitivity-guided plan for a latency budget: the smallest per-group mIoU drop
    /// threshold whose plan (see [`Sweep::plan`]) the table predicts at or under `target`
    /// seconds, with that threshold and the prediction. Thresholds are tried at every drop the
    /// sweep saw, smallest first, so the plan gives up as little accuracy per group as the
    /// budget allows (the per-layer allotment of NNI's sensitivity pruner, priced by latency
    /// instead of parameters).
    pub fn plan_for_latency(&self, table: &LatencyTable, target: f64) -> Result<(f64, WidthPlan, f64)> {
        let desc = &self.desc;
        if !(target.is_finite() && target > 0.0) {
            return Err(Error::invalid("--target-speedup", format!("needs a positive latency target, got {target} s")));
        }
        let links = groups::conv_links(desc, &self.groups);
        let mut drops: Vec<f64> = self.points.iter().map(|p| (self.base.0 - p.miou).max(0.0)).collect();
        drops.push(0.0);
        drops.sort_by(f64::total_cmp);
        drops.dedup();
        let mut best = None;
        for t in drops {
            let plan = self.plan(t)?;
            let widths: Vec<usize> = plan.groups.iter().map(|g| g.1).collect();
            let predicted = if plan.convs.is_empty() {
                table.predict_shapes(desc, &groups::conv_shapes(&links, &widths))?
            } else {
                table.predict_cuts(desc, &plan.convs)?
            };
            best = Some((t, plan, predicted));
            if predicted <= target {
                return Ok(best.expect("just set"));
            }
        }
        let narrowest = best.map(|b| b.2).unwrap_or(self.base.1);
        Err(Error::invalid(
            "--target-speedup",
            format!(
                "the sweep's narrowest widths are predicted at {:.1} ms, above the target {:.1} ms: add larger --ratios",
                narrowest * 1e3,
                target * 1e3
            ),
        ))
    }
}

/// One point of a voxel-pruning sweep: conv `name` alone pruned at `ratio`.
#[derive(Debug, Clone)]
pub struct VoxelPoint {
    /// Conv kernel tensor name (empty for the unpruned network).
    pub name: String,
    /// Fraction of its voxels pruned.
    pub ratio: f64,
    /// mIoU (fraction) on the evaluation scans.
    pub miou: f64,
    /// Measured forward time (seconds, median) on the timing scan.
    pub seconds: f64,
}

/// Voxel pruning one conv at a time: for every conv in `convs` and ratio, mIoU on `eval` and
/// the forward time measured on `timing` (median of `runs` after a warm-up), with `base` (fill
/// and score) as the plan's other settings. The unpruned network comes first.
#[allow(clippy::too_many_arguments)]
pub fn sweep_voxels(
    model: &Model,
    convs: &[String],
    ratios: &[f64],
    base: &crate::voxel_prune::VoxelPlan,
    eval: &EvalSet,
    e: &Engine,
    timing: &Prepared,
    runs: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<VoxelPoint>> {
    let time = |m: &Model| -> Result<f64> {
        m.forward(e, &timing.voxels)?;
        let mut t = Vec::with_capacity(runs.max(1));
        for _ in 0..runs.max(1) {
            let t0 = Instant::now();
            m.forward(e, &timing.voxels)?;
            t.push(t0.elapsed().as_secs_f64());
        }
        t.sort_by(f64::total_cmp);
        Ok(t[t.len() / 2])
    };
    let (miou, _) = eval.evaluate(e, model)?;
    let mut out = vec![VoxelPoint { name: String::new(), ratio: 0.0, miou, seconds: time(model)? }];
    let total = convs.len() * ratios.len();
    for c in convs {
        for &r in ratios {
            let mut plan = base.clone();
            plan.ratios = [(c.clone(), r as f32)].into_iter().collect();
            let mut m = model.clone();
            m.set_voxel_plan(&plan)?;
            let (miou, _) = eval.evaluate(e, &m)?;
            out.push(VoxelPoint { name: c.clone(), ratio: r, miou, seconds: time(&m)? });
            progress(out.len() - 1, total);
        }
    }
    Ok(out)
}

/// The voxel plan keeping, per conv, the largest swept ratio whose mIoU drop alone is at most
/// `threshold` (a fraction) and which measured faster than the unpruned network.
pub fn voxel_plan(
    points: &[VoxelPoint],
    threshold: f64,
    base: &crate::voxel_prune::VoxelPlan,
) -> crate::voxel_prune::VoxelPlan {
    let mut plan = base.clone();
    plan.ratios.clear();
    let Some(b) = points.first() else { return plan };
    for p in &points[1..] {
        if b.miou - p.miou <= threshold && p.seconds < b.seconds {
            let e = plan.ratios.entry(p.name.clone()).or_insert(0.0);
            *e = e.max(p.ratio as f32);
        }
    }
    plan.ratios.retain(|_, r| *r > 0.0);
    plan
}
