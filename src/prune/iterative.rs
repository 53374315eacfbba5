//! Iterative magnitude pruning: prune the smallest conv weights globally, train, prune again, on
//! a schedule up to a final sparsity, with a choice of what each round trains from:
//!
//! - [`Restart::Continue`]: the pruned weights themselves (prune → fine-tune; Han et al. 2015),
//!   with [`Schedule::Agp`] the gradual schedule of Zhu & Gupta (2017);
//! - [`Restart::Rewind`]: the surviving weights rewound to their values at step k of the
//!   first (dense) training — lottery tickets (Frankle & Carbin, ICLR 2019; k > 0 as in
//!   Frankle et al., ICML 2020);
//! - [`Restart::Reinit`]: the surviving weights drawn afresh (the lottery papers' control).
//!
//! Every round is saved (`round_NN.safetensors`: weights, `mask.*` tensors that hold pruned
//! weights at exactly zero through any later training, and element-format tags so the CPU's
//! sparse kernels run it) with a row of `imp.csv`; a run started again on the same directory
//! resumes after the last saved round. Sized to 2 cores by the options (steps per round,
//! cropped scans), not by changing the algorithm.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;

use super::finetune::FineTune;
use super::sensitivity::EvalSet;
use crate::device::Engine;
use crate::error::{Error, Result};
use crate::io::kitti::NUM_CLASSES;
use crate::io::tensors::Tensor;
use crate::nn::arch::{ArchKind, NetDesc};
use crate::nn::checkpoint::{save, Checkpoint, SPARSE_FORMAT};
use crate::pipeline::Model;
use crate::train::data::Sample;
use crate::train::net::TrainNet;

/// Named weights.
type Tensors = BTreeMap<String, Tensor<f32>>;

/// How sparsity grows over the rounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// `s_i = s_f · (1 − (1 − i/n)³)`: large cuts first, small ones last (AGP).
    Agp,
    /// `s_i = s_f · i/n`.
    Fixed,
    /// Each round removes this fraction of the weights still there (lottery tickets: 0.2),
    /// the last round stopping at the final sparsity.
    Geometric(f64),
}

/// What each round trains from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// The pruned weights (fine-tuning).
    Continue,
    /// The surviving weights' values at the rewind step.
    Rewind,
    /// Fresh random values for the surviving weights.
    Reinit,
}

impl std::str::FromStr for Restart {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "finetune" => Ok(Restart::Continue),
            "rewind" => Ok(Restart::Rewind),
            "reinit" => Ok(Restart::Reinit),
            _ => Err(Error::invalid("--restart", format!("expected finetune, rewind or reinit, got `{s}`"))),
        }
    }
}

/// Knobs of a run.
#[derive(Debug, Clone)]
pub struct ImpOptions {
    /// Fraction of all conv weights zero at the end, in (0, 1).
    pub final_sparsity: f64,
    /// How sparsity grows.
    pub schedule: Schedule,
    /// Rounds (for [`Schedule::Geometric`], as many as the rate needs; this is ignored).
    pub rounds: usize,
    /// What each round trains from.
    pub restart: Restart,
    /// Dense training steps before the first prune (0: the start is already trained).
    pub pretrain_steps: usize,
    /// Step of the dense training whose weights [`Restart::Rewind`] returns to (0: the start).
    pub rewind_step: usize,
    /// Training steps per round.
    pub steps: usize,
    /// Learning rate (AdamW).
    pub lr: f64,
    /// Cosine decay over each training (else constant).
    pub cosine: bool,
    /// Seed of order, augmentation and re-initialization.
    pub seed: u64,
}

