//! `sparseconv bench`: throughput of the segmentation network, alone or against a baseline
//! model in alternating rounds.

use crate::cli::check_device;
use crate::*;
use sparseconv::bench::{conv_flops, Stats};
use sparseconv::io::kitti::NUM_CLASSES;
use sparseconv::pipeline;
use sparseconv::{Device, Engine, Error, Grouping, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[allow(clippy::too_many_arguments)]
pub(crate) fn cmd_bench(
    scans: &[PathBuf],
    model: Option<PathBuf>,
    arch: Option<&str>,
    cr: f32,
    device: &str,
    warmup: usize,
    runs: usize,
    json: bool,
    layers: bool,
    batch: usize,
) -> Result<()> {
    if batch == 0 {
        return Err(Error::invalid("--batch", "must be at least 1"));
    }
    let device = check_device(device)?;
    let on_cpu = matches!(device, Device::Cpu);
    if scans.is_empty() {
        return Err(Error::invalid("bench", "give at least one scan"));
    }
    if runs == 0 {
        return Err(Error::invalid("--runs", "must be at least 1"));
    }
    let (model, cr, source) = match model {
        Some(p) => {
            let (mut m, cr) = pipeline::Model::load(&p, arch, None)?;
            let voxel = cli::voxel::apply(&mut m)?.map(|l| format!(", {l}")).unwrap_or_default();
            (m, cr, format!("{}{voxel}", p.display()))
        }
        None => {
            let ck = sparseconv::nn::checkpoint::Checkpoint::random(1);
            let m = pipeline::Model::load_arch(arch.unwrap_or("minkunet"), &ck, cr, NUM_CLASSES)?;
            (m, cr, "synthetic weights (throughput only)".to_string())
        }
    };
    let arch = model.arch();
    let builder = device.map_builder();
    let engine = new_engine(device, builder, Grouping::Auto)?;
    let bar = indicatif::ProgressBar::new((scans.len() * (warmup + runs)) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} runs {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    if json || scans.len() * (warmup + runs) < 20 {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let (mut vox, mut maps, mut prune, mut conv, mut other, mut total) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut points, mut voxels) = (0usize, 0usize);
    let mut layer_times: Vec<(sparseconv::device::LayerTrace, Vec<f64>)> = Vec::new();
    // GPU dispatches and submits over the measured runs.
    let mut gpu_work = (0u64, 0u64);
    for scan in scans {
        for r in 0..warmup + runs {
            let mut t = pipeline::Timings::default();
            if layers && r >= warmup {
                engine.start_trace();
            }
            let c0 = gpu_counters(&engine);
            let t0 = Instant::now();
            let p = if batch == 1 {
                pipeline::prepare_file(scan, None, pipeline::VoxelizeMode::Mean)?
            } else {
                let clouds = (0..batch).map(|_| sparseconv::io::read_points(scan, None)).collect::<Result<Vec<_>>>()?;
                pipeline::prepare_batch(&clouds)?
            };
            t.voxelize = t0.elapsed().as_secs_f64();
            let seg = pipeline::segment(&engine, &model, &p, &mut t)?;
            std::hint::black_box(&seg.point_labels);
            if r >= warmup {
                let c1 = gpu_counters(&engine);
                gpu_work = (gpu_work.0 + c1.0 - c0.0, gpu_work.1 + c1.1 - c0.1);
                vox.push(t.voxelize);
                maps.push(t.kernel_maps);
                prune.push(t.voxel_prune);
                conv.push(t.conv);
                other.push(t.other);
                total.push(t.total());
                points += p.points;
                voxels += p.voxels.len();
                for (i, l) in engine.take_trace().into_iter().enumerate() {
                    if layer_times.len() <= i {
                        layer_times.push((l.clone(), Vec::new()));
                    }
                    layer_times[i].1.push(l.seconds);
                }
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let n = total.len() as f64;
    let sum: f64 = total.iter().sum();
    let st = |v: Vec<f64>| Stats::from_samples(v);
    let pruning = prune.iter().any(|&s| s > 0.0);
    let (v, m, p, c, o, t) = (st(vox), st(maps), st(prune), st(conv), st(other), st(total));
    let threads = rayon::current_num_threads();
    let device_name = match engine.device() {
        Device::Cpu => format!("cpu ({})", precision_name(&engine)),
        Device::Gpu(c) => format!("gpu {} ({:?})", c.describe(), engine.precision()),
    };
    if json {
        let report = serde_json::json!({
            "arch": arch,
            "cr": cr,
            "device": device_name,
            "threads": threads,
            "scans": scans.len(),
            "runs": t.runs,
            "scans_per_s": n / sum,
            "points_per_s": points as f64 / sum,
            "median_s": {
                "voxelize": v.median,
                "kernel_maps": m.median,
                "voxel_prune": p.median,
                "conv": c.median,
                "other": o.median,
                "total": t.median,
            },
            "mad_s": { "total": t.mad },
        });
        println!("{report}");
    } else {
        println!(
            "{arch} cr={cr} ({source}) on {device_name}, {threads} CPU threads: {} scans x {runs} runs, {:.0} points and {:.0} voxels per scan",
            scans.len(),
            points as f64 / n,
            voxels as f64 / n
        );
        println!("{:<13} {:>10} {:>10} {:>10} {:>10}", "stage", "median ms", "mad ms", "min ms", "max ms");
        let mut stages = vec![("voxelize", v), ("kernel maps", m)];
        if pruning {
            // Scoring and selecting voxels, restricting maps, filling pruned rows.
            stages.push(("voxel pruning", p));
        }
        stages.extend([("conv", c), ("other", o), ("total", t)]);
        for (name, s) in stages {
            println!(
                "{:<13} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
                name,
                s.median * 1e3,
                s.mad * 1e3,
                s.min * 1e3,
                s.max * 1e3
            );
        }
        println!(
            "{:.2} scans/s, {:.0} points/s (end to end: points in, labels out){}",
            n * batch as f64 / sum,
            points as f64 / sum,
            if batch > 1 { format!("; batches of {batch}") } else { String::new() }
        );
        if let Some((_, peak)) = cli::memory_mib() {
            println!("peak resident memory: {peak:.0} MiB");
        }
        if gpu_work.0 > 0 {
            println!(
                "GPU work per scan: {:.0} dispatches in {:.0} submits",
                gpu_work.0 as f64 / n,
                gpu_work.1 as f64 / n
            );
        }
        if layers && !layer_times.is_empty() {
            println!(
                "{:<4} {:<28} {:>15} {:>8} {:>9} {:>8} {:>14} {:>9}",
                "#", "conv", "rows in->out", "pairs", "ms", "GFLOP/s", "plan", "dense ms"
            );
            let (mut sum_ms, mut sum_dense, mut flops) = (0.0, 0.0, 0.0);
            for (i, (l, ts)) in layer_times.into_iter().enumerate() {
                let st = Stats::from_samples(ts);
                sum_ms += st.median * 1e3;
                flops += conv_flops(l.pairs, l.cin, l.cout);
                // The floor: one dense GEMM [pairs, Cin] x [Cin, Cout] (same FLOPs, no gather,
                // no scatter) on the same threads, timed here in the same run.
                let dense = on_cpu.then(|| dense_floor_ms(l.pairs, l.cin, l.cout));
                sum_dense += dense.unwrap_or(0.0);
                println!(
                    "{:<4} {:<28} {:>15} {:>8} {:>9.2} {:>8.1} {:>14} {:>9}",
                    i + 1,
                    format!("{:?} k{} s{} {}->{}", l.kind, l.spec.size, l.spec.stride, l.cin, l.cout),
                    format!("{}->{}", l.n_in, l.n_out),
                    l.pairs,
                    st.median * 1e3,
                    st.gflops(conv_flops(l.pairs, l.cin, l.cout)),
                    l.plan,
                    dense.map_or("-".to_string(), |d| format!("{d:.2}"))
                );
            }
            if on_cpu {
                println!(
                    "sum of conv medians: {sum_ms:.1} ms for {:.2} GFLOP; the same FLOPs as dense GEMMs: {sum_dense:.1} ms",
                    flops / 1e9
                );
            } else {
                println!("sum of conv medians: {sum_ms:.1} ms for {:.2} GFLOP", flops / 1e9);
            }
        }
    }
    Ok(())
}

/// `bench --model M --baseline B`: both models in alternating rounds, the speed ratio per round.
pub(crate) fn cmd_bench_baseline(
    scans: &[PathBuf],
    model: Option<PathBuf>,
    baseline: &Path,
    baseline_precision: Precision,
    device: &str,
    warmup: usize,
    runs: usize,
    rounds: usize,
) -> Result<()> {
    use cli::rounds::{alternate, median};
    let model = model.ok_or_else(|| Error::invalid("--baseline", "needs --model"))?;
    if scans.is_empty() {
        return Err(Error::invalid("bench", "give at least one scan"));
    }
    if runs == 0 || rounds == 0 {
        return Err(Error::invalid("--runs/--rounds", "must be at least 1"));
    }
    let device = check_device(device)?;
    let (mut m, _) = pipeline::Model::load(&model, None, None)?;
    // Voxel pruning applies to --model only: the baseline is the network unpruned.
    if let Some(line) = cli::voxel::apply(&mut m)? {
        println!("model: {line}");
    }
    let (b, _) = pipeline::Model::load(baseline, None, None)?;
    let (em, eb) = (
        new_engine(device.clone(), device.map_builder(), Grouping::Auto)?,
        engine_in(baseline_precision, device.clone(), device.map_builder(), Grouping::Auto)?,
    );
    let r = alternate(scans, &[(&eb, &b), (&em, &m)], warmup.max(1), runs, rounds, false)?;
    let threads = rayon::current_num_threads();
    println!(
        "{} scans x {runs} runs x {rounds} alternating rounds, {threads} CPU threads, device {}",
        scans.len(),
        if device == Device::Cpu { "cpu" } else { "gpu" }
    );
    for (name, path, d, e, x) in
        [("baseline", baseline, b.desc(), &eb, &r[0]), ("model", model.as_path(), m.desc(), &em, &r[1])]
    {
        let rounds: Vec<String> = x.round_medians.iter().map(|v| format!("{:.1}", v * 1e3)).collect();
        println!(
            "{name:<9} {} ({} widths {}, {}): median {:.1} ms; per round {} ms",
            path.display(),
            d.kind.name(),
            d.widths_summary(),
            precision_name(e),
            median(&x.totals) * 1e3,
            rounds.join(" ")
        );
    }
    let ratios: Vec<String> =
        r[0].round_medians.iter().zip(&r[1].round_medians).map(|(b, m)| format!("{:.2}x", b / m)).collect();
    println!(
        "speed-up of model over baseline: {:.2}x (per round {})",
        median(&r[0].totals) / median(&r[1].totals),
        ratios.join(" ")
    );
    Ok(())
}

/// The precision an engine's convs really run in (bf16 without AVX512_BF16 runs f32).
pub(crate) fn precision_name(e: &Engine) -> &'static str {
    match e.precision() {
        Precision::F32 => "f32",
        Precision::F16 => "f16",
        Precision::Bf16 if e.device() == &Device::Cpu && !sparseconv::cpu::bf16::available() => "f32 (no AVX512_BF16)",
        Precision::Bf16 => "bf16",
    }
}

/// Dispatches and submits of the engine's GPU context so far (zeros on the CPU).
pub(crate) fn gpu_counters(engine: &Engine) -> (u64, u64) {
    match engine.device() {
        Device::Cpu => (0, 0),
        Device::Gpu(c) => c.counters(),
    }
}

/// Median of three timings of a dense `[m, k] x [k, n]` GEMM on the current rayon threads.
pub(crate) fn dense_floor_ms(m: usize, k: usize, n: usize) -> f64 {
    use sparseconv::cpu::gemm::gemm_parallel;
    let a = sparseconv::bench::pseudo_random(m * k, 1, 1.0);
    let b = sparseconv::bench::pseudo_random(k * n, 2, 1.0);
    let mut c = vec![0f32; m * n];
    let threads = rayon::current_num_threads();
    let mut t: Vec<f64> = (0..3)
        .map(|_| {
            let s = std::time::Instant::now();
            gemm_parallel(m, k, n, &a, &b, &mut c, threads);
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[1]
}
