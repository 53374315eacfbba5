//! AMC (He et al., "AMC: AutoML for Model Compression and Acceleration on Mobile Devices",
//! ECCV 2018): a DDPG agent ([`super::ddpg`]) walks the prunable channel groups in network order
//! and picks each one's keep ratio; the network pruned to those widths (channels by L1) is
//! evaluated on labelled scans without fine-tuning (error = 1 − mIoU), and the episode's reward
//! is `−error` or `−error · ln(cost)` ([`Reward`]), cost being conv FLOPs on the scan or the
//! latency a [`LatencyTable`] measured on the target predicts.
//!
//! - **State** (AMC's 11 features, each scaled to [0, 1]): step index, layer type (1 where
//!   residual adds tie several producers), Cin and Cout of the group's first producer conv, its
//!   map stride and kernel size, producer parameters, FLOPs of every conv that reads or writes
//!   the group, FLOPs removed so far, FLOPs of the groups still to come, previous action.
//! - **Action wall**: a step's keep ratio is lowered until the budget can still be met with
//!   every later group at the lower bound, so every episode's network meets the budget.
//! - **Evaluation**: a network pruned without fine-tuning keeps BatchNorm statistics its lost
//!   channels shaped, and its mIoU collapses almost whatever is pruned (5–12% on MinkUNet
//!   cr = 0.5 against 48% unpruned), too flat a signal to learn from; with calibration scans
//!   each episode's network first gets adaptive BatchNorm (EagleEye, Li et al. ECCV 2020).
//! - **Exploration**: uniform random actions for the warm-up episodes, then the actor's action
//!   plus truncated normal noise of width σ, σ multiplied by `sigma_decay` after each episode.
//!
//! Sized to 2 cores by the options, not by changing the algorithm: episodes (AMC ran 100
//! warm-up + 300), evaluation scans, and the width grid (`round_to`).

use std::fmt::Write as _;

use super::channel::{self, ChannelOptions, Selection};
use super::ddpg::{Ddpg, DdpgOptions, Transition};
use super::finetune::adaptive_bn;
use super::groups::{self, Group};
use super::importance::{self, Criterion};
use super::latency::LatencyTable;
use super::sensitivity::EvalSet;
use crate::bench::conv_flops;
use crate::device::Engine;
use crate::error::{Error, Result};
use crate::io::kitti::NUM_CLASSES;
use crate::nn::arch::{ArchKind, NetDesc};
use crate::nn::checkpoint::Checkpoint;
use crate::pipeline::Model;
use crate::train::data::Sample;

/// What the budget counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// Conv FLOPs on the evaluation scan.
    Flops,
    /// End-to-end latency predicted by the latency table.
    Latency,
}

impl std::str::FromStr for Budget {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "flops" => Ok(Budget::Flops),
            "latency" => Ok(Budget::Latency),
            _ => Err(Error::invalid("--budget", format!("expected flops or latency, got `{s}`"))),
        }
    }
}

/// What an episode scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reward {
    /// `−error`: AMC's reward for resource-constrained search, where the action wall already
    /// holds every episode to the budget.
    Error,
    /// `−error · ln(cost)` (cost in FLOPs or microseconds): AMC's reward for
    /// accuracy-guaranteed compression; under a wall it also pays for going below the budget.
    ErrorLogCost,
}

impl std::str::FromStr for Reward {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "error" => Ok(Reward::Error),
            "error-log-cost" => Ok(Reward::ErrorLogCost),
            _ => Err(Error::invalid("--reward", format!("expected error or error-log-cost, got `{s}`"))),
        }
    }
}

/// Knobs of a search.
#[derive(Debug, Clone)]
pub struct AmcOptions {
    /// What the budget counts.
    pub budget: Budget,
    /// Fraction of the unpruned cost the pruned network may keep, in (0, 1).
    pub target: f64,
    /// What an episode scores.
    pub reward: Reward,
    /// Smallest keep ratio an action may take (AMC: 0.2).
    pub lbound: f64,
    /// Largest keep ratio (1: a group may stay whole).
    pub rbound: f64,
    /// Widths are multiples of this.
    pub round_to: usize,
    /// No group narrower than this.
    pub min_width: usize,
    /// Episodes of random actions before the agent learns.
    pub warmup: usize,
    /// Episodes after the warm-up.
    pub episodes: usize,
    /// Initial exploration noise.
    pub sigma: f64,
    /// σ is multiplied by this after each episode past the warm-up.
    pub sigma_decay: f64,
    /// The agent.
    pub ddpg: DdpgOptions,
    /// Seed of the agent and its exploration.
    pub seed: u64,
}

