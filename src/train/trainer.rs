//! The training loop: labelled scans, augmentation, forward/backward, optimizer and schedule,
//! periodic mIoU evaluation, and checkpoints that `segment --model` loads directly. Every
//! random choice is a function of (seed, step), so a resumed run continues bit for bit.
//! Pruning hooks: per-tensor masks held at zero, a rewind point, L1/L2 penalties.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use yaml_rust2::{Yaml, YamlLoader};

use super::data::{augment, load_npy, load_semantickitti, semantickitti_pairs, Augment, Rng, Sample};
use super::net::{Params, Role, TrainNet};
use super::ops::cross_entropy;
use super::optim::{learning_rate, step, ParamState, Rule, Schedule};
use crate::device::{Device, Engine};
use crate::error::{Error, Result};
use crate::io::kitti::{LearningMap, NUM_CLASSES};
use crate::io::tensors::Tensor;
use crate::kmap::MapBuilder;
use crate::metrics::Confusion;
use crate::nn::checkpoint::{save, Checkpoint, KEPT_OFFSETS, SPARSE_FORMAT};
use crate::pipeline::{prepare_points, segment, Model, Timings, VoxelizeMode, VOXEL_SIZE};
use crate::plan::Grouping;
use crate::voxel::{voxelize_batch, PointCloud};

/// A penalty on the tensors whose names match a pattern.
#[derive(Debug, Clone, PartialEq)]
pub struct Penalty {
    /// `*` wildcards over tensor names, or `@bn` for every BatchNorm scale γ.
    pub pattern: String,
    /// Coefficient λ (loss += λ·Σ|w| for L1, λ/2·Σw² for L2).
    pub lambda: f64,
}

impl Penalty {
    fn matches(&self, name: &str, role: Role) -> bool {
        if self.pattern == "@bn" {
            return role == Role::BnScale;
        }
        glob(&self.pattern, name)
    }
}

fn glob(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, rest)) => {
            name.starts_with(head) && (0..=name.len() - head.len()).any(|i| glob(rest, &name[head.len() + i..]))
        }
    }
}

/// Everything a training run needs; read from a YAML file (keys as the field names).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Architecture (`minkunet`).
    pub arch: String,
    /// Width factor.
    pub cr: f32,
    /// Training data: SemanticKITTI roots (`sequences/*/velodyne`, `labels`, and
    /// `semantic-kitti.yaml` in the root) and/or Open3D-ML `points_*.npy` files.
    pub data: Vec<PathBuf>,
    /// Evaluation data (same forms); the training data when empty.
    pub eval: Vec<PathBuf>,
    /// Passes over the training scans.
    pub epochs: usize,
    /// Scans per step.
    pub batch: usize,
    /// `sgd` or `adamw`.
    pub optimizer: String,
    /// Base learning rate.
    pub lr: f64,
    /// SGD momentum (Nesterov) / Adam β1.
    pub momentum: f64,
    /// Weight decay (L2 for SGD, decoupled for AdamW).
    pub weight_decay: f64,
    /// Linear warm-up steps.
    pub warmup: usize,
    /// `cosine`, `step` or `constant`.
    pub schedule: String,
    /// Final learning rate of the cosine schedule as a fraction of `lr`.
    pub min_lr: f64,
    /// Seed of initialization, order and augmentation.
    pub seed: u64,
    /// Random rotation, scaling, flips and jitter.
    pub augment: bool,
    /// Evaluate every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Save every this many steps (0: only at the end).
    pub save_every: usize,
    /// Keep the weights after this many steps as the rewind point (lottery tickets).
    pub rewind_at: Option<usize>,
    /// L1 penalties.
    pub l1: Vec<Penalty>,
    /// L2 penalties.
    pub l2: Vec<Penalty>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            arch: "minkunet".into(),
            cr: 0.5,
            data: Vec::new(),
            eval: Vec::new(),
            epochs: 100,
            batch: 1,
            optimizer: "adamw".into(),
            lr: 2e-3,
            momentum: 0.9,
            weight_decay: 1e-4,
            warmup: 20,
            schedule: "cosine".into(),
            min_lr: 0.02,
            seed: 1,
            augment: true,
            eval_every: 0,
            save_every: 0,
            rewind_at: None,
            l1: Vec::new(),
            l2: Vec::new(),
        }
    }
}

