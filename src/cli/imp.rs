//! `sparseconv imp`: iterative global magnitude pruning (`prune::iterative`) — prune, train,
//! prune again on an AGP, fixed or geometric schedule, each round fine-tuning, rewinding to an
//! early step (lottery tickets) or re-initializing; resumable per round.

use std::path::PathBuf;
use std::time::Instant;

use sparseconv::nn::checkpoint::Checkpoint;
use sparseconv::prune::iterative::{Imp, ImpOptions, Restart, Schedule};
use sparseconv::{Device, Engine, Error, Grouping, Result};

use super::args::{RestartArg, ScheduleArg};
use super::prune::arch_of;
use super::{bundled, eval_or_bundled, fine_tune_scans};

/// `imp`'s arguments.
#[derive(clap::Args)]
pub struct ImpArgs {
    /// The model to prune (default: the bundled MinkUNet); with --fresh, only its
    /// architecture and widths are used.
    pub model: Option<PathBuf>,
    /// Start from a fresh random init with this seed (lottery tickets: train dense with
    /// --pretrain-steps first) instead of the model's weights.
    #[arg(long)]
    pub fresh: Option<u64>,
    /// Fraction of conv weights zero at the end.
    #[arg(long)]
    pub final_sparsity: f64,
    /// How sparsity grows: agp, fixed, or geometric (--rate of what is left per round).
    #[arg(long, value_enum, default_value_t = ScheduleArg::Agp)]
    pub schedule: ScheduleArg,
    /// Rounds (agp and fixed).
    #[arg(long, default_value_t = 4)]
    pub rounds: usize,
    /// Fraction of the remaining weights each geometric round removes.
    #[arg(long, default_value_t = 0.2)]
    pub rate: f64,
    /// What each round trains from: finetune, rewind (lottery tickets) or reinit.
    #[arg(long, value_enum, default_value_t = RestartArg::Finetune)]
    pub restart: RestartArg,
    /// Dense training steps before the first prune.
    #[arg(long, default_value_t = 0)]
    pub pretrain_steps: usize,
    /// The dense training step rewind returns to.
    #[arg(long, default_value_t = 0)]
    pub rewind_step: usize,
    /// Training steps per round.
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    /// Learning rate (AdamW).
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// Cosine decay of the rate over each training (else constant).
    #[arg(long)]
    pub cosine: bool,
    /// Training scans (default: the three bundled labelled scans).
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Crop training scans to this radius in metres (0: whole scans).
    #[arg(long, default_value_t = 25.0)]
    pub crop: f32,
    /// Labelled scans each round is evaluated on (default: the bundled SemanticKITTI scan).
    #[arg(long, num_args = 1..)]
    pub eval: Vec<PathBuf>,
    /// Their labels, in the same order.
    #[arg(long, num_args = 1..)]
    pub labels: Vec<PathBuf>,
    /// Seed of order, augmentation and re-initialization.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Output directory: imp.csv, round_NN.safetensors, rewind.safetensors. Rerun with the
    /// same directory to resume after the last finished round.
    #[arg(long)]
    pub out: PathBuf,
}

/// Run the command.
pub fn run(a: ImpArgs) -> Result<()> {
    let schedule = match a.schedule.as_str() {
        "agp" => Schedule::Agp,
        "fixed" => Schedule::Fixed,
        "geometric" => Schedule::Geometric(a.rate),
        other => {
            return Err(Error::invalid("--schedule", format!("expected agp, fixed or geometric, got `{other}`")));
        }
    };
    let o = ImpOptions {
        final_sparsity: a.final_sparsity,
        schedule,
        rounds: a.rounds,
        restart: a.restart.parse::<Restart>()?,
        pretrain_steps: a.pretrain_steps,
        rewind_step: a.rewind_step,
        steps: a.steps,
        lr: a.lr,
        cosine: a.cosine,
        seed: a.seed,
    };
    o.validate()?;
    let path = a.model.clone().unwrap_or_else(|| bundled("data/models/minkunet_cr0.5.safetensors"));
    let model = Checkpoint::load(&path)?;
    let kind = arch_of(&model, None)?;
    let start = match a.fresh {
        Some(seed) => {
            let fresh = Checkpoint::fresh(seed);
            let t = sparseconv::train::net::TrainNet::from_desc(
                &fresh,
                &sparseconv::nn::arch::NetDesc::from_checkpoint(kind, &model, sparseconv::io::kitti::NUM_CLASSES)?,
            )?
            .params
            .tensors();
            Checkpoint::from_tensors("<fresh>", t, model.metadata().clone())
        }
        None => model,
    };
    let eval = eval_or_bundled(&a.eval, &a.labels)?;
    let train = fine_tune_scans(&a.data, a.crop)?;
    let e = Engine::new(Device::Cpu, Device::Cpu.map_builder(), Grouping::Heuristic);
    let imp = Imp { kind, train, eval: &eval, engine: &e };
    let targets: Vec<String> = o.targets().iter().map(|t| format!("{:.1}%", t * 100.0)).collect();
    println!(
        "iterative magnitude pruning of {}: sparsity {} ({} rounds), {} training steps per round, restart {}",
        path.display(),
        targets.join(" -> "),
        targets.len(),
        o.steps,
        a.restart
    );
    let t0 = Instant::now();
    let rounds = imp.run(&start, &o, &a.out, |l| println!("{l}"))?;
    println!(
        "{} rounds this run in {:.0} s; wrote {}",
        rounds.len(),
        t0.elapsed().as_secs_f64(),
        a.out.join("imp.csv").display()
    );
    Ok(())
}