impl AmcOptions {
    /// AMC's settings for a budget, with the episode counts given.
    pub fn new(budget: Budget, target: f64, warmup: usize, episodes: usize) -> Self {
        Self {
            budget,
            target,
            reward: Reward::Error,
            lbound: 0.2,
            rbound: 1.0,
            round_to: 8,
            min_width: 8,
            warmup,
            episodes,
            sigma: 0.5,
            sigma_decay: 0.95,
            ddpg: DdpgOptions::default(),
            seed: 1,
        }
    }

    /// Reject settings no search can use.
    pub fn validate(&self) -> Result<()> {
        if !(self.target > 0.0 && self.target < 1.0) {
            return Err(Error::invalid(
                "--target",
                format!("the kept fraction must be in (0, 1), got {}", self.target),
            ));
        }
        if !(self.lbound > 0.0 && self.lbound <= self.rbound && self.rbound <= 1.0) {
            return Err(Error::invalid("--lbound", "need 0 < lbound <= rbound <= 1"));
        }
        if self.round_to == 0 || self.min_width == 0 {
            return Err(Error::invalid("--round-to/--min-width", "must be at least 1"));
        }
        if self.warmup + self.episodes == 0 {
            return Err(Error::invalid("--episodes", "at least one episode is needed"));
        }
        if !(self.sigma >= 0.0 && self.sigma_decay > 0.0 && self.sigma_decay <= 1.0) {
            return Err(Error::invalid("--sigma", "σ must be non-negative and its decay in (0, 1]"));
        }
        Ok(())
    }
}

/// One episode's outcome.
#[derive(Debug, Clone)]
pub struct Episode {
    /// 0-based; episodes below the warm-up count act at random.
    pub index: usize,
    /// Exploration σ (0 during the warm-up, whose actions are uniform).
    pub sigma: f64,
    /// Kept channels per group ([`groups::groups`] order).
    pub widths: Vec<usize>,
    /// Cost kept, as a fraction of the unpruned cost.
    pub cost_ratio: f64,
    /// Conv FLOPs kept, as a fraction (equal to `cost_ratio` for a FLOPs budget).
    pub flops_ratio: f64,
    /// mIoU without fine-tuning.
    pub miou: f64,
    /// The episode's [`Reward`].
    pub reward: f64,
}

/// CSV header of [`Episode::csv`].
pub const CSV_HEADER: &str = "episode,sigma,cost_ratio,flops_ratio,miou,reward,widths";

impl Episode {
    /// One CSV row.
    pub fn csv(&self) -> String {
        let w: Vec<String> = self.widths.iter().map(usize::to_string).collect();
        format!(
            "{},{:.4},{:.4},{:.4},{:.3},{:.5},{}",
            self.index,
            self.sigma,
            self.cost_ratio,
            self.flops_ratio,
            self.miou * 100.0,
            self.reward,
            w.join(" ")
        )
    }
}

/// The pruning environment: a network, its groups, how each width choice is priced, and the
/// scans pruned networks are evaluated on.
pub struct Env<'a> {
    kind: ArchKind,
    ck: &'a Checkpoint,
    desc: NetDesc,
    /// The dependency groups.
    pub groups: Vec<Group>,
    scores: Vec<Vec<f64>>,
    links: Vec<(Vec<usize>, Vec<usize>)>,
    pairs: Vec<usize>,
    table: Option<&'a LatencyTable>,
    eval: &'a EvalSet,
    engine: &'a Engine,
    calibration: Vec<Sample>,
    /// Prunable groups, in the order the agent visits them.
    pub steps: Vec<usize>,
    static_features: Vec<[f64; 8]>,
    /// Conv FLOPs touching each step's group, unpruned.
    step_flops: Vec<f64>,
    base_flops: f64,
    base_cost: f64,
}

/// State features per step.
pub const STATE_DIM: usize = 11;