impl TrainConfig {
    /// Parse a YAML config; unknown keys are errors (a typo must not silently use a default).
    /// Relative data paths are relative to the config file.
    pub fn from_yaml(text: &str, origin: &Path) -> Result<Self> {
        let bad = |m: String| Error::format(origin, m);
        let docs = YamlLoader::load_from_str(text).map_err(|e| bad(format!("invalid YAML: {e}")))?;
        let mut c = Self::default();
        let Some(doc) = docs.first() else { return Ok(c) };
        let Some(map) = doc.as_hash() else { return Err(bad("expected a mapping of settings".into())) };
        let base = origin.parent().unwrap_or(Path::new("."));
        let num = |k: &str, v: &Yaml| -> Result<f64> {
            v.as_f64().or_else(|| v.as_i64().map(|i| i as f64)).ok_or_else(|| bad(format!("`{k}` must be a number")))
        };
        let int = |k: &str, v: &Yaml| -> Result<usize> {
            v.as_i64()
                .filter(|&i| i >= 0)
                .map(|i| i as usize)
                .ok_or_else(|| bad(format!("`{k}` must be a whole number")))
        };
        let string = |k: &str, v: &Yaml| -> Result<String> {
            v.as_str().map(str::to_string).ok_or_else(|| bad(format!("`{k}` must be a string")))
        };
        let paths = |k: &str, v: &Yaml| -> Result<Vec<PathBuf>> {
            let items = match v {
                Yaml::Array(a) => a.iter().collect(),
                other => vec![other],
            };
            items
                .into_iter()
                .map(|p| p.as_str().map(|s| base.join(s)).ok_or_else(|| bad(format!("`{k}` must list paths"))))
                .collect()
        };
        let penalties = |k: &str, v: &Yaml| -> Result<Vec<Penalty>> {
            let h = v.as_hash().ok_or_else(|| bad(format!("`{k}` must map tensor patterns to coefficients")))?;
            h.iter()
                .map(|(p, l)| {
                    Ok(Penalty {
                        pattern: p.as_str().ok_or_else(|| bad(format!("`{k}` keys must be strings")))?.to_string(),
                        lambda: num(k, l)?,
                    })
                })
                .collect()
        };
        for (k, v) in map {
            let k = k.as_str().ok_or_else(|| bad("setting names must be strings".into()))?;
            match k {
                "arch" => c.arch = string(k, v)?,
                "cr" => c.cr = num(k, v)? as f32,
                "data" => c.data = paths(k, v)?,
                "eval" => c.eval = paths(k, v)?,
                "epochs" => c.epochs = int(k, v)?,
                "batch" => c.batch = int(k, v)?,
                "optimizer" => c.optimizer = string(k, v)?,
                "lr" => c.lr = num(k, v)?,
                "momentum" => c.momentum = num(k, v)?,
                "weight_decay" => c.weight_decay = num(k, v)?,
                "warmup" => c.warmup = int(k, v)?,
                "schedule" => c.schedule = string(k, v)?,
                "min_lr" => c.min_lr = num(k, v)?,
                "seed" => c.seed = int(k, v)? as u64,
                "augment" => c.augment = v.as_bool().ok_or_else(|| bad("`augment` must be true or false".into()))?,
                "eval_every" => c.eval_every = int(k, v)?,
                "save_every" => c.save_every = int(k, v)?,
                "rewind_at" => c.rewind_at = Some(int(k, v)?),
                "l1" => c.l1 = penalties(k, v)?,
                "l2" => c.l2 = penalties(k, v)?,
                other => return Err(bad(format!("unknown setting `{other}`"))),
            }
        }
        c.validate().map_err(|e| e.in_file(origin))?;
        Ok(c)
    }

