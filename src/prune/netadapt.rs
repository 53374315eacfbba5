//! NetAdapt (Yang et al., ECCV 2018): shrink a network step by step to a latency target
//! measured on the device. Each iteration asks for a latency cut ΔR (decaying); for every
//! channel group it proposes the widest width whose predicted latency ([`LatencyTable`])
//! meets the cut, keeps the channels by magnitude, fine-tunes the proposal briefly, and keeps
//! the proposal with the best mIoU on the evaluation scans; the kept (fine-tuned) network
//! starts the next iteration. A longer fine-tune follows the last iteration.
//!
//! Sized to 2 cores by the options, not by changing the algorithm: few fine-tuning steps per
//! proposal (`short_steps`), training scans cropped to a radius (`crop`), and the three
//! bundled labelled scans. Every iteration is saved (`iter_NN.safetensors`, a row of
//! `netadapt.csv`), and a run started again on the same directory resumes after the last one.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::channel;
use super::finetune::FineTune;
use super::groups::{self, Group};
use super::importance::{self, Criterion};
use super::latency::LatencyTable;
use super::sensitivity::EvalSet;
use crate::device::Engine;
use crate::error::{Error, Result};
use crate::io::tensors::Tensor;
use crate::kmap::MapBuilder;
use crate::nn::arch::{ArchKind, NetDesc};
use crate::nn::checkpoint::{save, Checkpoint};
use crate::pipeline::{self, Model};
use crate::plan::Grouping;
use crate::train::data::Sample;

/// Knobs of a NetAdapt run.
#[derive(Debug, Clone)]
pub struct NetAdaptOptions {
    /// Stop when the predicted latency is the unpruned one divided by this.
    pub target_speedup: f64,
    /// First iteration's latency cut, as a fraction of the unpruned predicted latency.
    pub first_cut: f64,
    /// Each later cut is the previous one times this.
    pub decay: f64,
    /// Proposed widths are multiples of this.
    pub round_to: usize,
    /// No group narrower than this.
    pub min_width: usize,
    /// Fine-tuning steps per proposal.
    pub short_steps: usize,
    /// Fine-tuning steps after the last iteration.
    pub long_steps: usize,
    /// Fine-tuning learning rate (AdamW, constant).
    pub lr: f64,
    /// Training scans cropped to this radius in metres (`None`: whole scans).
    pub crop: Option<f32>,
    /// At most this many iterations.
    pub max_iterations: usize,
    /// Seed of the fine-tuning order and augmentation.
    pub seed: u64,
}

impl NetAdaptOptions {
    /// Reject settings no run can use.
    pub fn validate(&self) -> Result<()> {
        if !(self.target_speedup.is_finite() && self.target_speedup > 1.0) {
            return Err(Error::invalid("--target-speedup", format!("must be above 1, got {}", self.target_speedup)));
        }
        if !(self.first_cut > 0.0 && self.first_cut < 1.0 && self.decay > 0.0 && self.decay <= 1.0) {
            return Err(Error::invalid(
                "--first-cut/--decay",
                "the first cut must be in (0, 1) and the decay in (0, 1]",
            ));
        }
        if self.round_to == 0 || self.min_width == 0 || self.max_iterations == 0 {
            return Err(Error::invalid("netadapt", "--round-to, --min-width and --max-iterations must be at least 1"));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::invalid("--lr", "must be positive"));
        }
        if self.crop.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
            return Err(Error::invalid("--crop", "must be a positive radius in metres"));
        }
        Ok(())
    }
}

/// One iteration's outcome.
#[derive(Debug, Clone)]
pub struct Iteration {
    /// 1-based.
    pub index: usize,
    /// Latency asked for (seconds, predicted).
    pub target: f64,
    /// The group narrowed and its widths before and after.
    pub group: String,
    /// Channels before.
    pub from: usize,
    /// Channels after.
    pub to: usize,
    /// Proposals fine-tuned and evaluated.
    pub proposals: usize,
    /// Predicted seconds of the kept network.
    pub predicted: f64,
    /// Measured end-to-end seconds of the kept network (median of 3).
    pub measured: f64,
    /// mIoU of the kept network after its short fine-tune.
    pub miou: f64,
    /// Widths summary.
    pub widths: String,
}

const CSV_HEADER: &str = "iteration,target_ms,group,from,to,proposals,predicted_ms,measured_ms,miou,widths";

impl Iteration {
    fn csv(&self) -> String {
        format!(
            "{},{:.3},{},{},{},{},{:.3},{:.3},{:.3},{}",
            self.index,
            self.target * 1e3,
            self.group,
            self.from,
            self.to,
            self.proposals,
            self.predicted * 1e3,
            self.measured * 1e3,
            self.miou * 100.0,
            self.widths
        )
    }
}

