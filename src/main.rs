//! The `sparseconv` command line: argument parsing and dispatch. Each command lives in its
//! own file under `cli/` (`sparseconv --help` lists them).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use cli::args::{ArchArg, DeviceArg, PointFormatArg, PrecisionArg};

mod cli;
use cli::bench::{cmd_bench, cmd_bench_baseline};
use cli::conv::cmd_conv;
use cli::eval::cmd_eval;
use cli::segment::{cmd_demo, cmd_segment, SegmentArgs};
use cli::stack::cmd_stack;
use cli::train::cmd_train;
use cli::{bundled, check_device};

// Large feature buffers are allocated and freed every layer; glibc returns them to the OS
// (munmap), and on a multi-threaded process every munmap costs TLB-shootdown interrupts on
// all cores. mimalloc keeps and reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use sparseconv::gpu::conv::Precision;
use sparseconv::io::kitti::NUM_CLASSES;
use sparseconv::io::PointFormat;
use sparseconv::pipeline;
use sparseconv::{Device, Engine, Error, Grouping, MapBuilder, Result};

#[derive(Parser)]
#[command(name = "sparseconv", version, about = "Point-cloud sparse convolution engine")]
struct Cli {
    /// CPU threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Conv precision: `f32` (strict, default); `f16` on the GPU (packed halves, f32
    /// accumulation); `bf16` on the CPU (AVX512_BF16 dot products, f32 sums; f32 where the CPU
    /// lacks them). Honoured by conv, stack, segment, demo, eval and bench; training and the
    /// pruning searches run f32.
    #[arg(long, global = true, value_enum, default_value_t = PrecisionArg::F32)]
    precision: PrecisionArg,
    #[command(flatten)]
    voxel: cli::voxel::VoxelArgs,
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
        /// Kernel-map builder (default: the device's own, as every other command uses).
        #[arg(long, value_enum)]
        kmap: Option<KmapArg>,
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
        /// Predicted `.label` files (raw SemanticKITTI ids) or scans to segment; or folders of
        /// predictions (`segment --out-dir` output, a sequence folder, a folder of `.label`s).
        preds: Vec<PathBuf>,
        /// Weights for the scans among PREDS.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Ground-truth `.label` files, one per prediction; or folders (a dataset root with
        /// `sequences/XX/labels/`, a sequence folder, a folder of `.label`s).
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
        /// Run each scan as a batch of this many copies (batch indices 0..N-1) in one pass.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// A second model timed in alternating rounds with --model (same scans, threads and
        /// runs); prints both and the speed ratio per round.
        #[arg(long, requires = "model")]
        baseline: Option<PathBuf>,
        /// Alternating rounds with --baseline.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Precision of the baseline's convs (default: --precision): `--precision bf16
        /// --baseline-precision f32` times bf16 against f32 in one run.
        #[arg(long, value_enum, requires = "baseline")]
        baseline_precision: Option<PrecisionArg>,
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
        /// Kernel-map builder (default: the device's own, as every other command uses).
        #[arg(long, value_enum)]
        kmap: Option<KmapArg>,
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

fn engine(kmap: Option<KmapArg>, grouping: GroupingArg, device: &str) -> Result<Engine> {
    let device = check_device(device)?;
    let b = match kmap {
        Some(KmapArg::Hash) => MapBuilder::Hash,
        Some(KmapArg::Sort) => MapBuilder::Sort,
        None => device.map_builder(),
    };
    let g = match grouping {
        GroupingArg::Auto => Grouping::Auto,
        GroupingArg::Off => Grouping::Off,
    };
    new_engine(device, b, g)
}

static PRECISION: std::sync::OnceLock<Precision> = std::sync::OnceLock::new();

/// An engine with the `--precision` chosen on the command line.
fn new_engine(device: Device, builder: MapBuilder, grouping: Grouping) -> Result<Engine> {
    engine_in(PRECISION.get().copied().unwrap_or_default(), device, builder, grouping)
}

/// An engine in precision `p`; bf16 on a CPU without AVX512_BF16 says so once and runs f32.
fn engine_in(p: Precision, device: Device, builder: MapBuilder, grouping: Grouping) -> Result<Engine> {
    match (p, &device) {
        (Precision::F16, Device::Cpu) => {
            return Err(Error::invalid("--precision", "f16 is a GPU mode: add --device gpu (the CPU has bf16)"))
        }
        (Precision::Bf16, Device::Gpu(_)) => {
            return Err(Error::invalid("--precision", "bf16 is a CPU mode: the GPU has f16"))
        }
        (Precision::Bf16, Device::Cpu) if !sparseconv::cpu::bf16::available() => {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| eprintln!("{}", sparseconv::cpu::bf16::describe()));
        }
        _ => {}
    }
    Ok(Engine::new(device, builder, grouping).with_precision(p))
}