    /// Read and parse a YAML config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_yaml(&text, path)
    }

    /// Reject settings no run can use.
    pub fn validate(&self) -> Result<()> {
        let bad = |k: &'static str, m: &str| Err(Error::invalid(k, m.to_string()));
        if self.arch != "minkunet" && self.arch != "spvcnn" {
            return bad("arch", "expected `minkunet` or `spvcnn`");
        }
        crate::nn::arch::channels(self.cr)?;
        if self.data.is_empty() {
            return bad("data", "no training data given");
        }
        if self.epochs == 0 || self.batch == 0 {
            return bad("epochs/batch", "must be at least 1");
        }
        if self.batch > 16 {
            return bad("batch", "at most 16 scans per step");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", "must be positive");
        }
        if !matches!(self.optimizer.as_str(), "sgd" | "adamw") {
            return bad("optimizer", "expected `sgd` or `adamw`");
        }
        if !matches!(self.schedule.as_str(), "cosine" | "step" | "constant") {
            return bad("schedule", "expected `cosine`, `step` or `constant`");
        }
        if !(0.0..1.0).contains(&self.momentum) || self.weight_decay < 0.0 || !(0.0..=1.0).contains(&self.min_lr) {
            return bad("momentum/weight_decay/min_lr", "out of range");
        }
        Ok(())
    }

    /// The config as YAML (stored in checkpoints, so `--resume` needs nothing else).
    pub fn to_yaml(&self) -> String {
        let list =
            |v: &[PathBuf]| v.iter().map(|p| format!("{:?}", p.display().to_string())).collect::<Vec<_>>().join(", ");
        let pen =
            |v: &[Penalty]| v.iter().map(|p| format!("{:?}: {:e}", p.pattern, p.lambda)).collect::<Vec<_>>().join(", ");
        let mut s = format!(
            "arch: {}\ncr: {}\ndata: [{}]\neval: [{}]\nepochs: {}\nbatch: {}\noptimizer: {}\nlr: {:e}\nmomentum: {}\n\
             weight_decay: {:e}\nwarmup: {}\nschedule: {}\nmin_lr: {}\nseed: {}\naugment: {}\neval_every: {}\n\
             save_every: {}\nl1: {{{}}}\nl2: {{{}}}\n",
            self.arch,
            self.cr,
            list(&self.data),
            list(&self.eval),
            self.epochs,
            self.batch,
            self.optimizer,
            self.lr,
            self.momentum,
            self.weight_decay,
            self.warmup,
            self.schedule,
            self.min_lr,
            self.seed,
            self.augment,
            self.eval_every,
            self.save_every,
            pen(&self.l1),
            pen(&self.l2),
        );
        if let Some(r) = self.rewind_at {
            s.push_str(&format!("rewind_at: {r}\n"));
        }
        s
    }

    fn rule(&self) -> Rule {
        match self.optimizer.as_str() {
            "sgd" => Rule::Sgd { momentum: self.momentum, nesterov: true },
            _ => Rule::AdamW { beta1: self.momentum, beta2: 0.999, eps: 1e-8 },
        }
    }

    fn schedule(&self, total: usize) -> Schedule {
        match self.schedule.as_str() {
            "cosine" => Schedule::Cosine { total, min_factor: self.min_lr },
            "step" => Schedule::Step { every: (total / 3).max(1), gamma: 0.1 },
            _ => Schedule::Constant,
        }
    }
}