impl ImpOptions {
    /// Reject settings no run can use.
    pub fn validate(&self) -> Result<()> {
        if !(self.final_sparsity > 0.0 && self.final_sparsity < 1.0) {
            return Err(Error::invalid("--final-sparsity", format!("must be in (0, 1), got {}", self.final_sparsity)));
        }
        if let Schedule::Geometric(r) = self.schedule {
            if !(r > 0.0 && r < 1.0) {
                return Err(Error::invalid("--rate", format!("must be in (0, 1), got {r}")));
            }
        } else if self.rounds == 0 {
            return Err(Error::invalid("--rounds", "must be at least 1"));
        }
        if self.restart == Restart::Rewind && self.rewind_step > self.pretrain_steps {
            return Err(Error::invalid(
                "--rewind-step",
                format!("step {} is past the {} dense training steps", self.rewind_step, self.pretrain_steps),
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::invalid("--lr", "must be positive"));
        }
        Ok(())
    }

    /// Sparsity after each round.
    pub fn targets(&self) -> Vec<f64> {
        let sf = self.final_sparsity;
        match self.schedule {
            Schedule::Agp => {
                let n = self.rounds as f64;
                (1..=self.rounds).map(|i| sf * (1.0 - (1.0 - i as f64 / n).powi(3))).collect()
            }
            Schedule::Fixed => (1..=self.rounds).map(|i| sf * i as f64 / self.rounds as f64).collect(),
            Schedule::Geometric(r) => {
                let mut v = Vec::new();
                let mut kept = 1.0;
                while 1.0 - kept < sf - 1e-12 {
                    kept *= 1.0 - r;
                    v.push((1.0 - kept).min(sf));
                }
                v
            }
        }
    }
}

/// One round's outcome.
#[derive(Debug, Clone)]
pub struct Round {
    /// 1-based (0: the dense network before pruning).
    pub index: usize,
    /// Fraction of conv weights that are zero.
    pub sparsity: f64,
    /// mIoU after the round's training.
    pub miou: f64,
}

const CSV_HEADER: &str = "round,sparsity,miou";

/// Conv kernels of `desc`.
fn kernels(desc: &NetDesc) -> Vec<String> {
    desc.convs().iter().map(|c| c.kernel.clone()).collect()
}

/// Global magnitude masks: the smallest-|w| weights over every conv kernel zeroed until
/// `sparsity` of them are (weights already zero count first). Ties broken by position.
pub fn global_masks(
    tensors: &BTreeMap<String, Tensor<f32>>,
    kernels: &[String],
    sparsity: f64,
) -> Result<BTreeMap<String, Vec<bool>>> {
    let mut all: Vec<(f32, usize, usize)> = Vec::new();
    for (k, name) in kernels.iter().enumerate() {
        let t = tensors.get(name).ok_or_else(|| Error::tensor(name, "missing from the model"))?;
        all.extend(t.data.iter().enumerate().map(|(i, &v)| (v.abs(), k, i)));
    }
    let cut = ((all.len() as f64) * sparsity).round() as usize;
    all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut masks: BTreeMap<String, Vec<bool>> =
        kernels.iter().map(|n| (n.clone(), vec![true; tensors[n].data.len()])).collect();
    for &(_, k, i) in &all[..cut.min(all.len())] {
        if let Some(m) = masks.get_mut(&kernels[k]) {
            m[i] = false;
        }
    }
    Ok(masks)
}

/// `tensors` with masked weights zeroed, `mask.*` tensors added, and element-format tags.
fn masked(
    tensors: &BTreeMap<String, Tensor<f32>>,
    masks: &BTreeMap<String, Vec<bool>>,
    meta: &HashMap<String, String>,
) -> Checkpoint {
    let mut t = tensors.clone();
    let mut m = meta.clone();
    for (name, keep) in masks {
        if let Some(w) = t.get_mut(name) {
            w.data.iter_mut().zip(keep).for_each(|(v, &k)| *v = if k { *v } else { 0.0 });
            let mask = Tensor { shape: w.shape.clone(), data: keep.iter().map(|&k| f32::from(u8::from(k))).collect() };
            t.insert(format!("mask.{name}"), mask);
            m.insert(format!("{SPARSE_FORMAT}{name}"), "element".into());
        }
    }
    Checkpoint::from_tensors("<imp>", t, m)
}

/// Fraction of `kernels`' weights that are zero.
pub fn sparsity(tensors: &BTreeMap<String, Tensor<f32>>, kernels: &[String]) -> f64 {
    let (mut z, mut n) = (0usize, 0usize);
    for k in kernels {
        if let Some(t) = tensors.get(k) {
            z += t.data.iter().filter(|&&v| v == 0.0).count();
            n += t.data.len();
        }
    }
    z as f64 / n.max(1) as f64
}

/// Everything a run needs besides its options.
pub struct Imp<'a> {
    /// Architecture.
    pub kind: ArchKind,
    /// Training scans.
    pub train: Vec<Sample>,
    /// Scans each round is evaluated on.
    pub eval: &'a EvalSet,
    /// Engine of the evaluations.
    pub engine: &'a Engine,
}