impl<'a> Env<'a> {
    /// The environment of `ck` (channels ranked by L1 once), priced on the first evaluation
    /// scan's kernel maps (FLOPs) or by `table` (latency).
    pub fn new(
        kind: ArchKind,
        ck: &'a Checkpoint,
        budget: Budget,
        table: Option<&'a LatencyTable>,
        eval: &'a EvalSet,
        engine: &'a Engine,
    ) -> Result<Self> {
        let desc = NetDesc::from_checkpoint(kind, ck, NUM_CLASSES)?;
        let groups = groups::groups(&desc)?;
        let scores = importance::scores(&groups, ck.tensors(), Criterion::L1, None, 0)?;
        let links = groups::conv_links(&desc, &groups);
        let table = match (budget, table) {
            (Budget::Latency, None) => return Err(Error::invalid("--table", "a latency budget needs a latency table")),
            (Budget::Latency, Some(t)) => {
                t.check_target(engine)?;
                Some(t)
            }
            (Budget::Flops, t) => t,
        };
        // Pairs per conv on the first evaluation scan, from one traced forward pass.
        let model = Model::from_desc(ck, &desc)?;
        engine.start_trace();
        model.forward(engine, &eval.scans[0].voxels)?;
        let trace = engine.take_trace();
        let convs = desc.convs();
        if trace.len() != convs.len() {
            return Err(Error::invalid(
                "amc",
                format!("traced {} convs, the network has {}", trace.len(), convs.len()),
            ));
        }
        let pairs: Vec<usize> = trace.iter().map(|t| t.pairs).collect();
        let widths: Vec<usize> = groups.iter().map(|g| g.width).collect();
        let flops: Vec<f64> =
            groups::conv_shapes(&links, &widths).iter().zip(&pairs).map(|(&(i, o), &p)| conv_flops(p, i, o)).collect();
        let steps: Vec<usize> = groups.iter().filter(|g| g.prunable).map(|g| g.id).collect();
        let maps = desc.conv_maps();
        let mut static_features = Vec::new();
        let mut step_flops = Vec::new();
        for &g in &steps {
            let producers: Vec<usize> = (0..convs.len()).filter(|&c| links[c].1.contains(&g)).collect();
            let first = producers
                .first()
                .copied()
                .ok_or_else(|| Error::invalid("amc", format!("group `{}` has no producing conv", groups[g].name())))?;
            let c = convs[first];
            let params: usize = producers.iter().map(|&p| convs[p].kernel_shape().iter().product::<usize>()).sum();
            let touch: f64 = (0..convs.len())
                .filter(|&c| links[c].0.contains(&g) || links[c].1.contains(&g))
                .map(|c| flops[c])
                .sum();
            static_features.push([
                if producers.len() > 1 { 1.0 } else { 0.0 },
                c.cin as f64,
                c.cout as f64,
                maps[first].0 as f64,
                c.spec.size as f64,
                params as f64,
                touch,
                0.0,
            ]);
            step_flops.push(touch);
        }
        // Scale each static feature by its largest value over the steps.
        for f in 1..7 {
            let max = static_features.iter().map(|s| s[f]).fold(0.0, f64::max);
            if max > 0.0 {
                static_features.iter_mut().for_each(|s| s[f] /= max);
            }
        }
        let base_flops = flops.iter().sum();
        let mut env = Self {
            kind,
            ck,
            desc,
            groups,
            scores,
            links,
            pairs,
            table,
            eval,
            engine,
            calibration: Vec::new(),
            steps,
            static_features,
            step_flops,
            base_flops,
            base_cost: 0.0,
        };
        env.base_cost = env.cost(budget, &widths)?;
        Ok(env)
    }

    /// Widths before pruning.
    pub fn full_widths(&self) -> Vec<usize> {
        self.groups.iter().map(|g| g.width).collect()
    }

    /// Conv FLOPs on the scan at `widths`.
    pub fn flops(&self, widths: &[usize]) -> f64 {
        groups::conv_shapes(&self.links, widths).iter().zip(&self.pairs).map(|(&(i, o), &p)| conv_flops(p, i, o)).sum()
    }

    /// Cost at `widths`: FLOPs, or predicted seconds.
    pub fn cost(&self, budget: Budget, widths: &[usize]) -> Result<f64> {
        match (budget, self.table) {
            (Budget::Latency, Some(t)) => t.predict_shapes(&self.desc, &groups::conv_shapes(&self.links, widths)),
            (Budget::Latency, None) => Err(Error::invalid("--table", "a latency budget needs a latency table")),
            (Budget::Flops, _) => Ok(self.flops(widths)),
        }
    }

