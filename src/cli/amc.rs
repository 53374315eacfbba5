//! `sparseconv amc`: AMC's DDPG search for per-group keep ratios under a FLOPs or latency
//! budget (`prune::amc`), then the best policy compared with uniform pruning at the same
//! budget (and any other pruned models given), each after the same fine-tune, timed against
//! the unpruned model in alternating rounds.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use sparseconv::nn::arch::NetDesc;
use sparseconv::nn::checkpoint::{save, Checkpoint};
use sparseconv::pipeline::Model;
use sparseconv::prune::amc::{self, AmcOptions, Budget, Env};
use sparseconv::prune::finetune::FineTune;
use sparseconv::prune::latency::LatencyTable;
use sparseconv::prune::WidthPlan;
use sparseconv::{Device, Engine, Error, Grouping, Result};

use super::args::{BudgetArg, RewardArg};
use super::prune::arch_of;
use super::rounds::{alternate, median};
use super::{bundled_scan, eval_or_bundled, fine_tune_scans};

/// `amc`'s arguments.
#[derive(clap::Args)]
pub struct AmcArgs {
    /// The model to prune.
    pub model: PathBuf,
    /// What the budget counts: conv FLOPs on the first evaluation scan, or the latency the
    /// table predicts.
    #[arg(long, value_enum, default_value_t = BudgetArg::Flops)]
    pub budget: BudgetArg,
    /// Fraction of the unpruned cost to keep (0.5: half the FLOPs or half the latency).
    #[arg(long)]
    pub target: f64,
    /// Episode reward: `error` (−error; AMC's for a budget the action wall enforces) or
    /// `error-log-cost` (−error · ln cost; it also rewards going under the budget).
    #[arg(long, value_enum, default_value_t = RewardArg::Error)]
    pub reward: RewardArg,
    /// Latency table of the model on this machine (needed for `--budget latency`; with a FLOPs
    /// budget it adds predicted times to the comparison).
    #[arg(long)]
    pub table: Option<PathBuf>,
    /// Labelled scans each episode's network is evaluated on (default: the bundled
    /// SemanticKITTI scan).
    #[arg(long, num_args = 1..)]
    pub eval: Vec<PathBuf>,
    /// Their labels, in the same order.
    #[arg(long, num_args = 1..)]
    pub labels: Vec<PathBuf>,
    /// Output directory: amc.csv, policy.plan, amc.safetensors, uniform.safetensors,
    /// compare.csv (and *_ft.safetensors after fine-tuning).
    #[arg(long)]
    pub out: PathBuf,
    /// Random-action episodes before the agent learns (AMC's value).
    #[arg(long, default_value_t = 100)]
    pub warmup: usize,
    /// Learning episodes after the warm-up (AMC's value).
    #[arg(long, default_value_t = 300)]
    pub episodes: usize,
    /// Smallest keep ratio of a group.
    #[arg(long, default_value_t = 0.2)]
    pub lbound: f64,
    /// Widths are multiples of this.
    #[arg(long, default_value_t = 8)]
    pub round_to: usize,
    /// No group narrower than this.
    #[arg(long, default_value_t = 8)]
    pub min_width: usize,
    /// Hidden units of the actor and critic (two layers each).
    #[arg(long, default_value_t = 300)]
    pub hidden: usize,
    /// Exploration noise at the first learning episode (decays by 0.95 per episode).
    #[arg(long, default_value_t = 0.5)]
    pub sigma: f64,
    /// Seed of the agent and the fine-tunes.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Fine-tuning steps given to every compared network (0: compare without fine-tuning).
    #[arg(long, default_value_t = 0)]
    pub finetune_steps: usize,
    /// Fine-tuning scans (default: the three bundled labelled scans).
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Fine-tuning learning rate (AdamW, constant).
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// Crop fine-tuning scans to this radius in metres (0: whole scans).
    #[arg(long, default_value_t = 25.0)]
    pub crop: f32,
    /// Scan the compared networks are timed on end to end (default: the bundled scan).
    #[arg(long)]
    pub scan: Option<PathBuf>,
    /// Alternating timing rounds per compared network (3 runs each).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Recalibrate each episode's BatchNorm statistics on this many fine-tuning scans (cropped
    /// as --crop) before evaluating it (adaptive BatchNorm; 0: evaluate as pruned).
    #[arg(long, default_value_t = 3)]
    pub calibrate: usize,
    /// Other pruned models of the same network (NetAdapt's, a sensitivity plan's) to put in
    /// the comparison, fine-tuned the same way.
    #[arg(long, num_args = 1..)]
    pub compare: Vec<PathBuf>,
}