impl Imp<'_> {
    /// Train `ck` (masks held) for `steps`; `snapshot` gets the weights after `at` steps.
    fn train(
        &self,
        ck: &Checkpoint,
        o: &ImpOptions,
        steps: usize,
        at: Option<usize>,
    ) -> Result<(Tensors, Option<Tensors>)> {
        let mut snap = None;
        if steps == 0 {
            return Ok((ck.tensors().clone(), at.map(|_| ck.tensors().clone())));
        }
        let mut t = FineTune { steps, lr: o.lr, seed: o.seed }.trainer(self.kind, ck, &self.train, o.cosine)?;
        for s in 0..steps {
            if at == Some(s) {
                snap = Some(t.params().tensors());
            }
            t.train_step()?;
        }
        if at == Some(steps) {
            snap = Some(t.params().tensors());
        }
        Ok((t.params().tensors(), snap))
    }

    fn miou(&self, ck: &Checkpoint) -> Result<f64> {
        let desc = NetDesc::from_checkpoint(self.kind, ck, NUM_CLASSES)?;
        Ok(self.eval.evaluate(self.engine, &Model::from_desc(ck, &desc)?)?.0)
    }

    /// Run (or resume) from `start` into `dir`; `log` gets a line per round.
    pub fn run(&self, start: &Checkpoint, o: &ImpOptions, dir: &Path, mut log: impl FnMut(&str)) -> Result<Vec<Round>> {
        o.validate()?;
        if self.train.is_empty() {
            return Err(Error::invalid("--data", "no training scans"));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let desc = NetDesc::for_checkpoint(self.kind, start, 0.5, NUM_CLASSES)?;
        let names = kernels(&desc);
        // A synthetic start (a fresh init) made concrete, so rewinding and saving see tensors.
        let start_tensors = TrainNet::from_desc(start, &desc)?.params.tensors();
        let meta = super::carried_metadata(start, self.kind);
        let csv = dir.join("imp.csv");
        let dense = dir.join("round_00.safetensors");
        let rewind_file = dir.join("rewind.safetensors");
        // Round 0: the dense network (trained here when asked), and the rewind point.
        let (mut cur, rewind) = match (Checkpoint::load(&dense), Checkpoint::load(&rewind_file)) {
            (Ok(d), Ok(r)) => {
                log("resuming: dense network and rewind point loaded");
                (d.tensors().clone(), r.tensors().clone())
            }
            _ => {
                let ck = Checkpoint::from_tensors("<start>", start_tensors.clone(), meta.clone());
                let (t, snap) = self.train(&ck, o, o.pretrain_steps, Some(o.rewind_step.min(o.pretrain_steps)))?;
                let r = snap.unwrap_or_else(|| start_tensors.clone());
                save(&dense, &t, meta.clone(), false)?;
                save(&rewind_file, &r, meta.clone(), false)?;
                let miou = self.miou(&Checkpoint::from_tensors("<dense>", t.clone(), meta.clone()))?;
                std::fs::write(&csv, format!("{CSV_HEADER}\n0,{:.4},{:.3}\n", sparsity(&t, &names), miou * 100.0))
                    .map_err(|e| Error::io(&csv, e))?;
                log(&format!("round 0: dense, {} training steps, mIoU {:.1}%", o.pretrain_steps, miou * 100.0));
                (t, r)
            }
        };
        let mut rows: Vec<String> = std::fs::read_to_string(&csv)
            .map_err(|e| Error::io(&csv, e))?
            .lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect();
        // Resume after the last round whose file loads.
        while rows.len() > 1 {
            match Checkpoint::load(&dir.join(format!("round_{:02}.safetensors", rows.len() - 1))) {
                Ok(ck) => {
                    cur = ck
                        .tensors()
                        .iter()
                        .filter(|(k, _)| !k.starts_with("mask."))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    log(&format!("resuming after round {}", rows.len() - 1));
                    break;
                }
                Err(_) => {
                    rows.pop();
                }
            }
        }
        let targets = o.targets();
        let mut out = Vec::new();
        for (i, &target) in targets.iter().enumerate().skip(rows.len() - 1) {
            let index = i + 1;
            let masks = global_masks(&cur, &names, target)?;
            let from = match o.restart {
                Restart::Continue => cur.clone(),
                Restart::Rewind => rewind.clone(),
                Restart::Reinit => {
                    let fresh = Checkpoint::fresh(o.seed.wrapping_add(index as u64 * 7919));
                    TrainNet::from_desc(&fresh, &desc)?.params.tensors()
                }
            };
            let ck = masked(&from, &masks, &meta);
            let (trained, _) = self.train(&ck, o, o.steps, None)?;
            let result = masked(&trained, &masks, &meta);
            let s = sparsity(result.tensors(), &names);
            let miou = self.miou(&result)?;
            save(
                &dir.join(format!("round_{index:02}.safetensors")),
                result.tensors(),
                result.metadata().clone(),
                false,
            )?;
            rows.push(format!("{index},{s:.4},{:.3}", miou * 100.0));
            let mut text = format!("{CSV_HEADER}\n");
            for r in &rows {
                let _ = writeln!(text, "{r}");
            }
            std::fs::write(&csv, text).map_err(|e| Error::io(&csv, e))?;
            log(&format!(
                "round {index}: sparsity {:.1}% (target {:.1}%), mIoU {:.1}%",
                s * 100.0,
                target * 100.0,
                miou * 100.0
            ));
            cur = trained;
            out.push(Round { index, sparsity: s, miou });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(schedule: Schedule, rounds: usize) -> ImpOptions {
        ImpOptions {
            final_sparsity: 0.8,
            schedule,
            rounds,
            restart: Restart::Continue,
            pretrain_steps: 0,
            rewind_step: 0,
            steps: 1,
            lr: 1e-3,
            cosine: false,
            seed: 1,
        }
    }

    #[test]
    fn schedules_reach_the_final_sparsity() {
        let agp = opts(Schedule::Agp, 4).targets();
        assert_eq!(agp.len(), 4);
        assert!((agp[0] - 0.8 * (1.0 - 0.75f64.powi(3))).abs() < 1e-12 && (agp[3] - 0.8).abs() < 1e-12);
        // AGP cuts most early: each step smaller than the one before.
        let steps: Vec<f64> = agp.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(agp[0] > steps[0] && steps.windows(2).all(|w| w[1] < w[0]), "{agp:?}");
        assert_eq!(opts(Schedule::Fixed, 2).targets(), vec![0.4, 0.8]);
        // 20% of what is left per round: 0.2, 0.36, ... until 80%, the last one clipped.
        let g = opts(Schedule::Geometric(0.2), 0).targets();
        assert!((g[0] - 0.2).abs() < 1e-12 && (g[1] - 0.36).abs() < 1e-12, "{g:?}");
        assert_eq!(g.len(), 8, "{g:?}");
        assert!((g[7] - 0.8).abs() < 1e-12);
    }

    #[test]
    fn global_masks_cut_the_smallest_weights_over_all_layers() {
        let mut t = BTreeMap::new();
        t.insert("a".to_string(), Tensor { shape: vec![4], data: vec![0.1, -5.0, 0.0, 2.0] });
        t.insert("b".to_string(), Tensor { shape: vec![2], data: vec![-0.3, 0.2] });
        let names = vec!["a".to_string(), "b".to_string()];
        let m = global_masks(&t, &names, 0.5).expect("masks");
        assert_eq!(m["a"], vec![false, true, false, true]);
        assert_eq!(m["b"], vec![true, false]);
        let ck = masked(&t, &m, &HashMap::new());
        assert_eq!(ck.get("a").expect("a").data, vec![0.0, -5.0, 0.0, 2.0]);
        assert_eq!(ck.get("mask.b").expect("mask").data, vec![1.0, 0.0]);
        assert!((sparsity(ck.tensors(), &names) - 0.5).abs() < 1e-12);
        assert!(global_masks(&t, &["c".to_string()], 0.5).is_err());
    }
}