    /// Unpruned cost.
    pub fn base_cost(&self) -> f64 {
        self.base_cost
    }

    /// Candidate widths of group `g`, ascending: multiples of `round_to` from the smallest at or
    /// above `lbound · width` (and `min_width`), and the full width.
    fn grid(&self, g: usize, o: &AmcOptions) -> Vec<usize> {
        let w = self.groups[g].width;
        let floor = ((o.lbound * w as f64).ceil() as usize).max(o.min_width);
        let mut v: Vec<usize> = (1..=w / o.round_to).map(|i| i * o.round_to).filter(|&x| x >= floor).collect();
        if v.last() != Some(&w) {
            v.push(w);
        }
        v
    }

    /// The state at step `t` with `widths` decided so far and the previous action.
    fn state(&self, t: usize, widths: &[usize], prev: f64) -> Vec<f32> {
        let s = &self.static_features[t];
        let removed = 1.0 - self.flops(widths) / self.base_flops.max(1.0);
        let rest: f64 = self.step_flops[t + 1..].iter().sum::<f64>() / self.base_flops.max(1.0);
        let n = self.steps.len().max(2) - 1;
        let v = [t as f64 / n as f64, s[0], s[1], s[2], s[3], s[4], s[5], s[6], removed, rest.min(1.0), prev];
        v.iter().map(|&x| x as f32).collect()
    }

    /// The widest grid width at most `ratio · width` for step `t` (never below the grid's
    /// smallest) that still lets the budget be met with every later step at its smallest width.
    fn wall(&self, t: usize, ratio: f64, widths: &[usize], goal: f64, o: &AmcOptions) -> Result<usize> {
        let g = self.steps[t];
        let grid = self.grid(g, o);
        let mut trial = widths.to_vec();
        for &later in &self.steps[t + 1..] {
            trial[later] = self.grid(later, o)[0];
        }
        let want = (ratio * self.groups[g].width as f64).round() as usize;
        let mut i = grid.iter().rposition(|&w| w <= want).unwrap_or(0);
        loop {
            trial[g] = grid[i];
            if i == 0 || self.cost(o.budget, &trial)? <= goal {
                return Ok(grid[i]);
            }
            i -= 1;
        }
    }

    /// The narrowest network the grid allows, and its cost.
    pub fn floor(&self, o: &AmcOptions) -> Result<(Vec<usize>, f64)> {
        let mut w = self.full_widths();
        for &g in &self.steps {
            w[g] = self.grid(g, o)[0];
        }
        let c = self.cost(o.budget, &w)?;
        Ok((w, c))
    }

    /// `ck` pruned to `widths` (channels by L1).
    pub fn prune(&self, widths: &[usize]) -> Result<Checkpoint> {
        let plan = channel::select_widths(&self.groups, &self.scores, widths)?;
        let tensors = channel::apply(&self.groups, &plan, self.ck.tensors())?;
        Ok(Checkpoint::from_tensors("<amc>", tensors, self.ck.metadata().clone()))
    }

    /// Recalibrate every pruned network's BatchNorm statistics on these scans before it is
    /// evaluated ([`adaptive_bn`]; none: evaluate as pruned).
    pub fn with_calibration(mut self, scans: Vec<Sample>) -> Self {
        self.calibration = scans;
        self
    }

    /// mIoU of pruned `ck` on the evaluation scans (after adaptive BatchNorm when the
    /// environment has calibration scans).
    pub fn evaluate(&self, ck: &Checkpoint) -> Result<f64> {
        if self.calibration.is_empty() {
            return self.miou(ck);
        }
        self.miou(&adaptive_bn(self.kind, ck, &self.calibration)?)
    }

    /// mIoU of `ck` on the evaluation scans, as it is.
    pub fn miou(&self, ck: &Checkpoint) -> Result<f64> {
        let desc = NetDesc::from_checkpoint(self.kind, ck, NUM_CLASSES)?;
        let m = Model::from_desc(ck, &desc)?;
        Ok(self.eval.evaluate(self.engine, &m)?.0)
    }

