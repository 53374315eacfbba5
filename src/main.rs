//! The `sparseconv` command line: `conv` runs one sparse convolution on safetensors files,
//! `stack` voxelizes a scan and runs a stack of conv layers over it, timing every step.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use cli::args::{ArchArg, DeviceArg, PointFormatArg, PrecisionArg, VoxelizeArg};

mod cli;
use cli::{bundled, check_device, default_yaml, ground_truth};

// Large feature buffers are allocated and freed every layer; glibc returns them to the OS
// (munmap), and on a multi-threaded process every munmap costs TLB-shootdown interrupts on
// all cores. mimalloc keeps and reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use sparseconv::bench::{conv_flops, pseudo_random, Stats};
use sparseconv::gpu::conv::Precision;
use sparseconv::io::kitti::{read_label, write_label, LearningMap, NUM_CLASSES};
use sparseconv::io::tensors::{write, OutTensor, TensorFile};
use sparseconv::io::PointFormat;
use sparseconv::pipeline;
use sparseconv::voxel::voxelize;
use sparseconv::{ConvWeight, CoordSet, Device, Engine, Error, Grouping, KernelSpec, MapBuilder, Result, SparseTensor};

#[derive(Parser)]
#[command(name = "sparseconv", version, about = "Point-cloud sparse convolution engine")]
struct Cli {
    /// CPU threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// GPU storage precision of features and weights: `f32` (strict, default) or `f16` (packed
    /// halves, f32 accumulation; relative error below 5e-3 on the tested layers).
    #[arg(long, global = true, value_enum, default_value_t = PrecisionArg::F32)]
    precision: PrecisionArg,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum KmapArg {
    Hash,
    Sort,
}

#[derive(Clone, Copy, ValueEnum)]
enum GroupingArg {
    /// Tune tolerance and size threshold per layer by timing.
    Auto,
    /// One GEMM per kernel offset.
    Off,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one sparse convolution: IN holds `coords` (I32 [N,4]) and `feats` (F32 [N,Cin]);
    /// W holds `kernel` (F32 [K^3,Cin,Cout], TorchSparse offset order) and optional `bias`.
    Conv {
        /// Input tensors (safetensors).
        #[arg(long)]
        input: PathBuf,
        /// Weights (safetensors).
        #[arg(long)]
        weight: PathBuf,
        /// Kernel size per axis.
        #[arg(long)]
        kernel_size: u32,
        /// Stride (1 = submanifold; >1 = downsampling to S*floor(c/S)).
        #[arg(long, default_value_t = 1)]
        stride: u32,
        /// Dilation.
        #[arg(long, default_value_t = 1)]
        dilation: u32,
        /// Kernel-map builder.
        #[arg(long, value_enum, default_value_t = KmapArg::Hash)]
        kmap: KmapArg,
        /// Offset grouping.
        #[arg(long, value_enum, default_value_t = GroupingArg::Auto)]
        grouping: GroupingArg,
        /// Device: `cpu`, or `gpu` (wgpu; SPARSECONV_ADAPTER picks the adapter by name).
        #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
        device: DeviceArg,
        /// Output tensors (safetensors): `coords` and `feats`.
        #[arg(long)]
        output: PathBuf,
    },
    /// Segment a LiDAR scan with MinkUNet or SPVCNN: a class for every point.
    Segment(SegmentArgs),
    /// Per-class IoU and mIoU against ground truth, of predicted `.label` files or of scans
    /// segmented on the fly with --model.
    Eval {
        /// Predicted `.label` files (raw SemanticKITTI ids) or scans to segment.
        preds: Vec<PathBuf>,
        /// Weights for the scans among PREDS.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Ground-truth `.label` files, one per prediction.
        #[arg(long, num_args = 1.., required = true)]
        labels: Vec<PathBuf>,
        /// The SemanticKITTI yaml (learning map).
        #[arg(long)]
        yaml: Option<PathBuf>,
    },
    /// Throughput of the segmentation network: warm-up, repeated runs, per-stage breakdown.
    Bench {
        /// Scans to run (each is timed separately and the results pooled).
        scans: Vec<PathBuf>,
        /// Weights; without them, synthetic weights of the same shapes (throughput only).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Architecture (default: the weights' metadata; `minkunet` for synthetic weights).
        #[arg(long)]
        arch: Option<ArchArg>,
        /// Width factor (for synthetic weights; ignored with --model).
        #[arg(long, default_value_t = 0.5)]
        cr: f32,
        /// Device.
        #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
        device: DeviceArg,
        /// Untimed warm-up runs per scan (the first also tunes the grouping).
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Timed runs per scan.
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
        /// Also print every conv layer's median time and GFLOP/s.
        #[arg(long)]
        layers: bool,
        /// A second model timed in alternating rounds with --model (same scans, threads and
        /// runs); prints both and the speed ratio per round.
        #[arg(long, requires = "model")]
        baseline: Option<PathBuf>,
        /// Alternating rounds with --baseline.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Prune a model: list its channel dependency groups, or remove channels and write a
    /// smaller model, printing per conv the shapes, parameters, FLOPs and measured times.
    Prune(cli::prune::PruneArgs),
    /// Prune one channel group at a time at each ratio: mIoU on labelled scans and predicted
    /// latency per point (CSV and plots); --threshold writes a width plan for `prune --plan`.
    Sensitivity(cli::sensitivity::SensitivityArgs),
    /// Measure every conv's time at every width on the pruning grid, on this machine (the
    /// table pruning searches price candidates with); --check compares its predictions with
    /// measured end-to-end times of pruned models.
    LatencyTable(cli::latency_table::LatencyTableArgs),
    /// NetAdapt: narrow one channel group per iteration to meet a decaying latency cut
    /// (priced by a latency table), fine-tune each proposal briefly, keep the best by mIoU;
    /// resumable; ends with a longer fine-tune and a timed comparison.
    Netadapt(cli::netadapt::NetAdaptArgs),
    /// AMC: a DDPG agent picks per-group keep ratios under a FLOPs or latency budget
    /// (evaluated without fine-tuning); its best policy is then compared with uniform pruning
    /// at the same budget after the same fine-tune.
    Amc(cli::amc::AmcArgs),
    /// Iterative magnitude pruning: prune the smallest conv weights globally, train, repeat on
    /// an AGP, fixed or geometric schedule; each round fine-tunes, rewinds to an early step
    /// (lottery tickets) or re-initializes; resumable per round.
    Imp(cli::imp::ImpArgs),
    /// BatchNorm |γ| quantiles and a histogram PNG for one or more models (network slimming:
    /// train with `l1: {"@bn": λ}`, then `prune --criterion bn`).
    BnGamma(cli::gamma::GammaArgs),
    /// Segment the bundled SemanticKITTI scan with the bundled model: class counts, IoU against
    /// the bundled labels, time taken, and a rerun recording (with the `rerun` feature).
    Demo {
        /// Where to write the rerun recording.
        #[arg(long, default_value = "demo.rrd")]
        rerun: PathBuf,
        /// Weights to run instead of the bundled model (a pruned model, say:
        /// `data/models/minkunet_cr0.5_pruned.safetensors`).
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Train a segmentation network (MinkUNet) on labelled scans; writes a resumable checkpoint
    /// that `segment --model` also loads, a per-step log, and optionally inference weights.
    Train {
        /// YAML config (keys: arch, cr, data, eval, epochs, batch, optimizer, lr, momentum,
        /// weight_decay, warmup, schedule, min_lr, seed, augment, eval_every, save_every,
        /// rewind_at, l1, l2).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Output folder: checkpoint.safetensors (weights + optimizer state) and log.csv.
        #[arg(long)]
        out: PathBuf,
        /// Continue the run saved in this checkpoint (with its stored config unless --config).
        #[arg(long, conflicts_with = "init")]
        resume: Option<PathBuf>,
        /// Start from these weights instead of a fresh init: a pruned network keeps its
        /// structure, and its `mask.*` tensors, sparse-format and offset-pruned kernels keep
        /// their zeros exactly.
        #[arg(long)]
        init: Option<PathBuf>,
        /// Multiply the learning rate by this (default: 0.1 with --init, the usual rate for
        /// fine-tuning a trained or pruned network; 1 otherwise).
        #[arg(long)]
        lr_scale: Option<f64>,
        /// Training data (overrides the config): SemanticKITTI roots or points_*.npy files.
        #[arg(long, num_args = 1..)]
        data: Vec<PathBuf>,
        /// Epochs (overrides the config).
        #[arg(long)]
        epochs: Option<usize>,
        /// Stop after this many steps of the run (resume later); the schedule still spans the
        /// whole run.
        #[arg(long)]
        max_steps: Option<usize>,
        /// At the end, write inference-only weights here.
        #[arg(long)]
        export: Option<PathBuf>,
        /// Write the exported weights in f16.
        #[arg(long)]
        half: bool,
    },
    /// Write randomly initialised (untrained) weights for an architecture: the starting point of
    /// training, and test input for cross-checks against other engines.
    InitWeights {
        /// Output safetensors file.
        output: PathBuf,
        /// Architecture.
        #[arg(long, value_enum, default_value_t = ArchArg::MinkUNet)]
        arch: ArchArg,
        /// Width factor.
        #[arg(long, default_value_t = 0.5)]
        cr: f32,
        /// Seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Voxelize a scan, build its kernel maps and run an 8-layer encoder/decoder stack of
    /// sparse convs (synthetic weights) over it, printing what ran and how fast.
    Stack {
        /// Point cloud (.bin SemanticKITTI, .pcd.bin nuScenes, .ply, .npy).
        scan: PathBuf,
        /// Override the format detected from the file name.
        #[arg(long)]
        format: Option<PointFormatArg>,
        /// Voxel size in metres.
        #[arg(long, default_value_t = 0.05)]
        voxel_size: f32,
        /// Kernel-map builder.
        #[arg(long, value_enum, default_value_t = KmapArg::Sort)]
        kmap: KmapArg,
        /// Offset grouping.
        #[arg(long, value_enum, default_value_t = GroupingArg::Auto)]
        grouping: GroupingArg,
        /// Device: `cpu` or `gpu`.
        #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
        device: DeviceArg,
        /// Timed repetitions (after one warm-up that also tunes the grouping).
        #[arg(long, default_value_t = 5)]
        repeat: usize,
    },
}

fn engine(kmap: KmapArg, grouping: GroupingArg, device: &str) -> Result<Engine> {
    let b = match kmap {
        KmapArg::Hash => MapBuilder::Hash,
        KmapArg::Sort => MapBuilder::Sort,
    };
    let g = match grouping {
        GroupingArg::Auto => Grouping::Auto,
        GroupingArg::Off => Grouping::Off,
    };
    new_engine(check_device(device)?, b, g)
}

static PRECISION: std::sync::OnceLock<Precision> = std::sync::OnceLock::new();

/// An engine with the `--precision` chosen on the command line.
fn new_engine(device: Device, builder: MapBuilder, grouping: Grouping) -> Result<Engine> {
    let p = PRECISION.get().copied().unwrap_or_default();
    if p == Precision::F16 && device == Device::Cpu {
        return Err(Error::invalid("--precision", "f16 is a GPU mode: add --device gpu"));
    }
    Ok(Engine::new(device, builder, grouping).with_precision(p))
}

/// `mi_option_purge_delay` in the bundled mimalloc v2 (`mimalloc.h`, enum `mi_option_e`).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // Keep freed pages mapped: every layer frees and allocates multi-megabyte feature buffers,
    // and handing them back to the OS makes the next layer page-fault them in again.
    // SAFETY: setting an allocator option has no memory-safety preconditions.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{}", one_line(&e.render().to_string()));
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// A clap error as the one line every other error gets: its message and, for a bad choice,
/// the possible values; not the usage block.
fn one_line(rendered: &str) -> String {
    rendered
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        if n == 0 {
            return Err(Error::invalid("--threads", "must be at least 1"));
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| Error::invalid("--threads", e.to_string()))?;
    }
    let precision = match cli.precision {
        PrecisionArg::F32 => Precision::F32,
        PrecisionArg::F16 => Precision::F16,
    };
    let _ = PRECISION.set(precision);
    match cli.cmd {
        Cmd::Conv { input, weight, kernel_size, stride, dilation, kmap, grouping, device, output } => {
            cmd_conv(&input, &weight, kernel_size, stride, dilation, engine(kmap, grouping, device.as_str())?, &output)
        }
        Cmd::Segment(args) => cmd_segment(args),
        Cmd::Eval { preds, model, labels, yaml } => cmd_eval(&preds, model, &labels, yaml),
        Cmd::Bench { scans, model, baseline: Some(base), rounds, warmup, runs, device, .. } => {
            cmd_bench_baseline(&scans, model, &base, device.as_str(), warmup, runs, rounds)
        }
        Cmd::Bench { scans, model, arch, cr, device, warmup, runs, json, layers, .. } => {
            cmd_bench(&scans, model, arch.map(ArchArg::as_str), cr, device.as_str(), warmup, runs, json, layers)
        }
        Cmd::Prune(args) => cli::prune::run(args, &bundled("data/semantickitti/sequences/00/velodyne/000000.bin")),
        Cmd::Sensitivity(args) => cli::sensitivity::run(args),
        Cmd::LatencyTable(args) => cli::latency_table::run(args),
        Cmd::Netadapt(args) => cli::netadapt::run(args),
        Cmd::Amc(args) => cli::amc::run(args),
        Cmd::Imp(args) => cli::imp::run(args),
        Cmd::BnGamma(args) => cli::gamma::run(args),
        Cmd::Demo { rerun, model } => cmd_demo(rerun, model),
        Cmd::Train { config, out, resume, init, lr_scale, data, epochs, max_steps, export, half } => {
            cmd_train(config, &out, resume, init, lr_scale, data, epochs, max_steps, export, half)
        }
        Cmd::InitWeights { output, arch, cr, seed } => {
            let arch = arch.as_str();
            let ck = sparseconv::nn::checkpoint::Checkpoint::random(seed);
            pipeline::Model::load_arch(arch, &ck, cr, NUM_CLASSES)?;
            let mut meta = std::collections::HashMap::new();
            meta.insert("arch".to_string(), arch.to_string());
            meta.insert("cr".to_string(), cr.to_string());
            meta.insert("classes".to_string(), NUM_CLASSES.to_string());
            meta.insert("voxel_size".to_string(), pipeline::VOXEL_SIZE.to_string());
            meta.insert("trained".to_string(), "false".to_string());
            sparseconv::nn::checkpoint::save(&output, &ck.synthesized(), meta, false)?;
            println!("wrote untrained {arch} cr={cr} weights to {}", output.display());
            Ok(())
        }
        Cmd::Stack { scan, format, voxel_size, kmap, grouping, device, repeat } => {
            let format = format.map(|f| f.as_str().parse::<PointFormat>()).transpose()?;
            cmd_stack(&scan, format, voxel_size, engine(kmap, grouping, device.as_str())?, repeat)
        }
    }
}

fn read_weight(path: &Path, spec: KernelSpec, cin: usize) -> Result<ConvWeight> {
    let f = TensorFile::open(path)?;
    let k = f.f32("kernel", 3)?;
    let vol = spec.volume();
    if k.shape[0] != vol || k.shape[1] != cin {
        return Err(Error::format(
            path,
            format!(
                "tensor `kernel` has shape {:?}, expected [{vol}, {cin}, Cout] for kernel size {} and {cin} input channels",
                k.shape, spec.size
            ),
        ));
    }
    let cout = k.shape[2];
    let bias = if f.contains("bias") {
        let b = f.f32("bias", 1)?;
        if b.shape[0] != cout {
            return Err(Error::format(path, format!("tensor `bias` has shape {:?}, expected [{cout}]", b.shape)));
        }
        Some(b.data)
    } else {
        None
    };
    if let Some(i) = k.data.iter().position(|v| !v.is_finite()) {
        return Err(Error::format(path, format!("tensor `kernel` has a NaN or infinite value at index {i}")));
    }
    ConvWeight::new(k.data, vol, cin, cout, bias).map_err(|e| e.in_file(path))
}

fn cmd_conv(input: &Path, weight: &Path, k: u32, s: u32, d: u32, engine: Engine, output: &Path) -> Result<()> {
    let spec = KernelSpec::new(k, s, d)?;
    let x = sparseconv::io::tensors::read_voxels(input)?;
    let w = read_weight(weight, spec, x.channels())?;
    let t0 = Instant::now();
    let y = engine.conv(&x, &w, spec)?;
    let dt = t0.elapsed().as_secs_f64();
    let coords: Vec<i32> = y.coords().iter().flatten().copied().collect();
    write(
        output,
        vec![
            ("coords", OutTensor::I32(&coords, vec![y.len(), 4])),
            ("feats", OutTensor::F32(y.feats(), vec![y.len(), y.channels()])),
        ],
        None,
    )?;
    eprintln!(
        "conv k{k} s{s} d{d}: {} x {} -> {} x {} in {:.2} ms; wrote {}",
        x.len(),
        x.channels(),
        y.len(),
        y.channels(),
        dt * 1e3,
        output.display()
    );
    Ok(())
}

/// One layer of the demo stack.
enum Layer {
    /// Submanifold or strided conv.
    Conv(u32, u32, usize, usize),
    /// Transposed k2 s2 conv back to the coordinates of an earlier layer's output.
    Up(usize, usize, usize),
}

fn cmd_stack(scan: &Path, format: Option<PointFormat>, voxel_size: f32, engine: Engine, repeat: usize) -> Result<()> {
    let cloud = sparseconv::io::read_points(scan, format)?;
    if cloud.is_empty() {
        return Err(Error::format(scan, "the scan holds no points"));
    }
    // x, y, z, and the fourth column (remission) when the format has one.
    let layers = [
        Layer::Conv(3, 1, 4, 32),
        Layer::Conv(3, 1, 32, 32),
        Layer::Conv(2, 2, 32, 64),
        Layer::Conv(3, 1, 64, 64),
        Layer::Conv(2, 2, 64, 128),
        Layer::Conv(3, 1, 128, 128),
        Layer::Up(128, 64, 3),
        Layer::Up(64, 32, 1),
    ];
    let weights: Vec<ConvWeight> = layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let (vol, cin, cout) = match *l {
                Layer::Conv(k, _, ci, co) => ((k as usize).pow(3), ci, co),
                Layer::Up(ci, co, _) => (8, ci, co),
            };
            let scale = (2.0 / (vol * cin) as f32).sqrt();
            ConvWeight::new(pseudo_random(vol * cin * cout, 1000 + i as u64, scale), vol, cin, cout, None)
        })
        .collect::<Result<_>>()?;
    println!(
        "scan {}: {} points; {} threads; {} kernel maps; synthetic He-initialised weights (this measures the engine, it is not a trained model)",
        scan.display(),
        cloud.len(),
        rayon::current_num_threads(),
        engine_builder_name(&engine)
    );
    let mut per_layer: Vec<Vec<f64>> = vec![Vec::new(); layers.len()];
    let (mut t_vox, mut t_map, mut t_total) = (Vec::new(), Vec::new(), Vec::new());
    let mut summary = Vec::new();
    for run in 0..repeat.max(1) + 1 {
        engine.clear_cache();
        let t_start = Instant::now();
        let vox = voxelize(&cloud, voxel_size)?;
        let dims = vox.tensor.channels();
        // Pad to 4 input channels (remission 0 where the format has none), keep the first 4.
        let x0 = {
            let n = vox.tensor.len();
            let mut f = vec![0f32; n * 4];
            for i in 0..n {
                let src = &vox.tensor.feats()[i * dims..(i + 1) * dims];
                f[i * 4..i * 4 + dims.min(4)].copy_from_slice(&src[..dims.min(4)]);
            }
            SparseTensor::new(vox.tensor.coord_set().clone(), f, 4)?
        };
        let tv = t_start.elapsed().as_secs_f64();
        // Build every kernel map up front so the conv timings below are pure compute.
        let t_m = Instant::now();
        let mut coords_at: Vec<Arc<CoordSet>> = Vec::new();
        let mut cur = x0.coord_set().clone();
        for l in &layers {
            cur = match *l {
                Layer::Conv(k, s, _, _) => engine.kernel_map(&cur, KernelSpec::new(k, s, 1)?)?.out_coords().clone(),
                Layer::Up(_, _, target) => {
                    let t = coords_at[target].clone();
                    engine.transposed_map(&cur, &t, KernelSpec::new(2, 2, 1)?)?;
                    t
                }
            };
            coords_at.push(cur.clone());
        }
        let tm = t_m.elapsed().as_secs_f64();
        let mut x = x0;
        let mut outs: Vec<Arc<CoordSet>> = Vec::new();
        for (i, (l, w)) in layers.iter().zip(&weights).enumerate() {
            let t = Instant::now();
            let (mut y, map) = match *l {
                Layer::Conv(k, s, _, _) => {
                    let spec = KernelSpec::new(k, s, 1)?;
                    let map = engine.kernel_map(x.coord_set(), spec)?;
                    (engine.conv_with_map(&map, &x, w)?, map)
                }
                Layer::Up(_, _, target) => {
                    let spec = KernelSpec::new(2, 2, 1)?;
                    let map = engine.transposed_map(x.coord_set(), &outs[target], spec)?;
                    (engine.conv_with_map(&map, &x, w)?, map)
                }
            };
            {
                use rayon::prelude::*;
                y.feats_mut().par_chunks_mut(1 << 14).for_each(|c| c.iter_mut().for_each(|v| *v = v.max(0.0)));
            }
            let dt = t.elapsed().as_secs_f64();
            if run > 0 {
                per_layer[i].push(dt);
            } else {
                summary.push((map.n_in(), map.n_out(), map.total_pairs(), w.cin, w.cout, map.kind(), map.spec()));
            }
            outs.push(y.coord_set().clone());
            x = y;
        }
        std::hint::black_box(&x);
        if run > 0 {
            t_vox.push(tv);
            t_map.push(tm);
            t_total.push(t_start.elapsed().as_secs_f64());
        }
    }
    println!("{:<4} {:<26} {:>16} {:>9} {:>10} {:>11}", "#", "layer", "voxels in->out", "pairs", "ms", "GFLOP/s");
    let mut conv_sum = 0.0;
    let mut flops_sum = 0.0;
    for (i, (n_in, n_out, pairs, cin, cout, kind, spec)) in summary.iter().enumerate() {
        let st = Stats::from_samples(per_layer[i].clone());
        let fl = conv_flops(*pairs, *cin, *cout);
        conv_sum += st.median;
        flops_sum += fl;
        println!(
            "{:<4} {:<26} {:>16} {:>9} {:>10.2} {:>11.1}",
            i + 1,
            format!("{kind:?} k{} s{} {cin}->{cout}", spec.size, spec.stride),
            format!("{n_in}->{n_out}"),
            pairs,
            st.median * 1e3,
            st.gflops(fl)
        );
    }
    let (v, m, t) = (Stats::from_samples(t_vox), Stats::from_samples(t_map), Stats::from_samples(t_total));
    println!(
        "voxelize {:.2} ms | kernel maps {:.2} ms | convs {:.2} ms ({:.1} GFLOP/s) | total {:.2} ms ± {:.2} (median of {}) = {:.1} scans/s",
        v.median * 1e3,
        m.median * 1e3,
        conv_sum * 1e3,
        flops_sum / conv_sum / 1e9,
        t.median * 1e3,
        t.mad * 1e3,
        t.runs,
        1.0 / t.median
    );
    Ok(())
}

fn engine_builder_name(e: &Engine) -> String {
    format!("{:?}", e.builder())
}

fn cmd_demo(rerun: PathBuf, model: Option<PathBuf>) -> Result<()> {
    let with_rerun = cfg!(feature = "rerun");
    cmd_segment(SegmentArgs {
        scan: bundled("data/semantickitti/sequences/00/velodyne/000000.bin"),
        model,
        arch: None,
        cr: None,
        device: DeviceArg::Cpu,
        format: None,
        voxelize: VoxelizeArg::Mean,
        out_labels: None,
        logits: None,
        labels: Some(bundled("data/semantickitti/sequences/00/labels/000000.label")),
        yaml: None,
        rerun: with_rerun.then_some(rerun),
        spawn: false,
    })?;
    if !with_rerun {
        println!("(built without the `rerun` feature: no recording written; `cargo run --release --features rerun -- demo` writes demo.rrd)");
    }
    println!(
        "note: the bundled models were trained on this scan (and two others): the IoU above is training-set accuracy"
    );
    Ok(())
}

fn default_model() -> PathBuf {
    bundled("data/models/minkunet_cr0.5.safetensors")
}

#[derive(clap::Args)]
struct SegmentArgs {
    /// Scan (.bin, .pcd.bin, .ply, .npy) or voxelized `coords`/`feats` safetensors.
    scan: PathBuf,
    /// Weights (safetensors with TorchSparse/SPVNAS names).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Architecture (default: from the weights' metadata).
    #[arg(long)]
    arch: Option<ArchArg>,
    /// Width factor (default: from the weights).
    #[arg(long)]
    cr: Option<f32>,
    /// Device.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Point format, overriding the file name.
    #[arg(long)]
    format: Option<PointFormatArg>,
    /// Voxelization: `mean` (floor, mean features) or `spvnas` (rounded, first point).
    #[arg(long, value_enum, default_value_t = VoxelizeArg::Mean)]
    voxelize: VoxelizeArg,
    /// Write SemanticKITTI `.label` predictions (raw class ids, one u32 per point).
    #[arg(long)]
    out_labels: Option<PathBuf>,
    /// Write `coords`, `feats` and `logits` per voxel (safetensors).
    #[arg(long)]
    logits: Option<PathBuf>,
    /// Ground-truth `.label` for an IoU report.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// The SemanticKITTI yaml (learning map).
    #[arg(long)]
    yaml: Option<PathBuf>,
    /// Write a rerun recording: points coloured by class, ground truth and errors (with
    /// --labels), stage timings. Needs the `rerun` cargo feature.
    #[arg(long)]
    rerun: Option<PathBuf>,
    /// Open the recording in the rerun viewer (when `rerun` is on PATH).
    #[arg(long, requires = "rerun")]
    spawn: bool,
}

fn load_model(model: Option<PathBuf>, arch: Option<&str>, cr: Option<f32>) -> Result<(pipeline::Model, f32, PathBuf)> {
    let path = match model {
        Some(p) => p,
        None => {
            let p = default_model();
            if !p.exists() {
                return Err(Error::invalid(
                    "--model",
                    format!(
                        "no weights given and no bundled model at {} (pass --model WEIGHTS.safetensors)",
                        p.display()
                    ),
                ));
            }
            p
        }
    };
    let ck = sparseconv::nn::checkpoint::Checkpoint::load(&path)?;
    let (m, cr) = pipeline::Model::from_checkpoint(&ck, arch, cr)?;
    if ck.metadata().get("trained").is_some_and(|v| v == "false") {
        eprintln!(
            "warning: {} holds untrained (randomly initialised) weights: the classes are meaningless",
            path.display()
        );
    }
    Ok((m, cr, path))
}

fn cmd_segment(a: SegmentArgs) -> Result<()> {
    let device = check_device(a.device.as_str())?;
    let format = a.format.map(|f| f.as_str().parse::<PointFormat>()).transpose()?;
    let mode: pipeline::VoxelizeMode = a.voxelize.as_str().parse()?;
    let (model, cr, mpath) = load_model(a.model, a.arch.map(ArchArg::as_str), a.cr)?;
    let lm = LearningMap::load(&a.yaml.unwrap_or_else(default_yaml))?;
    // One scan: timing plan candidates would cost more than it saves.
    let builder = device.map_builder();
    let engine = new_engine(device, builder, Grouping::Heuristic)?;
    if a.rerun.is_some() && !cfg!(feature = "rerun") {
        return Err(Error::invalid("--rerun", "this build has no rerun support (build with `--features rerun`)"));
    }
    let mut timings = pipeline::Timings::default();
    let t0 = Instant::now();
    let prepared = pipeline::prepare_file(&a.scan, format, mode)?;
    timings.voxelize = t0.elapsed().as_secs_f64();
    let gt = match &a.labels {
        Some(p) => Some(read_label(p, Some(prepared.points))?),
        None => None,
    };
    let seg = pipeline::segment(&engine, &model, &prepared, &mut timings)?;
    println!(
        "{}: {} points -> {} voxels; {} cr={cr} ({}); {:.1} ms (voxelize {:.1}, kernel maps {:.1}, conv {:.1}, other {:.1}) on {} threads",
        a.scan.display(),
        prepared.points,
        prepared.voxels.len(),
        model.arch(),
        mpath.display(),
        timings.total() * 1e3,
        timings.voxelize * 1e3,
        timings.kernel_maps * 1e3,
        timings.conv * 1e3,
        timings.other * 1e3,
        rayon::current_num_threads()
    );
    let mut hist = [0usize; NUM_CLASSES + 1];
    for &l in &seg.point_labels {
        hist[l as usize] += 1;
    }
    println!("{:<16} {:>9} {:>7}", "class", "points", "share");
    for (id, &n) in hist.iter().enumerate().skip(1) {
        if n > 0 {
            println!(
                "{:<16} {:>9} {:>6.1}%",
                lm.train_name(id as u32),
                n,
                100.0 * n as f64 / seg.point_labels.len().max(1) as f64
            );
        }
    }
    let gt_train: Option<Vec<u32>> = gt.as_ref().zip(a.labels.as_deref()).map(|(g, path)| cli::train_ids(path, g, &lm));
    if let Some(gt) = &gt_train {
        print_iou(&sparseconv::metrics::Confusion::from_labels(&seg.point_labels, gt)?, &lm);
    }
    #[cfg(feature = "rerun")]
    if let Some(path) = &a.rerun {
        let points = match pipeline::points_of(&a.scan, format)? {
            Some(p) => p,
            None => voxel_points(&prepared.voxels),
        };
        sparseconv::viz::rerun::write_rrd(
            path,
            &sparseconv::viz::rerun::SceneLog {
                points: &points,
                pred: &seg.point_labels,
                gt: gt_train.as_deref(),
                classes: &lm,
                timings,
            },
        )?;
        println!("wrote rerun recording {}", path.display());
        if a.spawn {
            match std::process::Command::new("rerun").arg(path).spawn() {
                Ok(_) => println!("opened the rerun viewer"),
                Err(e) => {
                    eprintln!("warning: could not start the `rerun` viewer ({e}); open {} yourself", path.display())
                }
            }
        }
    }
    #[cfg(not(feature = "rerun"))]
    let _ = a.spawn;
    if let Some(p) = &a.out_labels {
        let raw: Vec<u32> = seg.point_labels.iter().map(|&t| lm.to_raw(t)).collect();
        write_label(p, &raw)?;
        println!("wrote {} labels to {}", raw.len(), p.display());
    }
    if let Some(p) = &a.logits {
        let v = &prepared.voxels;
        let coords: Vec<i32> = v.coords().iter().flatten().copied().collect();
        write(
            p,
            vec![
                ("coords", OutTensor::I32(&coords, vec![v.len(), 4])),
                ("feats", OutTensor::F32(v.feats(), vec![v.len(), 4])),
                ("logits", OutTensor::F32(&seg.logits, vec![v.len(), NUM_CLASSES])),
            ],
            None,
        )?;
        println!("wrote logits of {} voxels to {}", v.len(), p.display());
    }
    Ok(())
}

/// Voxel centres in metres, for recordings of already-voxelized input.
#[cfg(feature = "rerun")]
fn voxel_points(v: &SparseTensor) -> sparseconv::voxel::PointCloud {
    let data =
        v.coords().iter().flat_map(|c| [c[1], c[2], c[3]].map(|q| (q as f32 + 0.5) * pipeline::VOXEL_SIZE)).collect();
    sparseconv::voxel::PointCloud { data, dims: 3 }
}

fn print_iou(c: &sparseconv::metrics::Confusion, lm: &LearningMap) {
    println!("{:<16} {:>8}", "class", "IoU");
    let ious = c.iou();
    for (j, iou) in ious.iter().enumerate() {
        match iou {
            Some(v) => println!("{:<16} {:>7.1}%", lm.train_name(j as u32 + 1), 100.0 * v),
            None => println!("{:<16} {:>8}", lm.train_name(j as u32 + 1), "n/a"),
        }
    }
    match c.miou() {
        Some(m) => println!(
            "mIoU {:.1}% over {} classes present; accuracy {:.1}%",
            100.0 * m,
            ious.iter().flatten().count(),
            100.0 * c.accuracy()
        ),
        None => println!("mIoU n/a (no labelled points)"),
    }
}

fn cmd_eval(preds: &[PathBuf], model: Option<PathBuf>, labels: &[PathBuf], yaml: Option<PathBuf>) -> Result<()> {
    if preds.is_empty() {
        return Err(Error::invalid("eval", "give at least one predicted .label file"));
    }
    if preds.len() != labels.len() {
        return Err(Error::invalid("eval", format!("{} predictions but {} label files", preds.len(), labels.len())));
    }
    let lm = LearningMap::load(&yaml.unwrap_or_else(default_yaml))?;
    let mut total = sparseconv::metrics::Confusion::new();
    let mut net: Option<pipeline::Model> = None;
    let engine = Engine::new(Device::Cpu, MapBuilder::Sort, Grouping::Heuristic);
    for (p, g) in preds.iter().zip(labels) {
        let gtt = ground_truth(g, &lm)?;
        let pt: Vec<u32> = if p.to_string_lossy().to_ascii_lowercase().ends_with(".label") {
            cli::train_ids(p, &read_label(p, Some(gtt.len()))?, &lm)
        } else {
            if net.is_none() {
                net = Some(load_model(model.clone(), None, None)?.0);
            }
            let m = net.as_ref().ok_or_else(|| Error::invalid("eval", "no model"))?;
            let prep = pipeline::prepare_file(p, None, pipeline::VoxelizeMode::Mean)?;
            if prep.points != gtt.len() {
                return Err(Error::format(g, format!("{} labels for a scan of {} points", gtt.len(), prep.points)));
            }
            pipeline::segment(&engine, m, &prep, &mut pipeline::Timings::default())?.point_labels
        };
        total.add(&sparseconv::metrics::Confusion::from_labels(&pt, &gtt)?);
    }
    print_iou(&total, &lm);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn cmd_bench(
    scans: &[PathBuf],
    model: Option<PathBuf>,
    arch: Option<&str>,
    cr: f32,
    device: &str,
    warmup: usize,
    runs: usize,
    json: bool,
    layers: bool,
) -> Result<()> {
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
            let (m, cr) = pipeline::Model::load(&p, arch, None)?;
            (m, cr, p.display().to_string())
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
    let (mut vox, mut maps, mut conv, mut other, mut total) = (vec![], vec![], vec![], vec![], vec![]);
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
            let p = pipeline::prepare_file(scan, None, pipeline::VoxelizeMode::Mean)?;
            t.voxelize = t0.elapsed().as_secs_f64();
            let seg = pipeline::segment(&engine, &model, &p, &mut t)?;
            std::hint::black_box(&seg.point_labels);
            if r >= warmup {
                let c1 = gpu_counters(&engine);
                gpu_work = (gpu_work.0 + c1.0 - c0.0, gpu_work.1 + c1.1 - c0.1);
                vox.push(t.voxelize);
                maps.push(t.kernel_maps);
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
    let (v, m, c, o, t) = (st(vox), st(maps), st(conv), st(other), st(total));
    let threads = rayon::current_num_threads();
    let device_name = match engine.device() {
        Device::Cpu => "cpu".to_string(),
        Device::Gpu(c) => format!("gpu {} ({:?})", c.describe(), engine.precision()),
    };
    if json {
        println!(
            "{{\"arch\":\"{arch}\",\"cr\":{cr},\"device\":\"{}\",\"threads\":{threads},\"scans\":{},\"runs\":{},\"scans_per_s\":{:.4},\"points_per_s\":{:.1},\"median_s\":{{\"voxelize\":{:.6},\"kernel_maps\":{:.6},\"conv\":{:.6},\"other\":{:.6},\"total\":{:.6}}},\"mad_s\":{{\"total\":{:.6}}}}}",
            device_name.replace('"', "'"),
            scans.len(),
            t.runs,
            n / sum,
            points as f64 / sum,
            v.median,
            m.median,
            c.median,
            o.median,
            t.median,
            t.mad
        );
    } else {
        println!(
            "{arch} cr={cr} ({source}) on {device_name}, {threads} CPU threads: {} scans x {runs} runs, {:.0} points and {:.0} voxels per scan",
            scans.len(),
            points as f64 / n,
            voxels as f64 / n
        );
        println!("{:<12} {:>10} {:>10} {:>10} {:>10}", "stage", "median ms", "mad ms", "min ms", "max ms");
        for (name, s) in [("voxelize", v), ("kernel maps", m), ("conv", c), ("other", o), ("total", t)] {
            println!(
                "{:<12} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
                name,
                s.median * 1e3,
                s.mad * 1e3,
                s.min * 1e3,
                s.max * 1e3
            );
        }
        println!("{:.2} scans/s, {:.0} points/s (end to end: points in, labels out)", n / sum, points as f64 / sum);
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
            let (mut sum_ms, mut sum_dense) = (0.0, 0.0);
            for (i, (l, ts)) in layer_times.into_iter().enumerate() {
                let st = Stats::from_samples(ts);
                sum_ms += st.median * 1e3;
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
                println!("sum of conv medians: {sum_ms:.1} ms; the same FLOPs as dense GEMMs: {sum_dense:.1} ms");
            } else {
                println!("sum of conv medians: {sum_ms:.1} ms");
            }
        }
    }
    Ok(())
}

/// `bench --model M --baseline B`: both models in alternating rounds, the speed ratio per round.
fn cmd_bench_baseline(
    scans: &[PathBuf],
    model: Option<PathBuf>,
    baseline: &Path,
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
    let (m, _) = pipeline::Model::load(&model, None, None)?;
    let (b, _) = pipeline::Model::load(baseline, None, None)?;
    let (em, eb) = (
        new_engine(device.clone(), device.map_builder(), Grouping::Auto)?,
        new_engine(device.clone(), device.map_builder(), Grouping::Auto)?,
    );
    let r = alternate(scans, &[(&eb, &b), (&em, &m)], warmup.max(1), runs, rounds, false)?;
    let threads = rayon::current_num_threads();
    println!(
        "{} scans x {runs} runs x {rounds} alternating rounds, {threads} CPU threads, device {}",
        scans.len(),
        if device == Device::Cpu { "cpu" } else { "gpu" }
    );
    for (name, path, d, x) in [("baseline", baseline, b.desc(), &r[0]), ("model", model.as_path(), m.desc(), &r[1])] {
        let rounds: Vec<String> = x.round_medians.iter().map(|v| format!("{:.1}", v * 1e3)).collect();
        println!(
            "{name:<9} {} ({} widths {}): median {:.1} ms; per round {} ms",
            path.display(),
            d.kind.name(),
            d.widths_summary(),
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

/// Dispatches and submits of the engine's GPU context so far (zeros on the CPU).
fn gpu_counters(engine: &Engine) -> (u64, u64) {
    match engine.device() {
        Device::Cpu => (0, 0),
        Device::Gpu(c) => c.counters(),
    }
}

/// Median of three timings of a dense `[m, k] x [k, n]` GEMM on the current rayon threads.
fn dense_floor_ms(m: usize, k: usize, n: usize) -> f64 {
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

#[allow(clippy::too_many_arguments)]
fn cmd_train(
    config: Option<PathBuf>,
    out: &Path,
    resume: Option<PathBuf>,
    init: Option<PathBuf>,
    lr_scale: Option<f64>,
    data: Vec<PathBuf>,
    epochs: Option<usize>,
    max_steps: Option<usize>,
    export: Option<PathBuf>,
    half: bool,
) -> Result<()> {
    use sparseconv::train::trainer::{TrainConfig, Trainer};
    use std::io::Write;
    let mut cfg = match &config {
        Some(p) => Some(TrainConfig::load(p)?),
        None if resume.is_none() => Some(TrainConfig::default()),
        None => None,
    };
    if let Some(c) = cfg.as_mut() {
        if !data.is_empty() {
            c.data = data.clone();
        }
        if let Some(e) = epochs {
            c.epochs = e;
        }
        let scale = lr_scale.unwrap_or(if init.is_some() { 0.1 } else { 1.0 });
        if !(scale.is_finite() && scale > 0.0) {
            return Err(Error::invalid("--lr-scale", format!("must be positive, got {scale}")));
        }
        c.lr *= scale;
    }
    if resume.is_some() && lr_scale.is_some() {
        return Err(Error::invalid("--lr-scale", "a resumed run keeps its stored rate"));
    }
    let mut t = match &resume {
        Some(r) => {
            let t = Trainer::resume(r, cfg)?;
            if !data.is_empty() || epochs.is_some() {
                return Err(Error::invalid("--resume", "change data or epochs in a --config, not with flags"));
            }
            t.config.validate()?;
            t
        }
        None => Trainer::new(cfg.unwrap_or_default(), init.as_deref())?,
    };
    let (per_epoch, total) = t.steps();
    let stop = max_steps.map_or(total, |m| (t.step + m).min(total));
    eprintln!(
        "training {} cr={} on {} scans: {} steps ({} epochs x {per_epoch}), lr {:e}, {} parameters, from step {}",
        t.config.arch,
        t.config.cr,
        t.train_scans(),
        total,
        t.config.epochs,
        t.config.lr,
        t.params().trainable_count(),
        t.step
    );
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let log_path = out.join("log.csv");
    let fresh_log = !log_path.exists() || resume.is_none();
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(!fresh_log)
        .write(true)
        .truncate(fresh_log)
        .open(&log_path)
        .map_err(|e| Error::io(&log_path, e))?;
    if fresh_log {
        writeln!(log, "step,loss,lr,voxels,data_s,forward_s,backward_s,optimizer_s,miou")
            .map_err(|e| Error::io(&log_path, e))?;
    }
    let bar = indicatif::ProgressBar::new(total as u64).with_position(t.step as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut smooth: Option<f64> = None;
    let mut last_miou = None;
    let ckpt = out.join("checkpoint.safetensors");
    while t.step < stop {
        let mut r = t.train_step()?;
        let every = |n: usize| n > 0 && t.step % n == 0;
        if t.step == total || every(t.config.eval_every) {
            r.miou = Some(t.evaluate()?.0.unwrap_or(0.0));
            last_miou = r.miou;
        }
        if t.step == stop || every(t.config.save_every) {
            t.save_checkpoint(&ckpt)?;
        }
        let step_s: f64 = r.seconds.iter().sum();
        smooth = Some(smooth.map_or(r.loss, |s| 0.9 * s + 0.1 * r.loss));
        writeln!(
            log,
            "{},{:.6},{:.6e},{},{:.4},{:.4},{:.4},{:.4},{}",
            r.step,
            r.loss,
            r.lr,
            r.voxels,
            r.seconds[0],
            r.seconds[1],
            r.seconds[2],
            r.seconds[3],
            r.miou.map_or(String::new(), |m| format!("{m:.4}"))
        )
        .map_err(|e| Error::io(&log_path, e))?;
        bar.set_position(r.step as u64);
        bar.set_message(format!(
            "loss {:.3} lr {:.2e} {:.2} s/step {:.1} scans/s{}",
            smooth.unwrap_or(r.loss),
            r.lr,
            step_s,
            t.config.batch as f64 / step_s.max(1e-9),
            last_miou.map_or(String::new(), |m| format!(" mIoU {:.1}%", 100.0 * m))
        ));
    }
    bar.finish();
    eprintln!("checkpoint: {} (step {} of {total})", ckpt.display(), t.step);
    if let Some(m) = last_miou {
        eprintln!("mIoU on the evaluation scans: {:.1}%", 100.0 * m);
    }
    if let Some(p) = export {
        t.export(&p, half)?;
        eprintln!("inference weights: {}", p.display());
    }
    Ok(())
}
