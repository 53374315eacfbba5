//! `sparseconv sensitivity`: prune one channel group at a time at each ratio, evaluate mIoU on
//! labelled scans and price each network with a latency table; CSV, plots and, with
//! `--threshold`, a width plan for `prune --plan`.

use std::path::PathBuf;
use std::time::Instant;

use sparseconv::nn::checkpoint::Checkpoint;
use sparseconv::pipeline::Model;
use sparseconv::prune::channel::{ChannelOptions, Selection};
use sparseconv::prune::importance::Criterion;
use sparseconv::prune::latency::LatencyTable;
use sparseconv::prune::sensitivity::sweep;
use sparseconv::prune::{prune_channels_to, ChannelTarget};
use sparseconv::{Device, Engine, Error, Grouping, Result};

use super::prune::arch_of;
use super::{bundled, eval_set, plot};

/// `sensitivity`'s arguments.
#[derive(clap::Args)]
pub struct SensitivityArgs {
    /// The model to analyse.
    pub model: PathBuf,
    /// Labelled scans to evaluate on.
    #[arg(long, num_args = 1.., required = true)]
    pub eval: Vec<PathBuf>,
    /// Their labels (SemanticKITTI .label or Open3D-ML labels_*.npy), in the same order.
    #[arg(long, num_args = 1.., required = true)]
    pub labels: Vec<PathBuf>,
    /// What is pruned one unit at a time: `channel` (dependency groups).
    #[arg(long, default_value = "channel")]
    pub granularity: String,
    /// Channel ranking: l1, l2, bn or random.
    #[arg(long, default_value = "l1")]
    pub criterion: String,
    /// Ratios as START:END:STEP or a comma list.
    #[arg(long, default_value = "0.1:0.9:0.1")]
    pub ratios: String,
    /// Kept widths are multiples of this.
    #[arg(long, default_value_t = 8)]
    pub round_to: usize,
    /// No group keeps fewer channels.
    #[arg(long, default_value_t = 8)]
    pub min_width: usize,
    /// Latency table of this model on this machine (`latency-table --step` = --round-to);
    /// without it one is measured first on the bundled scan.
    #[arg(long)]
    pub table: Option<PathBuf>,
    /// Largest mIoU drop (points) a group may cost: writes `plan.txt`, the narrowest such
    /// width per group, and evaluates that plan.
    #[arg(long)]
    pub threshold: Option<f64>,
    /// Architecture (default: the file's metadata).
    #[arg(long)]
    pub arch: Option<String>,
    /// Output directory (sensitivity.csv, sensitivity.png, latency.png, plan.txt).
    #[arg(long)]
    pub out: PathBuf,
}

/// `START:END:STEP` (inclusive, within rounding) or `a,b,c`.
pub fn parse_ratios(s: &str) -> Result<Vec<f64>> {
    let bad = || Error::invalid("--ratios", format!("expected START:END:STEP or a comma list in [0, 1), got `{s}`"));
    let v: Vec<f64> = if let [a, b, st] = s.split(':').collect::<Vec<_>>()[..] {
        let (a, b, st): (f64, f64, f64) =
            (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?, st.parse().map_err(|_| bad())?);
        if !st.is_finite() || st <= 0.0 || b < a {
            return Err(bad());
        }
        let n = ((b - a) / st + 1e-9).floor() as usize;
        (0..=n).map(|i| ((a + st * i as f64) * 1e6).round() / 1e6).collect()
    } else {
        s.split(',').map(|x| x.trim().parse().map_err(|_| bad())).collect::<Result<_>>()?
    };
    if v.is_empty() || v.len() > 100 || v.iter().any(|r| !(0.0..1.0).contains(r)) {
        return Err(bad());
    }
    Ok(v)
}

/// Run the command.
pub fn run(a: SensitivityArgs) -> Result<()> {
    if a.granularity != "channel" {
        return Err(Error::invalid(
            "--granularity",
            format!("the sweep prunes channel groups only so far, got `{}`", a.granularity),
        ));
    }
    let criterion: Criterion = a.criterion.parse()?;
    let ratios = parse_ratios(&a.ratios)?;
    let opts = ChannelOptions { ratio: 0.0, selection: Selection::Local, round_to: a.round_to, min_width: a.min_width };
    opts.validate()?;
    if let Some(t) = a.threshold {
        if !(t.is_finite() && t >= 0.0) {
            return Err(Error::invalid("--threshold", format!("must be a non-negative mIoU drop in points, got {t}")));
        }
    }
    let ck = Checkpoint::load(&a.model)?;
    let kind = arch_of(&ck, a.arch.as_deref())?;
    let eval = eval_set(&a.eval, &a.labels)?;
    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    let e = Engine::new(Device::Cpu, Device::Cpu.map_builder(), Grouping::Auto);
    let t0 = Instant::now();
    let table = match &a.table {
        Some(p) => LatencyTable::load(p)?,
        None => {
            let scan = bundled("data/semantickitti/sequences/00/velodyne/000000.bin");
            println!("measuring a latency table on {} (width step {}) ...", scan.display(), a.round_to);
            let t = LatencyTable::measure(&e, &ck, kind, &scan, a.round_to, 3, |_, _| {})?;
            t.save(&a.out.join("latency_table.csv"))?;
            t
        }
    };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} pruned networks evaluated {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let s = sweep(&ck, kind, criterion, &ratios, &opts, &eval, &e, &table, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    let csv = a.out.join("sensitivity.csv");
    std::fs::write(&csv, s.to_csv()).map_err(|e| Error::io(&csv, e))?;
    plot::sensitivity(&s, &a.out.join("sensitivity.png"), &a.out.join("latency.png"))?;
    println!(
        "{} groups x {} ratios on {} scans in {:.0} s: unpruned mIoU {:.1}%, predicted {:.1} ms; wrote {}, sensitivity.png, latency.png",
        s.groups.iter().filter(|g| g.prunable).count(),
        ratios.len(),
        eval.scans.len(),
        t0.elapsed().as_secs_f64(),
        s.base.0 * 100.0,
        s.base.1 * 1e3,
        csv.display()
    );
    if let Some(t) = a.threshold {
        let plan = s.plan(t / 100.0)?;
        let path = a.out.join("plan.txt");
        plan.save(&path)?;
        let widths: Vec<usize> = plan.groups.iter().map(|g| g.1).collect();
        let p = prune_channels_to(&ck, kind, criterion, ChannelTarget::Widths(&widths), &[], 0)?;
        let m = Model::from_desc(&p.checkpoint(), &p.after)?;
        let (miou, _) = eval.evaluate(&e, &m)?;
        println!(
            "plan for a drop of at most {t} points per group: widths {} -> {}; all together mIoU {:.1}% (unpruned {:.1}%), predicted {:.1} ms -> {:.1} ms; wrote {}",
            p.before.widths_summary(),
            p.after.widths_summary(),
            miou * 100.0,
            s.base.0 * 100.0,
            s.base.1 * 1e3,
            table.predict(&p.after)? * 1e3,
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_ratios;

    #[test]
    fn ratio_lists() {
        assert_eq!(parse_ratios("0.1:0.9:0.1").unwrap().len(), 9);
        assert_eq!(parse_ratios("0.25,0.5").unwrap(), vec![0.25, 0.5]);
        assert!(parse_ratios("0.5:0.1:0.1").is_err());
        assert!(parse_ratios("0.5,1.0").is_err());
        assert!(parse_ratios("a:b").is_err());
    }
}
