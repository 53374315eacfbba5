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
use sparseconv::prune::plan::ConvCut;
use sparseconv::prune::prune_to_plan;
use sparseconv::prune::sensitivity::{sweep, sweep_convs, Granularity};
use sparseconv::{Device, Engine, Error, Grouping, Result};

use super::args::{ArchArg, CriterionArg};
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
    /// What is pruned one unit at a time: `channel` (the channels of one dependency group),
    /// `offset` (kernel offsets of one conv, by L1), `element`, `block`, `N:M` (weights of
    /// one conv in that sparse format, by magnitude), or `voxel` (the voxels of one conv, by
    /// feature magnitude, timed on the bundled scan; `--voxel-fill`/`--voxel-score` apply, and
    /// `--threshold` writes `voxel_plan.txt` for `--voxel-plan`).
    #[arg(long, default_value = "channel")]
    pub granularity: String,
    /// Channel ranking: l1, l2, bn or random.
    #[arg(long, value_enum, default_value_t = CriterionArg::L1)]
    pub criterion: CriterionArg,
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
    /// Instead of a fixed threshold, the smallest one whose plan the latency table predicts at
    /// least this much faster than the unpruned network (sensitivity-guided pruning to a
    /// latency budget): writes `plan.txt` and evaluates it.
    #[arg(long, conflicts_with = "threshold")]
    pub target_speedup: Option<f64>,
    /// Architecture (default: the file's metadata).
    #[arg(long)]
    pub arch: Option<ArchArg>,
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

/// `--granularity voxel`: each block conv and downsampling conv voxel-pruned alone at each
/// ratio, mIoU and measured time; with `--threshold`, the plan of what each may lose alone.
fn run_voxel(a: SensitivityArgs) -> Result<()> {
    use sparseconv::prune::sensitivity::{sweep_voxels, voxel_plan};
    let ratios = parse_ratios(&a.ratios)?;
    if let Some(t) = a.threshold {
        if !(t.is_finite() && t >= 0.0) {
            return Err(Error::invalid("--threshold", format!("must be a non-negative mIoU drop in points, got {t}")));
        }
    }
    if a.target_speedup.is_some() {
        return Err(Error::invalid("--target-speedup", "voxel sweeps take --threshold"));
    }
    let base = super::voxel::sweep_settings()?;
    let (model, _) = Model::load(&a.model, a.arch.map(ArchArg::as_str), None)?;
    let d = model.desc();
    let mut convs: Vec<String> = d.block_convs().iter().map(|c| c.kernel.clone()).collect();
    if d.point_transforms.is_empty() {
        convs.extend(d.stages.iter().map(|s| s.resample.kernel.clone()));
    }
    let eval = eval_set(&a.eval, &a.labels)?;
    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    let e = Engine::new(Device::Cpu, Device::Cpu.map_builder(), Grouping::Auto);
    let scan = bundled("data/semantickitti/sequences/00/velodyne/000000.bin");
    let timing = sparseconv::pipeline::prepare_file(&scan, None, sparseconv::pipeline::VoxelizeMode::Mean)?;
    let t0 = Instant::now();
    let bar = indicatif::ProgressBar::new((convs.len() * ratios.len()) as u64);
    let pts = sweep_voxels(&model, &convs, &ratios, &base, &eval, &e, &timing, 3, |i, _| bar.set_position(i as u64))?;
    bar.finish_and_clear();
    let mut csv = String::from("name,ratio,miou,measured_ms\n");
    for p in &pts {
        csv.push_str(&format!("{},{},{:.4},{:.3}\n", p.name, p.ratio, p.miou * 100.0, p.seconds * 1e3));
    }
    let path = a.out.join("voxel_sensitivity.csv");
    std::fs::write(&path, csv).map_err(|e| Error::io(&path, e))?;
    println!(
        "{} convs x {} ratios on {} scans in {:.0} s (fill {}, score {}): unpruned mIoU {:.1}%, {:.1} ms; wrote {}",
        convs.len(),
        ratios.len(),
        eval.scans.len(),
        t0.elapsed().as_secs_f64(),
        base.fill,
        base.score,
        pts[0].miou * 100.0,
        pts[0].seconds * 1e3,
        path.display()
    );
    if let Some(t) = a.threshold {
        let plan = voxel_plan(&pts, t / 100.0, &base);
        let path = a.out.join("voxel_plan.txt");
        std::fs::write(&path, plan.to_text()).map_err(|e| Error::io(&path, e))?;
        let mut m = model.clone();
        m.set_voxel_plan(&plan)?;
        let (miou, _) = eval.evaluate(&e, &m)?;
        println!(
            "plan for a drop of at most {t:.2} points per conv: {} convs pruned; all together mIoU {:.1}% (unpruned {:.1}%); wrote {}",
            plan.ratios.len(),
            miou * 100.0,
            pts[0].miou * 100.0,
            path.display()
        );
    }
    Ok(())
}