/// Load the labelled scans behind `paths` (SemanticKITTI roots or Open3D-ML `points_*.npy`).
pub fn load_samples(paths: &[PathBuf]) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let yaml = p.join("semantic-kitti.yaml");
            if !yaml.exists() {
                return Err(Error::format(
                    p,
                    "a SemanticKITTI root needs its semantic-kitti.yaml (for the learning map)",
                ));
            }
            let lm = LearningMap::load(&yaml)?;
            for (scan, labels) in semantickitti_pairs(p)? {
                out.push(load_semantickitti(&scan, &labels, &lm)?);
            }
        } else {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let Some(rest) = name.strip_prefix("points_").filter(|_| name.ends_with(".npy")) else {
                return Err(Error::format(p, "expected a SemanticKITTI root folder or an Open3D-ML points_*.npy file"));
            };
            out.push(load_npy(p, &p.with_file_name(format!("labels_{rest}")))?);
        }
    }
    Ok(out)
}

/// Voxel labels by majority over the voxel's points (ties to the lower id).
pub fn voxel_labels(inverse: &[u32], labels: &[u32], voxels: usize) -> Vec<u32> {
    let k = NUM_CLASSES + 1;
    let mut hist = vec![0u32; voxels * k];
    for (&v, &l) in inverse.iter().zip(labels) {
        hist[v as usize * k + (l as usize).min(NUM_CLASSES)] += 1;
    }
    hist.chunks_exact(k).map(|h| (0..k).fold(0, |best, j| if h[j] > h[best] { j } else { best }) as u32).collect()
}

/// What one step did.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// Steps done (1-based).
    pub step: usize,
    /// Total steps of the run.
    pub total: usize,
    /// Cross-entropy of this step (penalties excluded).
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Voxels in the batch.
    pub voxels: usize,
    /// Wall-clock seconds: data (augment + voxelize), forward, backward, optimizer.
    pub seconds: [f64; 4],
    /// mIoU on the evaluation scans, when evaluated after this step.
    pub miou: Option<f64>,
}

/// A training run in progress.
pub struct Trainer {
    /// The configuration.
    pub config: TrainConfig,
    /// The network being trained.
    pub net: TrainNet,
    states: Vec<ParamState>,
    rewind: Option<Vec<Vec<f32>>>,
    /// Steps done.
    pub step: usize,
    train: Vec<Sample>,
    eval: Vec<Sample>,
    engine: Engine,
    /// Voxel pruning trained with and evaluated with (see [`Trainer::set_voxel_plan`]).
    voxel: Option<crate::voxel_prune::VoxelPlan>,
}

const MASK: &str = "mask.";
const REWIND: &str = "rewind.";
const MOMENT1: &str = "optim.m.";
const MOMENT2: &str = "optim.v.";

impl Trainer {
    /// A new run from fresh weights, or from `init` (weights and any `mask.*` tensors).
    pub fn new(config: TrainConfig, init: Option<&Path>) -> Result<Self> {
        config.validate()?;
        let ck = match init {
            Some(p) => Checkpoint::load(p)?,
            None => Checkpoint::fresh(config.seed),
        };
        let net = TrainNet::load_arch(&config.arch, &ck, config.cr, NUM_CLASSES).map_err(|e| e.in_file(ck.path()))?;
        let mut t = Self::with_net(config, net)?;
        t.read_state(&ck, false)?;
        Ok(t)
    }