fn precision_of(p: PrecisionArg) -> Precision {
    match p {
        PrecisionArg::F32 => Precision::F32,
        PrecisionArg::F16 => Precision::F16,
        PrecisionArg::Bf16 => Precision::Bf16,
    }
}

/// `mi_option_purge_delay` in the bundled mimalloc v2 (`mimalloc.h`, enum `mi_option_e`).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // Keep freed pages mapped: every layer frees and allocates multi-megabyte feature buffers,
    // and handing them back to the OS makes the next layer page-fault them in again.
    // SAFETY: setting an allocator option has no memory-safety preconditions.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    // `sparseconv ... | head` closes the pipe early: end quietly like any Unix tool instead of
    // panicking in println! (Rust ignores SIGPIPE by default).
    #[cfg(unix)]
    // SAFETY: restoring a signal's default disposition at startup, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
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
    let precision = precision_of(cli.precision);
    let honoured = matches!(
        cli.cmd,
        Cmd::Conv { .. }
            | Cmd::Segment(_)
            | Cmd::Eval { .. }
            | Cmd::Bench { .. }
            | Cmd::Demo { .. }
            | Cmd::Stack { .. }
    );
    if precision != Precision::F32 && !honoured {
        return Err(Error::invalid(
            "--precision",
            "this command runs f32 (conv, stack, segment, demo, eval and bench take another precision)",
        ));
    }
    let _ = PRECISION.set(precision);
    let voxel_ok = matches!(
        cli.cmd,
        Cmd::Segment(_)
            | Cmd::Eval { .. }
            | Cmd::Bench { .. }
            | Cmd::Demo { .. }
            | Cmd::Train { .. }
            | Cmd::Sensitivity(_)
    );
    cli::voxel::set(cli.voxel.clone());
    if cli::voxel::given() && !voxel_ok {
        return Err(Error::invalid(
            "--voxel-prune",
            "this command runs no network (segment, eval, demo, bench, train and sensitivity take voxel pruning)",
        ));
    }
    match cli.cmd {
        Cmd::Conv { input, weight, kernel_size, stride, dilation, kmap, grouping, device, output } => {
            cmd_conv(&input, &weight, kernel_size, stride, dilation, engine(kmap, grouping, device.as_str())?, &output)
        }
        Cmd::Segment(args) => cmd_segment(args),
        Cmd::Eval { preds, model, labels, yaml } => cmd_eval(&preds, model, &labels, yaml),
        Cmd::Bench { scans, model, baseline: Some(base), rounds, warmup, runs, device, baseline_precision, .. } => {
            let bp = baseline_precision.map_or(precision, precision_of);
            cmd_bench_baseline(&scans, model, &base, bp, device.as_str(), warmup, runs, rounds)
        }
        Cmd::Bench { scans, model, arch, cr, device, warmup, runs, json, layers, batch, .. } => {
            cmd_bench(&scans, model, arch.map(ArchArg::as_str), cr, device.as_str(), warmup, runs, json, layers, batch)
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