/// Run the command.
pub fn run(a: SensitivityArgs) -> Result<()> {
    if a.granularity == "voxel" {
        return run_voxel(a);
    }
    if super::voxel::given() {
        return Err(Error::invalid("--voxel-prune", "voxel flags go with `sensitivity --granularity voxel`"));
    }
    let granularity = Granularity::parse(&a.granularity)?;
    let criterion: Criterion = a.criterion.parse()?;
    if granularity != Granularity::Channel && criterion != Criterion::L1 {
        return Err(Error::invalid("--criterion", "offsets and sparse formats are ranked by l1 magnitude only"));
    }
    let ratios = parse_ratios(&a.ratios)?;
    let opts = ChannelOptions { ratio: 0.0, selection: Selection::Local, round_to: a.round_to, min_width: a.min_width };
    opts.validate()?;
    if let Some(t) = a.threshold {
        if !(t.is_finite() && t >= 0.0) {
            return Err(Error::invalid("--threshold", format!("must be a non-negative mIoU drop in points, got {t}")));
        }
    }
    if let Some(x) = a.target_speedup {
        if !(x.is_finite() && x > 1.0) {
            return Err(Error::invalid("--target-speedup", format!("must be a number above 1, got {x}")));
        }
    }
    let ck = Checkpoint::load(&a.model)?;
    let kind = arch_of(&ck, a.arch.map(ArchArg::as_str))?;
    let eval = eval_set(&a.eval, &a.labels)?;
    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    let e = Engine::new(Device::Cpu, Device::Cpu.map_builder(), Grouping::Auto);
    let t0 = Instant::now();
    let scan = bundled("data/semantickitti/sequences/00/velodyne/000000.bin");
    let mut table = match &a.table {
        Some(p) => LatencyTable::load(p)?,
        None => {
            println!("measuring a latency table on {} (width step {}) ...", scan.display(), a.round_to);
            let t = LatencyTable::measure(&e, &ck, kind, &scan, a.round_to, 3, |_, _| {})?;
            t.save(&a.out.join("latency_table.csv"))?;
            t
        }
    };
    // Finer cuts are priced from measured cut entries: measure the sweep's own if the table
    // has none of this kind.
    let has = |t: &LatencyTable| {
        t.cuts.iter().any(|c| match (c.3, granularity) {
            (ConvCut::Offsets { .. }, Granularity::Offset) => true,
            (ConvCut::Sparse(f, _), Granularity::Sparse(g)) => f == g,
            _ => false,
        })
    };
    if granularity != Granularity::Channel && !has(&table) {
        println!("measuring every conv's time at the sweep's {} on {} ...", a.granularity, scan.display());
        let (offs, sparse) = match granularity {
            Granularity::Sparse(f) => (Vec::new(), vec![(f, ratios.clone())]),
            _ => (ratios.clone(), Vec::new()),
        };
        table.check_target(&e)?;
        table.measure_cuts(&e, &ck, kind, &scan, &offs, &sparse, 3, |_, _| {})?;
        table.save(&a.out.join("latency_table.csv"))?;
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} pruned networks evaluated {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let tick = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let s = match granularity {
        Granularity::Channel => sweep(&ck, kind, criterion, &ratios, &opts, &eval, &e, &table, tick)?,
        g => sweep_convs(&ck, kind, g, &ratios, &eval, &e, &table, tick)?,
    };
    bar.finish_and_clear();
    let csv = a.out.join("sensitivity.csv");
    std::fs::write(&csv, s.to_csv()).map_err(|e| Error::io(&csv, e))?;
    plot::sensitivity(&s, &a.out.join("sensitivity.png"), &a.out.join("latency.png"))?;
    println!(
        "{} {} x {} ratios on {} scans in {:.0} s: unpruned mIoU {:.1}%, predicted {:.1} ms; wrote {}, sensitivity.png, latency.png",
        s.units.len(),
        if granularity == Granularity::Channel { "groups" } else { "convs" },
        ratios.len(),
        eval.scans.len(),
        t0.elapsed().as_secs_f64(),
        s.base.0 * 100.0,
        s.base.1 * 1e3,
        csv.display()
    );
    let chosen = match (a.threshold, a.target_speedup) {
        (Some(t), _) => Some((t, s.plan(t / 100.0)?)),
        (None, Some(x)) => {
            let (t, plan, _) = s.plan_for_latency(&table, s.base.1 / x)?;
            Some((t * 100.0, plan))
        }
        (None, None) => None,
    };
    if let Some((t, plan)) = chosen {
        let path = a.out.join("plan.txt");
        plan.save(&path)?;
        let p = prune_to_plan(&ck, kind, criterion, &plan, &[], 0)?;
        let pck = p.checkpoint();
        let m = Model::from_desc(&pck, &p.after)?;
        let (miou, _) = eval.evaluate(&e, &m)?;
        println!(
            "plan for a drop of at most {t:.2} points per unit: widths {} -> {}, {} conv cuts; all together mIoU {:.1}% (unpruned {:.1}%), predicted {:.1} ms -> {:.1} ms; wrote {}",
            p.before.widths_summary(),
            p.after.widths_summary(),
            plan.convs.len(),
            miou * 100.0,
            s.base.0 * 100.0,
            s.base.1 * 1e3,
            table.predict_checkpoint(&pck, &p.after)? * 1e3,
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