/// Everything a run needs besides its options.
pub struct NetAdapt<'a> {
    /// Architecture.
    pub kind: ArchKind,
    /// Latency table of the unpruned network on the target.
    pub table: &'a LatencyTable,
    /// Labelled scans proposals are ranked on.
    pub eval: &'a EvalSet,
    /// Fine-tuning scans.
    pub train: Vec<Sample>,
    /// Scan the kept networks are timed on end to end.
    pub latency_scan: PathBuf,
    /// Engine of the evaluations (its maps are reused across proposals).
    pub engine: &'a Engine,
}

/// Tensors as a checkpoint carrying `meta`.
fn checkpoint(
    tensors: std::collections::BTreeMap<String, Tensor<f32>>,
    meta: &std::collections::HashMap<String, String>,
) -> Checkpoint {
    Checkpoint::from_tensors("<netadapt>", tensors, meta.clone())
}

impl NetAdapt<'_> {
    /// Fine-tune `ck` for `steps` steps; returns the tuned weights.
    fn fine_tune(&self, ck: &Checkpoint, o: &NetAdaptOptions, steps: usize) -> Result<Checkpoint> {
        FineTune { steps, lr: o.lr, seed: o.seed }.run(self.kind, ck, &self.train)
    }

    fn model(&self, ck: &Checkpoint) -> Result<(NetDesc, Model)> {
        let desc = NetDesc::from_checkpoint(self.kind, ck, crate::io::kitti::NUM_CLASSES)?;
        let m = Model::from_desc(ck, &desc)?;
        Ok((desc, m))
    }

    /// Median end-to-end seconds of 3 runs after one warm-up, on a fresh engine.
    fn measure(&self, m: &Model) -> Result<f64> {
        let e = Engine::new(self.engine.device().clone(), MapBuilder::Sort, Grouping::Auto);
        let mut t = Vec::new();
        for i in 0..4 {
            let t0 = Instant::now();
            let p = pipeline::prepare_file(&self.latency_scan, None, pipeline::VoxelizeMode::Mean)?;
            std::hint::black_box(pipeline::segment(&e, m, &p, &mut pipeline::Timings::default())?);
            if i > 0 {
                t.push(t0.elapsed().as_secs_f64());
            }
        }
        t.sort_by(f64::total_cmp);
        Ok(t[1])
    }

    /// Run (or resume) NetAdapt from `start` into `dir`; `log` gets a line per proposal and
    /// iteration. Returns the final, long-fine-tuned network.
    pub fn run(
        &self,
        start: &Checkpoint,
        o: &NetAdaptOptions,
        dir: &Path,
        mut log: impl FnMut(&str),
    ) -> Result<(Checkpoint, Vec<Iteration>)> {
        o.validate()?;
        self.table.check_target(self.engine)?;
        if self.train.is_empty() {
            return Err(Error::invalid("--data", "no fine-tuning scans"));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let meta = start.metadata().clone();
        let (base_desc, _) = self.model(start)?;
        let base = self.table.predict(&base_desc)?;
        let goal = base / o.target_speedup;
        // The narrowest network the grid allows must meet the target, or no run can.
        let gs = groups::groups(&base_desc)?;
        let narrow: Vec<usize> = gs
            .iter()
            .map(|g| {
                if g.prunable {
                    o.round_to.max(o.min_width.div_ceil(o.round_to) * o.round_to).min(g.width)
                } else {
                    g.width
                }
            })
            .collect();
        let scores = importance::scores(&gs, start.tensors(), Criterion::L2, None, 0)?;
        let plan = channel::select_widths(&gs, &scores, &narrow)?;
        let small = checkpoint(channel::apply(&gs, &plan, start.tensors())?, &meta);
        let floor = self.table.predict(&NetDesc::from_checkpoint(self.kind, &small, crate::io::kitti::NUM_CLASSES)?)?;
        if floor > goal {
            return Err(Error::invalid(
                "--target-speedup",
                format!(
                    "{}x asks for {:.1} ms, but the narrowest network on this grid is predicted at {:.1} ms ({:.2}x)",
                    o.target_speedup,
                    goal * 1e3,
                    floor * 1e3,
                    base / floor
                ),
            ));
        }
        let csv = dir.join("netadapt.csv");
        // Resume after the last saved iteration.
        let mut done: Vec<String> = match std::fs::read_to_string(&csv) {
            Ok(t) => t.lines().skip(1).filter(|l| !l.trim().is_empty()).map(str::to_string).collect(),
            Err(_) => Vec::new(),
        };
        let mut cur = checkpoint(start.tensors().clone(), &meta);
        while !done.is_empty() {
            let p = dir.join(format!("iter_{:02}.safetensors", done.len()));
            match Checkpoint::load(&p) {
                Ok(ck) => {
                    cur = checkpoint(ck.tensors().clone(), &meta);
                    log(&format!("resuming after iteration {} ({})", done.len(), p.display()));
                    break;
                }
                Err(_) => {
                    done.pop();
                }
            }
        }
        let mut iterations = Vec::new();
        let mut cut = o.first_cut * base * o.decay.powi(done.len() as i32);
        for index in done.len() + 1..=o.max_iterations {
            let (desc, _) = self.model(&cur)?;
            let now = self.table.predict(&desc)?;
            if now <= goal {
                break;
            }
            let target = (now - cut).max(goal);
            cut *= o.decay;
            let gs = groups::groups(&desc)?;
            let scores = importance::scores(&gs, cur.tensors(), Criterion::L2, None, 0)?;
            let widths: Vec<usize> = gs.iter().map(|g| g.width).collect();
            let mut best: Option<(f64, Checkpoint, &Group, usize, f64)> = None;
            let mut proposals = 0;
            for g in gs.iter().filter(|g| g.prunable) {
                let Some((w, pred, tensors)) = self.propose(&cur, &gs, &scores, &widths, g, target, o)? else {
                    continue;
                };
                proposals += 1;
                let tuned = self.fine_tune(&checkpoint(tensors, &meta), o, o.short_steps)?;
                let (_, m) = self.model(&tuned)?;
                let (miou, _) = self.eval.evaluate(self.engine, &m)?;
                log(&format!(
                    "  iteration {index}: {} {} -> {w}: predicted {:.1} ms, mIoU {:.1}%",
                    g.name(),
                    g.width,
                    pred * 1e3,
                    miou * 100.0
                ));
                if best.as_ref().is_none_or(|b| miou > b.0) {
                    best = Some((miou, tuned, g, w, pred));
                }
            }
            let Some((miou, tuned, g, w, pred)) = best else {
                return Err(Error::invalid(
                    "--target-speedup",
                    format!(
                        "no group can be narrowed further ({:.1} ms predicted, target {:.1} ms)",
                        now * 1e3,
                        goal * 1e3
                    ),
                ));
            };
            let (tdesc, m) = self.model(&tuned)?;
            let it = Iteration {
                index,
                target,
                group: g.name().to_string(),
                from: g.width,
                to: w,
                proposals,
                predicted: pred,
                measured: self.measure(&m)?,
                miou,
                widths: tdesc.widths_summary(),
            };
            save(&dir.join(format!("iter_{index:02}.safetensors")), tuned.tensors(), meta.clone(), false)?;
            done.push(it.csv());
            let mut text = format!("{CSV_HEADER}\n");
            for l in &done {
                let _ = writeln!(text, "{l}");
            }
            std::fs::write(&csv, text).map_err(|e| Error::io(&csv, e))?;
            log(&format!(
                "iteration {index}: {} {} -> {}; predicted {:.1} ms (target {:.1}), measured {:.1} ms, mIoU {:.1}%, widths {}",
                it.group,
                it.from,
                it.to,
                it.predicted * 1e3,
                target * 1e3,
                it.measured * 1e3,
                it.miou * 100.0,
                it.widths
            ));
            iterations.push(it);
            cur = tuned;
        }
        let last = self.fine_tune(&cur, o, o.long_steps)?;
        save(&dir.join("final.safetensors"), last.tensors(), meta, false)?;
        Ok((last, iterations))
    }

    /// The widest width of `g` on the grid whose network is predicted to meet `target`, and
    /// that network's tensors (channels kept by `scores`).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn propose(
        &self,
        cur: &Checkpoint,
        gs: &[Group],
        scores: &[Vec<f64>],
        widths: &[usize],
        g: &Group,
        target: f64,
        o: &NetAdaptOptions,
    ) -> Result<Option<(usize, f64, std::collections::BTreeMap<String, Tensor<f32>>)>> {
        let floor = o.min_width.min(g.width);
        let mut candidates: Vec<usize> =
            (1..=g.width / o.round_to).map(|i| i * o.round_to).filter(|&w| w < g.width && w >= floor).collect();
        candidates.reverse();
        for w in candidates {
            let mut ws = widths.to_vec();
            ws[g.id] = w;
            let plan = channel::select_widths(gs, scores, &ws)?;
            let tensors = channel::apply(gs, &plan, cur.tensors())?;
            let desc = NetDesc::from_checkpoint(
                self.kind,
                &checkpoint(tensors.clone(), cur.metadata()),
                crate::io::kitti::NUM_CLASSES,
            )?;
            let pred = self.table.predict(&desc)?;
            if pred <= target {
                return Ok(Some((w, pred, tensors)));
            }
        }
        Ok(None)
    }
}
