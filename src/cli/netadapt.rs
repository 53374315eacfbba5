//! `sparseconv netadapt`: latency-driven iterative channel pruning with short fine-tunes
//! (`prune::netadapt`), then the result timed against the original in alternating rounds.

use std::path::PathBuf;
use std::time::Instant;

use sparseconv::nn::arch::NetDesc;
use sparseconv::nn::checkpoint::Checkpoint;
use sparseconv::pipeline::Model;
use sparseconv::prune::latency::LatencyTable;
use sparseconv::prune::netadapt::{NetAdapt, NetAdaptOptions};
use sparseconv::{Device, Engine, Grouping, Result};

use super::prune::arch_of;
use super::rounds::{alternate, median};
use super::{bundled_scan, eval_or_bundled, fine_tune_scans};

/// `netadapt`'s arguments.
#[derive(clap::Args)]
pub struct NetAdaptArgs {
    /// The model to shrink.
    pub model: PathBuf,
    /// Stop at the unpruned predicted latency divided by this.
    #[arg(long)]
    pub target_speedup: f64,
    /// Fine-tuning scans (SemanticKITTI roots or Open3D-ML points_*.npy; default: the three
    /// bundled labelled scans).
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Labelled scans proposals are ranked on (default: the bundled SemanticKITTI scan).
    #[arg(long, num_args = 1..)]
    pub eval: Vec<PathBuf>,
    /// Their labels, in the same order.
    #[arg(long, num_args = 1..)]
    pub labels: Vec<PathBuf>,
    /// Latency table of the model on this machine (`latency-table --step` = --round-to).
    #[arg(long)]
    pub table: PathBuf,
    /// Output directory: netadapt.csv, iter_NN.safetensors, final.safetensors. Rerun with the
    /// same directory to resume after the last finished iteration.
    #[arg(long)]
    pub out: PathBuf,
    /// First latency cut, a fraction of the unpruned predicted latency.
    #[arg(long, default_value_t = 0.05)]
    pub first_cut: f64,
    /// Each later cut is the previous one times this.
    #[arg(long, default_value_t = 0.9)]
    pub decay: f64,
    /// Proposed widths are multiples of this.
    #[arg(long, default_value_t = 16)]
    pub round_to: usize,
    /// No group narrower than this.
    #[arg(long, default_value_t = 8)]
    pub min_width: usize,
    /// Fine-tuning steps per proposal.
    #[arg(long, default_value_t = 10)]
    pub short_steps: usize,
    /// Fine-tuning steps after the last iteration.
    #[arg(long, default_value_t = 100)]
    pub long_steps: usize,
    /// Fine-tuning learning rate (AdamW, constant; the bundled model trained at 2e-3).
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// Crop fine-tuning scans to this radius in metres (0: whole scans).
    #[arg(long, default_value_t = 25.0)]
    pub crop: f32,
    /// At most this many iterations.
    #[arg(long, default_value_t = 30)]
    pub max_iterations: usize,
    /// Seed of the fine-tuning.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Run the command.
pub fn run(a: NetAdaptArgs) -> Result<()> {
    let o = NetAdaptOptions {
        target_speedup: a.target_speedup,
        first_cut: a.first_cut,
        decay: a.decay,
        round_to: a.round_to,
        min_width: a.min_width,
        short_steps: a.short_steps,
        long_steps: a.long_steps,
        lr: a.lr,
        crop: (a.crop > 0.0).then_some(a.crop),
        max_iterations: a.max_iterations,
        seed: a.seed,
    };
    o.validate()?;
    let ck = Checkpoint::load(&a.model)?;
    let kind = arch_of(&ck, None)?;
    let table = LatencyTable::load(&a.table)?;
    let kitti = bundled_scan();
    let eval = eval_or_bundled(&a.eval, &a.labels)?;
    let train = fine_tune_scans(&a.data, a.crop)?;
    let e = Engine::new(Device::Cpu, Device::Cpu.map_builder(), Grouping::Auto);
    let na = NetAdapt { kind, table: &table, eval: &eval, train, latency_scan: kitti.clone(), engine: &e };
    let t0 = Instant::now();
    let (last, its) = na.run(&ck, &o, &a.out, |line| println!("{line}"))?;
    let desc = NetDesc::from_checkpoint(kind, &last, sparseconv::io::kitti::NUM_CLASSES)?;
    let pruned = Model::from_desc(&last, &desc)?;
    let base = Model::from_checkpoint(&ck, None, None)?.0;
    let (m0, _) = eval.evaluate(&e, &base)?;
    let (m1, _) = eval.evaluate(&e, &pruned)?;
    let (eb, ea) = (
        Engine::new(Device::Cpu, Device::Cpu.map_builder(), Grouping::Auto),
        Engine::new(Device::Cpu, Device::Cpu.map_builder(), Grouping::Auto),
    );
    let m = alternate(std::slice::from_ref(&kitti), &[(&eb, &base), (&ea, &pruned)], 1, 3, 3, false)?;
    let ratios: Vec<String> =
        m[0].round_medians.iter().zip(&m[1].round_medians).map(|(b, a)| format!("{:.2}x", b / a)).collect();
    println!(
        "{} iterations this run in {:.0} s; final (after {} fine-tuning steps): widths {}, mIoU {:.1}% (unpruned {:.1}%), predicted {:.1} ms, measured {:.1} ms against {:.1} ms unpruned, speed-up per round {}; wrote {}",
        its.len(),
        t0.elapsed().as_secs_f64(),
        o.long_steps,
        desc.widths_summary(),
        m1 * 100.0,
        m0 * 100.0,
        table.predict(&desc)? * 1e3,
        median(&m[1].totals) * 1e3,
        median(&m[0].totals) * 1e3,
        ratios.join(" "),
        a.out.join("final.safetensors").display()
    );
    Ok(())
}
