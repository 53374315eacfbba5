//! `sparseconv latency-table`: measure a model's per-conv latency table on the target, and
//! check its predictions against measured end-to-end times of pruned models.

use std::path::PathBuf;
use std::time::Instant;

use sparseconv::nn::checkpoint::Checkpoint;
use sparseconv::pipeline::Model;
use sparseconv::prune::latency::LatencyTable;
use sparseconv::sparse_weights::Format;
use sparseconv::{Engine, Error, Grouping, Result};

use super::args::DeviceArg;
use super::rounds::{alternate, median};
use super::sensitivity::parse_ratios;
use super::{bundled, check_device};

/// `latency-table`'s arguments.
#[derive(clap::Args)]
pub struct LatencyTableArgs {
    /// The unpruned model whose convs are measured (default: the bundled one).
    pub model: Option<PathBuf>,
    /// Device to measure on: cpu or gpu.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// Scan to measure on (default: the bundled SemanticKITTI scan).
    #[arg(long)]
    pub scan: Option<PathBuf>,
    /// Width grid: every multiple of this up to each conv's width (use the `--round-to` the
    /// pruning will use).
    #[arg(long, default_value_t = 16)]
    pub step: usize,
    /// Timed runs per entry (median).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Also measure every conv with this fraction of its kernel offsets removed (the smallest
    /// by L1 of the model's own kernel), e.g. `0.1:0.9:0.1`: prices offset pruning.
    #[arg(long)]
    pub offsets: Option<String>,
    /// Also measure every conv with its kernel in these sparse formats (`element`, `block`,
    /// `N:M`, comma-separated) at each of --sparsities: prices weight sparsity.
    #[arg(long, value_delimiter = ',')]
    pub sparse: Vec<String>,
    /// Sparsities measured for --sparse (N:M formats have their own).
    #[arg(long, default_value = "0.5,0.7,0.8,0.9,0.95")]
    pub sparsities: String,
    /// Where to write the table (CSV).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Read this table instead of measuring one (with --check).
    #[arg(long, conflicts_with = "out")]
    pub table: Option<PathBuf>,
    /// Pruned models to predict and then measure end to end (alternating rounds).
    #[arg(long, num_args = 1..)]
    pub check: Vec<PathBuf>,
    /// Timed runs per model per round for --check.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Alternating rounds for --check.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
}

/// Run the command.
pub fn run(a: LatencyTableArgs) -> Result<()> {
    let device = check_device(a.device.as_str())?;
    let e = Engine::new(device.clone(), device.map_builder(), Grouping::Auto);
    let scan = a.scan.clone().unwrap_or_else(|| bundled("data/semantickitti/sequences/00/velodyne/000000.bin"));
    let table = match (&a.table, &a.out) {
        (Some(t), _) => {
            let t = LatencyTable::load(t)?;
            t.check_target(&e)?;
            t
        }
        (None, Some(out)) => {
            let path = a.model.clone().unwrap_or_else(|| bundled("data/models/minkunet_cr0.5.safetensors"));
            let ck = Checkpoint::load(&path)?;
            let kind = super::prune::arch_of(&ck, None)?;
            let desc = sparseconv::nn::arch::NetDesc::from_checkpoint(kind, &ck, sparseconv::io::kitti::NUM_CLASSES)?;
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} conv shapes {elapsed}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let t0 = Instant::now();
            let mut t = LatencyTable::measure(&e, &ck, kind, &scan, a.step, a.reps, |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            })?;
            let offsets = a.offsets.as_deref().map(parse_ratios).transpose()?.unwrap_or_default();
            let sparsities = parse_ratios(&a.sparsities)?;
            let sparse: Vec<(Format, Vec<f64>)> = a
                .sparse
                .iter()
                .map(|f| {
                    let f = Format::parse(f)?;
                    Ok(match f {
                        Format::NM(n, m) => (f, vec![1.0 - f64::from(n) / f64::from(m)]),
                        _ => (f, sparsities.clone()),
                    })
                })
                .collect::<Result<_>>()?;
            if !offsets.is_empty() || !sparse.is_empty() {
                bar.set_style(
                    indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} offset and sparse cuts {elapsed}")
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                t.measure_cuts(&e, &ck, kind, &scan, &offsets, &sparse, a.reps, |done, total| {
                    bar.set_length(total as u64);
                    bar.set_position(done as u64);
                })?;
            }
            bar.finish_and_clear();
            t.save(out)?;
            println!(
                "{} conv shapes and {} cuts of {} measured on {} ({} threads, {} voxels) in {:.0} s; calibrated end to end = {:.1} ms + {:.3} x convs; predicted {:.1} ms; wrote {}",
                t.entries.len(),
                t.cuts.len(),
                path.display(),
                t.device,
                t.threads,
                t.voxels,
                t0.elapsed().as_secs_f64(),
                t.fixed * 1e3,
                t.scale,
                t.predict(&desc)? * 1e3,
                out.display()
            );
            t
        }
        (None, None) => {
            return Err(Error::invalid("latency-table", "give --out to measure a table, or --table to read one"))
        }
    };
    if a.check.is_empty() {
        return Ok(());
    }
    let cks: Vec<Checkpoint> = a.check.iter().map(|p| Checkpoint::load(p)).collect::<Result<_>>()?;
    let models: Vec<Model> =
        cks.iter().map(|ck| Model::from_checkpoint(ck, None, None).map(|m| m.0)).collect::<Result<_>>()?;
    let engines: Vec<Engine> =
        models.iter().map(|_| Engine::new(device.clone(), device.map_builder(), Grouping::Auto)).collect();
    let pairs: Vec<(&Engine, &Model)> = engines.iter().zip(&models).collect();
    let m = alternate(std::slice::from_ref(&scan), &pairs, 1, a.runs.max(1), a.rounds.max(1), false)?;
    println!("{:<48} {:>24} {:>12} {:>12} {:>8}", "model", "widths", "predicted", "measured", "error");
    for (((path, ck), model), meas) in a.check.iter().zip(&cks).zip(&models).zip(&m) {
        let p = table.predict_checkpoint(ck, model.desc())?;
        let t = median(&meas.totals);
        println!(
            "{:<48} {:>24} {:>9.1} ms {:>9.1} ms {:>+7.1}%",
            path.display(),
            model.desc().widths_summary(),
            p * 1e3,
            t * 1e3,
            (p / t - 1.0) * 100.0
        );
    }
    Ok(())
}