    /// Continue the run saved in `checkpoint` (its stored config unless `config` is given).
    pub fn resume(checkpoint: &Path, config: Option<TrainConfig>) -> Result<Self> {
        let ck = Checkpoint::load(checkpoint)?;
        let meta = ck.metadata();
        let stored = meta
            .get("train_config")
            .ok_or_else(|| Error::format(checkpoint, "not a training checkpoint (no `train_config` metadata)"))?;
        let config = match config {
            Some(c) => c,
            None => TrainConfig::from_yaml(stored, checkpoint)?,
        };
        let net = TrainNet::load_arch(&config.arch, &ck, config.cr, NUM_CLASSES)?;
        let mut t = Self::with_net(config, net)?;
        t.step = meta
            .get("step")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::format(checkpoint, "metadata `step` missing or not a number"))?;
        t.read_state(&ck, true)?;
        Ok(t)
    }

    /// A new run from fresh weights on scans already in memory (`config.data` is not read).
    pub fn from_samples(config: TrainConfig, train: Vec<Sample>, eval: Vec<Sample>) -> Result<Self> {
        if train.is_empty() {
            return Err(Error::invalid("training", "no training scans"));
        }
        let net = TrainNet::load_arch(&config.arch, &Checkpoint::fresh(config.seed), config.cr, NUM_CLASSES)?;
        Self::assemble(config, net, train, eval)
    }

    /// A run that starts from the weights (and any `mask.*` tensors) of `ck`, on scans
    /// already in memory: fine-tuning a pruned network (`config.data` is not read).
    pub fn from_checkpoint(
        config: TrainConfig,
        ck: &Checkpoint,
        train: Vec<Sample>,
        eval: Vec<Sample>,
    ) -> Result<Self> {
        if train.is_empty() {
            return Err(Error::invalid("training", "no training scans"));
        }
        let net = TrainNet::load_arch(&config.arch, ck, config.cr, NUM_CLASSES).map_err(|e| e.in_file(ck.path()))?;
        let mut t = Self::assemble(config, net, train, eval)?;
        t.read_state(ck, false)?;
        Ok(t)
    }

    fn with_net(config: TrainConfig, net: TrainNet) -> Result<Self> {
        let train = load_samples(&config.data)?;
        let eval = if config.eval.is_empty() { train.clone() } else { load_samples(&config.eval)? };
        Self::assemble(config, net, train, eval)
    }

    fn assemble(config: TrainConfig, net: TrainNet, train: Vec<Sample>, eval: Vec<Sample>) -> Result<Self> {
        let states = (0..net.params.len()).map(|i| ParamState::new(net.params.values[i].len())).collect();
        Ok(Self {
            config,
            net,
            states,
            rewind: None,
            step: 0,
            train,
            eval,
            engine: Engine::new(Device::Cpu, MapBuilder::Sort, Grouping::Heuristic),
            voxel: None,
        })
    }

    fn read_state(&mut self, ck: &Checkpoint, optimizer: bool) -> Result<()> {
        let p = &mut self.net.params;
        let mut rewind = Vec::new();
        for i in 0..p.len() {
            let name = p.name(i).to_string();
            let n = p.values[i].len();
            let get = |prefix: &str| -> Result<Option<Vec<f32>>> {
                match ck.get(&format!("{prefix}{name}")) {
                    Some(t) if t.data.len() == n => Ok(Some(t.data.clone())),
                    Some(t) => Err(Error::format(
                        ck.path(),
                        format!("`{prefix}{name}` has {} values, the tensor has {n}", t.data.len()),
                    )),
                    None => Ok(None),
                }
            };
            // A sparse-format or offset-pruned kernel keeps its zeros as a mask: fine-tuning
            // must not grow back what the pruned network skips.
            let structural = p.role(i) == Role::Kernel
                && [SPARSE_FORMAT, KEPT_OFFSETS].iter().any(|k| ck.metadata().contains_key(&format!("{k}{name}")));
            let mask = match get(MASK)? {
                Some(m) => Some(m),
                None if structural => Some(p.values[i].clone()),
                None => None,
            };
            if let Some(m) = mask {
                let mask: Vec<u8> = m.iter().map(|&v| u8::from(v != 0.0)).collect();
                for (w, &k) in p.values[i].iter_mut().zip(&mask) {
                    if k == 0 {
                        *w = 0.0;
                    }
                }
                self.states[i].mask = Some(mask);
            }
            if optimizer {
                if let (Some(m), Some(v)) = (get(MOMENT1)?, get(MOMENT2)?) {
                    self.states[i].set_moments(m, v);
                }
            }
            rewind.push(get(REWIND)?);
        }
        if rewind.iter().all(Option::is_some) && !rewind.is_empty() {
            self.rewind = Some(rewind.into_iter().map(|r| r.unwrap_or_default()).collect());
        }
        Ok(())
    }

    /// Steps per epoch and in the whole run.
    pub fn steps(&self) -> (usize, usize) {
        let per = self.train.len().div_ceil(self.config.batch);
        (per, per * self.config.epochs)
    }

    /// Number of training scans.
    pub fn train_scans(&self) -> usize {
        self.train.len()
    }

    /// Training scans of step `s` (0-based): a seeded shuffle per epoch.
    fn batch_of(&self, s: usize) -> Vec<usize> {
        let (per, _) = self.steps();
        let (epoch, k) = (s / per, s % per);
        let mut order: Vec<usize> = (0..self.train.len()).collect();
        let mut rng = Rng::new(self.config.seed ^ (epoch as u64).wrapping_mul(0xA24B_AED4_963E_E407));
        for i in (1..order.len()).rev() {
            order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        order.into_iter().skip(k * self.config.batch).take(self.config.batch).collect()
    }

    /// One optimizer step.
    pub fn train_step(&mut self) -> Result<StepReport> {
        let (_, total) = self.steps();
        let s = self.step;
        let t0 = Instant::now();
        let mut rng = Rng::new(self.config.seed.wrapping_add(1) ^ (s as u64).wrapping_mul(0x9FB2_1C65_1E98_DF25));
        let aug = Augment::default();
        let picked: Vec<Sample> = self
            .batch_of(s)
            .into_iter()
            .map(|i| if self.config.augment { augment(&self.train[i], &aug, &mut rng) } else { self.train[i].clone() })
            .collect();
        let clouds: Vec<PointCloud> = picked.iter().map(|p| p.points.clone()).collect();
        let vox = voxelize_batch(&clouds, VOXEL_SIZE)?;
        let labels: Vec<u32> = picked.iter().flat_map(|p| p.labels.iter().copied()).collect();
        let vlabels = voxel_labels(&vox.inverse, &labels, vox.tensor.len());
        let voxels = vox.tensor.len();
        let t1 = Instant::now();
        self.engine.clear_cache();
        let (logits, tape) = self.net.forward(&self.engine, vox.tensor)?;
        let (loss, dlogits) = cross_entropy(&logits, NUM_CLASSES, &vlabels, None)?;
        if !loss.is_finite() {
            return Err(Error::invalid("training", format!("loss became {loss} at step {}", s + 1)));
        }
        let t2 = Instant::now();
        let mut grads = self.net.backward(&self.engine, &tape, &dlogits)?;
        drop(tape);
        let t3 = Instant::now();
        self.add_penalties(&mut grads);
        let lr = learning_rate(self.config.lr, s, self.config.warmup, self.config.schedule(total));
        let rule = self.config.rule();
        let p = &mut self.net.params;
        for (i, g) in grads.iter().enumerate() {
            if p.trainable(i) {
                step(rule, &mut p.values[i], g, &mut self.states[i], lr, self.config.weight_decay, s + 1)?;
            }
        }
        self.step += 1;
        if self.config.rewind_at == Some(self.step) {
            self.rewind = Some(self.net.params.values.clone());
        }
        let t4 = Instant::now();
        let secs = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64();
        Ok(StepReport {
            step: self.step,
            total,
            loss,
            lr,
            voxels,
            seconds: [secs(t0, t1), secs(t1, t2), secs(t2, t3), secs(t3, t4)],
            miou: None,
        })
    }

    fn add_penalties(&self, grads: &mut [Vec<f32>]) {
        let p = &self.net.params;
        for i in 0..p.len() {
            if !p.trainable(i) {
                continue;
            }
            let (name, role) = (p.name(i), p.role(i));
            for pen in self.config.l1.iter().filter(|q| q.matches(name, role)) {
                for (g, &w) in grads[i].iter_mut().zip(&p.values[i]) {
                    *g += (pen.lambda * w.signum() as f64 * f64::from(u8::from(w != 0.0))) as f32;
                }
            }
            for pen in self.config.l2.iter().filter(|q| q.matches(name, role)) {
                for (g, &w) in grads[i].iter_mut().zip(&p.values[i]) {
                    *g += (pen.lambda * w as f64) as f32;
                }
            }
        }
    }

    /// Fine-tune with voxel pruning on (the same plan in training and evaluation), so the
    /// network adapts to the voxels it no longer computes.
    pub fn set_voxel_plan(&mut self, plan: &crate::voxel_prune::VoxelPlan) -> Result<()> {
        self.model()?.set_voxel_plan(plan)?;
        self.net.set_voxel_plan(plan)?;
        self.voxel = Some(plan.clone());
        Ok(())
    }

    /// The inference model (BatchNorm folded) with the current weights.
    pub fn model(&self) -> Result<Model> {
        let ck = Checkpoint::from_tensors("<model being trained>", self.net.params.tensors(), self.metadata());
        let mut m = Model::from_checkpoint(&ck, Some(&self.config.arch), Some(self.config.cr))?.0;
        if let Some(plan) = &self.voxel {
            m.set_voxel_plan(plan)?;
        }
        Ok(m)
    }

    /// mIoU (and the confusion matrix) of the current weights on the evaluation scans.
    pub fn evaluate(&self) -> Result<(Option<f64>, Confusion)> {
        let model = self.model()?;
        let e = Engine::new(Device::Cpu, MapBuilder::Sort, Grouping::Heuristic);
        let mut conf = Confusion::new();
        for s in &self.eval {
            let prep = prepare_points(&s.points, VoxelizeMode::Mean)?;
            let seg = segment(&e, &model, &prep, &mut Timings::default())?;
            conf.add(&Confusion::from_labels(&seg.point_labels, &s.labels)?);
        }
        Ok((conf.miou(), conf))
    }

    /// Metadata of checkpoints and exported models.
    pub fn metadata(&self) -> HashMap<String, String> {
        let (_, total) = self.steps();
        let mut m = HashMap::from([
            ("arch".into(), self.config.arch.clone()),
            ("cr".into(), self.config.cr.to_string()),
            ("classes".into(), NUM_CLASSES.to_string()),
            ("voxel_size".into(), VOXEL_SIZE.to_string()),
            ("trained".into(), "true".into()),
            ("step".into(), self.step.to_string()),
            ("total_steps".into(), total.to_string()),
            ("train_config".into(), self.config.to_yaml()),
        ]);
        // A network of other widths than the uniform one (a pruned network) says so; its
        // widths themselves are the tensors' shapes.
        if self.net.desc.uniform_cr().is_none() {
            m.insert("widths".into(), self.net.desc.widths_summary());
        }
        m
    }

    /// Save weights, optimizer state, masks and the rewind point (f32) so the run can resume.
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let p = &self.net.params;
        let mut tensors = p.tensors();
        for (i, st) in self.states.iter().enumerate() {
            if !p.trainable(i) {
                continue;
            }
            let shape = p.shape(i).to_vec();
            let (m, v) = st.moments();
            let mut put = |prefix: &str, data: Vec<f32>| {
                tensors.insert(format!("{prefix}{}", p.name(i)), Tensor { shape: shape.clone(), data });
            };
            put(MOMENT1, m.to_vec());
            put(MOMENT2, v.to_vec());
            if let Some(mask) = &st.mask {
                put(MASK, mask.iter().map(|&k| k as f32).collect());
            }
        }
        if let Some(r) = &self.rewind {
            for (i, data) in r.iter().enumerate() {
                tensors.insert(
                    format!("{REWIND}{}", p.name(i)),
                    Tensor { shape: p.shape(i).to_vec(), data: data.clone() },
                );
            }
        }
        save(path, &tensors, self.metadata(), false)
    }

    /// Save only the inference weights (no training state), in f16 when `half`.
    pub fn export(&self, path: &Path, half: bool) -> Result<()> {
        save(path, &self.net.params.tensors(), self.metadata(), half)
    }

    /// Parameters of the network.
    pub fn params(&self) -> &Params {
        &self.net.params
    }
}
