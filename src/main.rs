//! The `sparseconv` command line: `conv` runs one sparse convolution on safetensors files,
//! `stack` voxelizes a scan and runs a stack of conv layers over it, timing every step.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};

// Large feature buffers are allocated and freed every layer; glibc returns them to the OS
// (munmap), and on a multi-threaded process every munmap costs TLB-shootdown interrupts on
// all cores. mimalloc keeps and reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use sparseconv::bench::{conv_flops, pseudo_random, Stats};
use sparseconv::io::tensors::{write, OutTensor, TensorFile};
use sparseconv::io::PointFormat;
use sparseconv::voxel::voxelize;
use sparseconv::{ConvWeight, CoordSet, Device, Engine, Error, Grouping, KernelSpec, MapBuilder, Result, SparseTensor};

#[derive(Parser)]
#[command(name = "sparseconv", version, about = "Point-cloud sparse convolution engine")]
struct Cli {
    /// CPU threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
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
        /// Output tensors (safetensors): `coords` and `feats`.
        #[arg(long)]
        output: PathBuf,
    },
    /// Voxelize a scan, build its kernel maps and run an 8-layer encoder/decoder stack of
    /// sparse convs (synthetic weights) over it, printing what ran and how fast.
    Stack {
        /// Point cloud (.bin SemanticKITTI, .pcd.bin nuScenes, .ply, .npy).
        scan: PathBuf,
        /// Override the format detected from the file name.
        #[arg(long)]
        format: Option<String>,
        /// Voxel size in metres.
        #[arg(long, default_value_t = 0.05)]
        voxel_size: f32,
        /// Kernel-map builder.
        #[arg(long, value_enum, default_value_t = KmapArg::Sort)]
        kmap: KmapArg,
        /// Offset grouping.
        #[arg(long, value_enum, default_value_t = GroupingArg::Auto)]
        grouping: GroupingArg,
        /// Timed repetitions (after one warm-up that also tunes the grouping).
        #[arg(long, default_value_t = 5)]
        repeat: usize,
    },
}

fn engine(kmap: KmapArg, grouping: GroupingArg) -> Engine {
    let b = match kmap {
        KmapArg::Hash => MapBuilder::Hash,
        KmapArg::Sort => MapBuilder::Sort,
    };
    let g = match grouping {
        GroupingArg::Auto => Grouping::Auto,
        GroupingArg::Off => Grouping::Off,
    };
    Engine::new(Device::Cpu, b, g)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
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
    match cli.cmd {
        Cmd::Conv {
            input,
            weight,
            kernel_size,
            stride,
            dilation,
            kmap,
            grouping,
            output,
        } => cmd_conv(
            &input,
            &weight,
            kernel_size,
            stride,
            dilation,
            engine(kmap, grouping),
            &output,
        ),
        Cmd::Stack {
            scan,
            format,
            voxel_size,
            kmap,
            grouping,
            repeat,
        } => {
            let format = format.map(|f| f.parse::<PointFormat>()).transpose()?;
            cmd_stack(&scan, format, voxel_size, engine(kmap, grouping), repeat)
        }
    }
}

fn read_input(path: &Path) -> Result<SparseTensor> {
    let f = TensorFile::open(path)?;
    let coords = f.i32("coords", 2)?;
    let feats = f.f32("feats", 2)?;
    if coords.shape[1] != 4 {
        return Err(Error::format(
            path,
            format!("tensor `coords` has shape {:?}, expected [N, 4]", coords.shape),
        ));
    }
    if feats.shape[0] != coords.shape[0] {
        return Err(Error::format(
            path,
            format!(
                "`coords` has {} rows but `feats` has {}",
                coords.shape[0], feats.shape[0]
            ),
        ));
    }
    if let Some(i) = feats.data.iter().position(|v| !v.is_finite()) {
        return Err(Error::format(
            path,
            format!("tensor `feats` has a NaN or infinite value at index {i}"),
        ));
    }
    let rows: Vec<[i32; 4]> = coords.data.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]).collect();
    let set = CoordSet::new(rows, 1).map_err(|e| e.in_file(path))?;
    SparseTensor::new(Arc::new(set), feats.data, feats.shape[1]).map_err(|e| e.in_file(path))
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
            return Err(Error::format(
                path,
                format!("tensor `bias` has shape {:?}, expected [{cout}]", b.shape),
            ));
        }
        Some(b.data)
    } else {
        None
    };
    if let Some(i) = k.data.iter().position(|v| !v.is_finite()) {
        return Err(Error::format(
            path,
            format!("tensor `kernel` has a NaN or infinite value at index {i}"),
        ));
    }
    ConvWeight::new(k.data, vol, cin, cout, bias).map_err(|e| e.in_file(path))
}

fn cmd_conv(input: &Path, weight: &Path, k: u32, s: u32, d: u32, engine: Engine, output: &Path) -> Result<()> {
    let spec = KernelSpec::new(k, s, d)?;
    let x = read_input(input)?;
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
            ConvWeight::new(
                pseudo_random(vol * cin * cout, 1000 + i as u64, scale),
                vol,
                cin,
                cout,
                None,
            )
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
                Layer::Conv(k, s, _, _) => engine.kernel_map(&cur, KernelSpec::new(k, s, 1)?)?.out_coords.clone(),
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
                y.feats_mut()
                    .par_chunks_mut(1 << 14)
                    .for_each(|c| c.iter_mut().for_each(|v| *v = v.max(0.0)));
            }
            let dt = t.elapsed().as_secs_f64();
            if run > 0 {
                per_layer[i].push(dt);
            } else {
                summary.push((
                    map.n_in(),
                    map.n_out(),
                    map.total_pairs(),
                    w.cin,
                    w.cout,
                    map.kind,
                    map.spec,
                ));
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
    println!(
        "{:<4} {:<26} {:>16} {:>9} {:>10} {:>11}",
        "#", "layer", "voxels in->out", "pairs", "ms", "GFLOP/s"
    );
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
    let (v, m, t) = (
        Stats::from_samples(t_vox),
        Stats::from_samples(t_map),
        Stats::from_samples(t_total),
    );
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
