//! `sparseconv prune`: list a model's channel dependency groups, or prune it and print, per
//! conv, the shape, parameters and FLOPs on a scan before and after, with both models timed
//! in alternating rounds in the same run.

use std::path::{Path, PathBuf};

use sparseconv::bench::conv_flops;
use sparseconv::nn::arch::{ArchKind, NetDesc};
use sparseconv::nn::checkpoint::Checkpoint;
use sparseconv::nn::checkpoint::SPARSE_FORMAT;
use sparseconv::pipeline::Model;
use sparseconv::prune::channel::{ChannelOptions, Selection};
use sparseconv::prune::groups::groups;
use sparseconv::prune::importance::Criterion;
use sparseconv::prune::offset::OffsetScope;
use sparseconv::prune::{prune_channels, prune_offsets, prune_sparse, prune_to_plan, Pruned, WidthPlan};
use sparseconv::sparse_weights::Format;
use sparseconv::{Device, Engine, Error, Grouping, Result};

use super::args::{ArchArg, CriterionArg, PruneGranularityArg};
use super::rounds::{alternate, median};

/// `prune`'s arguments.
#[derive(clap::Args)]
pub struct PruneArgs {
    /// Weights to prune (safetensors; any per-layer widths).
    pub model: PathBuf,
    /// Print the channel dependency groups and exit.
    #[arg(long)]
    pub list_groups: bool,
    /// What to remove: `channel` (whole channels of a dependency group), `offset` (whole
    /// kernel offsets of a conv), `element`, `block` (1×16) or `nm` (N:M along Cin, see --nm)
    /// weight sparsity; all but `channel` by L1 magnitude.
    #[arg(long, value_enum, default_value_t = PruneGranularityArg::Channel)]
    pub granularity: PruneGranularityArg,
    /// Channel importance: l1, l2, bn (BatchNorm γ), taylor (needs --data), random.
    #[arg(long, value_enum, default_value_t = CriterionArg::L1)]
    pub criterion: CriterionArg,
    /// Fraction of channels to remove, in [0, 1).
    #[arg(long)]
    pub ratio: Option<f64>,
    /// One threshold over all groups (scores normalized per group) instead of the same ratio
    /// in every group.
    #[arg(long)]
    pub global: bool,
    /// --granularity offset: remove the same offsets from every conv that shares a kernel
    /// map, so the map itself loses them (they are then not even searched for).
    #[arg(long)]
    pub per_map: bool,
    /// A width plan (`sensitivity --threshold`, `amc`) to apply instead of --ratio: every
    /// group keeps the planned number of channels, chosen by --criterion, then the plan's
    /// per-conv cuts (offsets, sparse formats) are applied.
    #[arg(long, conflicts_with_all = ["ratio", "global"])]
    pub plan: Option<PathBuf>,
    /// Kept widths are multiples of this (16: what the AVX-512 microkernel wants).
    #[arg(long, default_value_t = 16)]
    pub round_to: usize,
    /// No group keeps fewer channels.
    #[arg(long, default_value_t = 8)]
    pub min_width: usize,
    /// N:M pattern for --granularity nm (`2:4`, `1:4`, …); --ratio is then ignored.
    #[arg(long)]
    pub nm: Option<String>,
    /// Labelled scans for --criterion taylor (SemanticKITTI roots or points_*.npy).
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Seed of --criterion random.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Architecture (default: the file's metadata, else minkunet).
    #[arg(long)]
    pub arch: Option<ArchArg>,
    /// Where to write the pruned weights.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Scan the report counts FLOPs and times on (default: the bundled SemanticKITTI scan).
    #[arg(long)]
    pub scan: Option<PathBuf>,
    /// Timed runs per model per round (0: no timing).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Alternating rounds.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
}

pub fn arch_of(ck: &Checkpoint, flag: Option<&str>) -> Result<ArchKind> {
    match (flag, ck.metadata().get("arch")) {
        (Some(a), Some(m)) if a != m => {
            Err(Error::format(ck.path(), format!("holds a `{m}` model but --arch {a} was given")))
        }
        (Some(a), _) => ArchKind::parse(a),
        (None, Some(m)) => ArchKind::parse(m),
        (None, None) => Ok(ArchKind::MinkUNet),
    }
}

/// Run the command; `default_scan` is the bundled scan.
pub fn run(a: PruneArgs, default_scan: &Path) -> Result<()> {
    let ck = Checkpoint::load(&a.model)?;
    let kind = arch_of(&ck, a.arch.map(ArchArg::as_str))?;
    let classes = sparseconv::io::kitti::NUM_CLASSES;
    if a.list_groups {
        let desc = NetDesc::from_checkpoint(kind, &ck, classes)?;
        return list_groups(&desc);
    }
    let criterion: Criterion = a.criterion.parse()?;
    let ratio = match (a.ratio, a.granularity.as_str()) {
        (Some(r), _) => r,
        (None, "nm") => 0.0,
        (None, _) if a.plan.is_some() => 0.0,
        (None, _) => return Err(Error::invalid("--ratio", "give the fraction to remove")),
    };
    let selection = if a.global { Selection::Global } else { Selection::Local };
    let opts = ChannelOptions { ratio, selection, round_to: a.round_to, min_width: a.min_width };
    opts.validate()?;
    if a.out.is_none() {
        return Err(Error::invalid("--out", "give the file to write the pruned weights to"));
    }
    let pruned = match a.granularity.as_str() {
        _ if a.plan.is_some() => {
            let plan = WidthPlan::load(a.plan.as_deref().unwrap_or(Path::new("")))?;
            prune_to_plan(&ck, kind, criterion, &plan, &a.data, a.seed)?
        }
        "channel" => prune_channels(&ck, kind, criterion, &opts, &a.data, a.seed)?,
        "offset" if criterion == Criterion::L1 => {
            let scope = if a.per_map { OffsetScope::Map } else { OffsetScope::Conv };
            prune_offsets(&ck, kind, ratio, selection, scope)?
        }
        "element" | "block" | "nm" if criterion != Criterion::L1 => {
            return Err(Error::invalid("--criterion", "weight sparsity ranks weights by l1 magnitude only"));
        }
        "element" => prune_sparse(&ck, kind, Format::Element, ratio, selection)?,
        "block" => prune_sparse(&ck, kind, Format::Block, ratio, selection)?,
        "nm" => {
            let f = Format::parse(a.nm.as_deref().unwrap_or("2:4")).map_err(|_| {
                Error::invalid("--nm", format!("expected N:M such as 2:4, got `{}`", a.nm.as_deref().unwrap_or("")))
            })?;
            prune_sparse(&ck, kind, f, 0.0, selection)?
        }
        "offset" => {
            return Err(Error::invalid("--criterion", "offset pruning ranks offsets by l1 magnitude only"));
        }
        other => {
            return Err(Error::invalid(
                "--granularity",
                format!("expected channel, offset, element, block or nm, got `{other}`"),
            ))
        }
    };
    for n in &pruned.notes {
        println!("{n}");
    }
    if pruned.metadata.keys().any(|k| k.starts_with(SPARSE_FORMAT)) {
        println!("sparse formats run on the CPU's sparse kernels where those time faster; on the GPU they run dense");
    }
    let before = Model::from_desc(&ck, &pruned.before)?;
    let after = Model::from_desc(&pruned.checkpoint(), &pruned.after)?;
    let scan = a.scan.clone().unwrap_or_else(|| default_scan.to_path_buf());
    let threads = rayon::current_num_threads();
    println!(
        "{} widths {} -> {} ({} groups, {} prunable); parameters {} -> {}",
        kind.name(),
        pruned.before.widths_summary(),
        pruned.after.widths_summary(),
        pruned.groups.len(),
        pruned.groups.iter().filter(|g| g.prunable).count(),
        pruned.before.parameters(),
        pruned.after.parameters()
    );
    if let Some(how) = pruned.metadata.get("pruned") {
        println!("pruned: {how}");
    }
    let (eb, ea) = (engine(), engine());
    let runs = a.runs.max(1);
    let rounds = if a.runs == 0 { 1 } else { a.rounds.max(1) };
    let m = alternate(std::slice::from_ref(&scan), &[(&eb, &before), (&ea, &after)], 1, runs, rounds, true)?;
    println!("{:<4} {:<26} {:>18} {:>17} {:>17} {:>15}", "#", "conv", "Cin x Cout", "params", "MFLOP on scan", "ms");
    let convs_b = pruned.before.convs();
    let convs_a = pruned.after.convs();
    let (mut fb, mut fa) = (0.0, 0.0);
    // Offsets kept / all, pairs run after / before, over every conv.
    let (mut ko, mut vo, mut pa, mut pb) = (0usize, 0usize, 0usize, 0usize);
    for (i, ((lb, tb), (la, ta))) in m[0].layers.iter().zip(&m[1].layers).enumerate() {
        let (cb, ca) = (convs_b.get(i), convs_a.get(i));
        let name = cb.map_or("?".to_string(), |c| c.kernel.trim_end_matches(".kernel").to_string());
        let vol = cb.map_or(1, |c| c.spec.volume());
        let kept = cb.and_then(|c| pruned.offsets.get(&c.kernel)).map_or(vol, Vec::len);
        let params = |c: Option<&&sparseconv::nn::arch::ConvDesc>, k: usize| {
            c.map_or(0, |c| c.kernel_shape().iter().product::<usize>() / c.spec.volume() * k)
        };
        // A sparse-format layer does the multiply-adds of its nonzeros only (over the offsets
        // it keeps).
        let density = ca
            .filter(|c| pruned.metadata.contains_key(&format!("{SPARSE_FORMAT}{}", c.kernel)))
            .and_then(|c| pruned.tensors.get(&c.kernel))
            .map_or(1.0, |t| {
                let per = (la.cin * la.cout).max(1);
                let kept: Vec<&[f32]> = t.data.chunks(per).filter(|o| o.iter().any(|&v| v != 0.0)).collect();
                let nz = kept.iter().map(|o| o.iter().filter(|&&v| v != 0.0).count()).sum::<usize>();
                nz as f64 / (kept.len() * per).max(1) as f64
            });
        let (flb, fla) = (conv_flops(lb.pairs, lb.cin, lb.cout), conv_flops(la.pairs, la.cin, la.cout) * density);
        fb += flb;
        fa += fla;
        (ko, vo, pa, pb) = (ko + kept, vo + vol, pa + la.pairs, pb + lb.pairs);
        println!(
            "{:<4} {:<24} {:>17} {:>8} {:>17} {:>17} {:>15} {:>15}  {}",
            i + 1,
            name,
            format!("{}x{} -> {}x{}", lb.cin, lb.cout, la.cin, la.cout),
            format!("{kept}/{vol}"),
            format!("{} -> {}", params(cb, vol), params(ca, kept)),
            format!("{} -> {}", lb.pairs, la.pairs),
            format!("{:.0} -> {:.0}", flb / 1e6, fla / 1e6),
            if a.runs == 0 { "-".to_string() } else { format!("{:.2} -> {:.2}", median(tb) * 1e3, median(ta) * 1e3) },
            la.plan
        );
    }
    println!(
        "all convs: offsets kept {ko}/{vo} ({:.1}%), pairs run {pa}/{pb} ({:.1}%), FLOPs {:.2} -> {:.2} GFLOP",
        100.0 * ko as f64 / vo.max(1) as f64,
        100.0 * pa as f64 / pb.max(1) as f64,
        fb / 1e9,
        fa / 1e9
    );
    print_map_offsets(&pruned);
    if a.runs > 0 {
        println!("kernel maps: {:.1} ms -> {:.1} ms", median(&m[0].maps) * 1e3, median(&m[1].maps) * 1e3);
        let ratios: Vec<String> =
            m[0].round_medians.iter().zip(&m[1].round_medians).map(|(b, a)| format!("{:.2}x", b / a)).collect();
        println!(
            "end to end on {} ({threads} threads, {runs} runs x {rounds} alternating rounds): {:.1} ms -> {:.1} ms, speed-up per round {}; conv FLOPs ratio {:.2}x",
            scan.display(),
            median(&m[0].totals) * 1e3,
            median(&m[1].totals) * 1e3,
            ratios.join(" "),
            fb / fa.max(1.0)
        );
    }
    if let Some(out) = &a.out {
        pruned.save(out)?;
        println!("wrote {}", out.display());
    }
    Ok(())
}

/// The offsets each kernel map is built for: the union over the convs sharing it
/// (`MinkUNet::share_map_offsets`), printed for the maps that lose any.
fn print_map_offsets(pruned: &Pruned) {
    let (convs, maps) = (pruned.after.convs(), pruned.after.conv_maps());
    let mut used: Vec<((i32, sparseconv::KernelSpec), Vec<bool>)> = Vec::new();
    for (c, key) in convs.iter().zip(maps) {
        let vol = c.spec.volume();
        let kept = pruned.offsets.get(&c.kernel);
        let mask: Vec<bool> = (0..vol).map(|o| kept.is_none_or(|k| k.contains(&o))).collect();
        match used.iter_mut().find(|(k, _)| *k == key) {
            Some((_, u)) => u.iter_mut().zip(&mask).for_each(|(u, &m)| *u |= m),
            None => used.push((key, mask)),
        }
    }
    let lost: Vec<String> = used
        .iter()
        .filter(|(_, u)| u.iter().any(|&b| !b))
        .map(|((s, spec), u)| {
            format!("stride {s} k{} s{}: {}/{}", spec.size, spec.stride, u.iter().filter(|&&b| b).count(), u.len())
        })
        .collect();
    if !lost.is_empty() {
        println!("kernel maps built for the offsets their convs keep: {}", lost.join(", "));
    }
}

fn engine() -> Engine {
    let d = Device::Cpu;
    let b = d.map_builder();
    Engine::new(d, b, Grouping::Auto)
}

fn list_groups(desc: &NetDesc) -> Result<()> {
    let gs = groups(desc)?;
    println!(
        "{} channel dependency groups of {} (widths {}), {} prunable",
        gs.len(),
        desc.kind.name(),
        desc.widths_summary(),
        gs.iter().filter(|g| g.prunable).count()
    );
    for g in &gs {
        let producers: Vec<String> = g.producers().map(|s| s.tensor.clone()).collect();
        let consumers: Vec<String> = g
            .consumers()
            .map(|s| if s.offset > 0 { format!("{}[+{}]", s.tensor, s.offset) } else { s.tensor.clone() })
            .collect();
        println!(
            "group {:>2}: {:>3} channels{}\n  written by {}\n  read by    {}",
            g.id,
            g.width,
            if g.prunable { "" } else { " (fixed: network input or logits)" },
            if producers.is_empty() { "-".to_string() } else { producers.join(", ") },
            if consumers.is_empty() { "-".to_string() } else { consumers.join(", ") }
        );
    }
    Ok(())
}