    /// The uniform policy at the same budget: the largest keep ratio (steps of 0.01) that every
    /// group takes, rounded as [`ChannelOptions::kept`], whose cost meets `goal`.
    pub fn uniform(&self, goal: f64, o: &AmcOptions) -> Result<(f64, Vec<usize>)> {
        let opts =
            ChannelOptions { ratio: 0.0, selection: Selection::Local, round_to: o.round_to, min_width: o.min_width };
        for k in (1..=100).rev() {
            let keep = k as f64 / 100.0;
            let w: Vec<usize> = self
                .groups
                .iter()
                .map(
                    |g| if g.prunable { opts.kept(g.width, (g.width as f64 * keep).round() as usize) } else { g.width },
                )
                .collect();
            if self.cost(o.budget, &w)? <= goal {
                return Ok((keep, w));
            }
        }
        Err(Error::invalid("--target", "no uniform width meets the budget on this grid"))
    }
}

/// The search's result.
#[derive(Debug, Clone)]
pub struct Search {
    /// Every episode, in order.
    pub episodes: Vec<Episode>,
    /// Index of the highest reward.
    pub best: usize,
    /// Cost the budget allows.
    pub goal: f64,
}

impl Search {
    /// The episodes as CSV.
    pub fn to_csv(&self) -> String {
        let mut s = format!("{CSV_HEADER}\n");
        for e in &self.episodes {
            let _ = writeln!(s, "{}", e.csv());
        }
        s
    }
}

/// Run AMC on `env`; `log` gets a line per episode.
pub fn search(env: &Env<'_>, o: &AmcOptions, mut log: impl FnMut(&Episode)) -> Result<Search> {
    o.validate()?;
    let goal = o.target * env.base_cost;
    let (_, floor) = env.floor(o)?;
    if floor > goal {
        return Err(Error::invalid(
            "--target",
            format!(
                "{} keeps {:.1}% of the cost, but the narrowest network at --lbound {} keeps {:.1}%",
                o.target,
                o.target * 100.0,
                o.lbound,
                100.0 * floor / env.base_cost
            ),
        ));
    }
    let mut agent = Ddpg::new(STATE_DIM, o.ddpg.clone(), o.seed)?;
    let mut episodes: Vec<Episode> = Vec::new();
    let mut best = 0;
    for index in 0..o.warmup + o.episodes {
        let learning = index >= o.warmup;
        let sigma = if learning { o.sigma * o.sigma_decay.powi((index - o.warmup) as i32) } else { 0.0 };
        let mut widths = env.full_widths();
        let mut prev = 0.0;
        let mut walk: Vec<(Vec<f32>, f32)> = Vec::new();
        for t in 0..env.steps.len() {
            let s = env.state(t, &widths, prev);
            let a =
                if learning { agent.explore(&s, sigma, o.lbound, o.rbound)? } else { agent.random(o.lbound, o.rbound) };
            let g = env.steps[t];
            widths[g] = env.wall(t, a as f64, &widths, goal, o)?;
            prev = widths[g] as f64 / env.groups[g].width as f64;
            walk.push((s, prev as f32));
        }
        let cost = env.cost(o.budget, &widths)?;
        if cost > goal * (1.0 + 1e-9) {
            return Err(Error::invalid("amc", "the action wall let an episode exceed the budget"));
        }
        let miou = env.evaluate(&env.prune(&widths)?)?;
        let reward = match o.reward {
            Reward::Error => -(1.0 - miou),
            Reward::ErrorLogCost => {
                // ln of FLOPs, or of microseconds: both well above 1, so cheaper scores higher.
                let units = if o.budget == Budget::Latency { cost * 1e6 } else { cost };
                -(1.0 - miou) * units.ln()
            }
        };
        let last = walk.len() - 1;
        for t in 0..walk.len() {
            let next = if t < last { walk[t + 1].0.clone() } else { walk[t].0.clone() };
            let (state, action) = walk[t].clone();
            agent.remember(Transition { state, action, reward: reward as f32, next, done: t == last });
        }
        if learning {
            for _ in 0..walk.len() {
                agent.update()?;
            }
        }
        let e = Episode {
            index,
            sigma,
            cost_ratio: cost / env.base_cost,
            flops_ratio: env.flops(&widths) / env.base_flops,
            widths,
            miou,
            reward,
        };
        log(&e);
        if episodes.get(best).is_none_or(|b| e.reward > b.reward) {
            best = episodes.len();
        }
        episodes.push(e);
    }
    Ok(Search { episodes, best, goal })
}