/// Run the command.
pub fn run(a: AmcArgs) -> Result<()> {
    let budget: Budget = a.budget.parse()?;
    let mut o = AmcOptions::new(budget, a.target, a.warmup, a.episodes);
    o.reward = a.reward.parse()?;
    o.lbound = a.lbound;
    o.round_to = a.round_to;
    o.min_width = a.min_width;
    o.sigma = a.sigma;
    o.seed = a.seed;
    o.ddpg.hidden = a.hidden;
    o.validate()?;
    let ft = FineTune { steps: a.finetune_steps, lr: a.lr, seed: a.seed };
    ft.validate()?;
    let ck = Checkpoint::load(&a.model)?;
    let kind = arch_of(&ck, None)?;
    let table = a.table.as_deref().map(LatencyTable::load).transpose()?;
    let eval = eval_or_bundled(&a.eval, &a.labels)?;
    let train = if ft.steps > 0 || a.calibrate > 0 { fine_tune_scans(&a.data, a.crop)? } else { Vec::new() };
    let compared: Vec<(String, Checkpoint)> = a
        .compare
        .iter()
        .map(|p| Ok((p.file_stem().map_or("model".into(), |s| s.to_string_lossy().to_string()), Checkpoint::load(p)?)))
        .collect::<Result<_>>()?;
    for (name, c) in &compared {
        if arch_of(c, None)? != kind {
            return Err(Error::invalid("--compare", format!("`{name}` is not a {}", kind.name())));
        }
    }
    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    // Heuristic grouping: every episode has new widths, and tuning each would cost more than
    // the evaluation; the mIoU does not depend on it.
    let e = Engine::new(Device::Cpu, Device::Cpu.map_builder(), Grouping::Heuristic);
    let calibration: Vec<_> = train.iter().take(a.calibrate).cloned().collect();
    let env = Env::new(kind, &ck, budget, table.as_ref(), &eval, &e)?.with_calibration(calibration);
    println!(
        "AMC on {}: {} prunable groups of {}, budget {} at {:.0}% of {}, {} warm-up + {} episodes",
        a.model.display(),
        env.steps.len(),
        env.groups.len(),
        a.budget,
        a.target * 100.0,
        if budget == Budget::Flops {
            format!("{:.2} GFLOP", env.base_cost() / 1e9)
        } else {
            format!("{:.1} ms predicted", env.base_cost() * 1e3)
        },
        o.warmup,
        o.episodes
    );
    let bar = indicatif::ProgressBar::new((o.warmup + o.episodes) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} episodes {elapsed} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let t0 = Instant::now();
    let csv = a.out.join("amc.csv");
    let mut rows = format!("{}\n", amc::CSV_HEADER);
    let mut best = f64::NEG_INFINITY;
    let s = amc::search(&env, &o, |ep| {
        let _ = writeln!(rows, "{}", ep.csv());
        // Written as it goes: a long search can be watched (and its policies read) early.
        let _ = std::fs::write(&csv, &rows);
        best = best.max(ep.reward);
        bar.set_message(format!("mIoU {:.1}% reward {:.3} (best {:.3})", ep.miou * 100.0, ep.reward, best));
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    std::fs::write(&csv, s.to_csv()).map_err(|e| Error::io(&csv, e))?;
    let top = &s.episodes[s.best];
    let plan = WidthPlan::new(kind, &env.groups, &top.widths)?;
    plan.save(&a.out.join("policy.plan"))?;
    println!(
        "{} episodes in {:.0} s; best episode {}: mIoU {:.1}% without fine-tuning, cost {:.1}% of unpruned; wrote {} and {}",
        s.episodes.len(),
        t0.elapsed().as_secs_f64(),
        top.index,
        top.miou * 100.0,
        top.cost_ratio * 100.0,
        csv.display(),
        a.out.join("policy.plan").display()
    );

    // The comparison: AMC's policy, uniform at the same budget, and the given models.
    let (keep, uniform) = env.uniform(s.goal, &o)?;
    // (label, file stem, network)
    let mut entries: Vec<(String, String, Checkpoint)> = vec![
        ("amc".into(), "amc".into(), env.prune(&top.widths)?),
        (format!("uniform keep {keep:.2}"), "uniform".into(), env.prune(&uniform)?),
    ];
    for (name, c) in compared {
        entries.push((name.clone(), format!("compare_{name}"), c));
    }
    let base_model = Model::from_checkpoint(&ck, None, None)?.0;
    let base_miou = env.miou(&ck)?;
    let base_flops = env.flops(&env.full_widths());
    let scan = a.scan.clone().unwrap_or_else(bundled_scan);
    let mut report = String::from(
        "policy,flops_ratio,predicted_ms,measured_ms,unpruned_ms,speedup,miou_before_ft,miou_after_ft,finetune_steps,widths\n",
    );
    println!(
        "{:<22} {:>8} {:>10} {:>10} {:>9} {:>11} {:>11}  widths",
        "policy", "FLOPs", "pred. ms", "meas. ms", "speed-up", "mIoU", "mIoU FT"
    );
    for (i, (name, stem, pruned)) in entries.iter().enumerate() {
        if i < 2 {
            save(&a.out.join(format!("{stem}.safetensors")), pruned.tensors(), pruned.metadata().clone(), false)?;
        }
        let before = env.evaluate(pruned)?;
        let tuned = ft.run(kind, pruned, &train)?;
        if ft.steps > 0 {
            save(&a.out.join(format!("{stem}_ft.safetensors")), tuned.tensors(), tuned.metadata().clone(), false)?;
        }
        let after = if ft.steps > 0 { env.miou(&tuned)? } else { before };
        let desc = NetDesc::from_checkpoint(kind, &tuned, sparseconv::io::kitti::NUM_CLASSES)?;
        let groups = sparseconv::prune::groups::groups(&desc)?;
        let widths: Vec<usize> = groups.iter().map(|g| g.width).collect();
        let flops = if widths.len() == env.groups.len() { env.flops(&widths) / base_flops } else { f64::NAN };
        let predicted = table.as_ref().map(|t| t.predict(&desc)).transpose()?.map_or(f64::NAN, |p| p * 1e3);
        let model = Model::from_desc(&tuned, &desc)?;
        let (eb, ea) = (
            Engine::new(Device::Cpu, Device::Cpu.map_builder(), Grouping::Auto),
            Engine::new(Device::Cpu, Device::Cpu.map_builder(), Grouping::Auto),
        );
        let m =
            alternate(std::slice::from_ref(&scan), &[(&eb, &base_model), (&ea, &model)], 1, 3, a.rounds.max(1), false)?;
        let (tb, ta) = (median(&m[0].totals) * 1e3, median(&m[1].totals) * 1e3);
        println!(
            "{:<22} {:>7.1}% {:>10.1} {:>10.1} {:>8.2}x {:>10.1}% {:>10.1}%  {}",
            name,
            flops * 100.0,
            predicted,
            ta,
            tb / ta,
            before * 100.0,
            after * 100.0,
            desc.widths_summary()
        );
        let _ = writeln!(
            report,
            "{name},{flops:.4},{predicted:.2},{ta:.2},{tb:.2},{:.3},{:.3},{:.3},{},{}",
            tb / ta,
            before * 100.0,
            after * 100.0,
            ft.steps,
            desc.widths_summary()
        );
    }
    println!("unpruned mIoU {:.1}% on the same scans", base_miou * 100.0);
    let path = a.out.join("compare.csv");
    std::fs::write(&path, report).map_err(|e| Error::io(&path, e))?;
    println!("wrote {}", path.display());
    Ok(())
}
