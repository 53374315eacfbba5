//! `sparseconv segment` and `demo`: a class for every point of a scan, with timings, IoU
//! against labels and an optional rerun recording.

use crate::cli::args::*;
use crate::cli::{bundled, check_device, default_yaml};
use crate::*;
use sparseconv::io::kitti::{read_label, write_label, LearningMap, NUM_CLASSES};
use sparseconv::io::tensors::{write, OutTensor};
use sparseconv::io::PointFormat;
use sparseconv::pipeline;
use sparseconv::{Error, Grouping, Result};
use std::path::PathBuf;
use std::time::Instant;

pub(crate) fn cmd_demo(rerun: PathBuf, model: Option<PathBuf>) -> Result<()> {
    let with_rerun = cfg!(feature = "rerun");
    cmd_segment(SegmentArgs {
        scans: vec![bundled("data/semantickitti/sequences/00/velodyne/000000.bin")],
        out_dir: None,
        sequences: Vec::new(),
        resume: false,
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

pub(crate) fn default_model() -> PathBuf {
    bundled("data/models/minkunet_cr0.5.safetensors")
}

#[derive(clap::Args)]
pub(crate) struct SegmentArgs {
    /// Scan (.bin, .pcd.bin, .ply, .npy) or voxelized `coords`/`feats` safetensors; or
    /// several scans, folders of scans, SemanticKITTI sequence folders (with `velodyne/`),
    /// dataset roots (with `sequences/`) and globs, written with --out-dir.
    #[arg(required = true, num_args = 1..)]
    scans: Vec<PathBuf>,
    /// Many scans: write `DIR/sequences/XX/predictions/NNNNNN.label` (the SemanticKITTI
    /// submission layout; raw class ids).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// With a dataset root: only these sequences (`--sequences 08 09`).
    #[arg(long, num_args = 1..)]
    sequences: Vec<String>,
    /// With --out-dir: skip scans whose prediction is already written.
    #[arg(long, requires = "out_dir")]
    resume: bool,
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
    /// Write a rerun recording: prediction, ground truth and errors side by side (with
    /// --labels, or the labels beside a sequence's scans), the network's levels, and the
    /// voxel-pruning view; with many scans one `scan` time step per scan and stage times as
    /// time series. Needs the `rerun` cargo feature.
    #[arg(long)]
    rerun: Option<PathBuf>,
    /// Open the recording in the rerun viewer (when `rerun` is on PATH).
    #[arg(long, requires = "rerun")]
    spawn: bool,
}

pub(crate) fn load_model(
    model: Option<PathBuf>,
    arch: Option<&str>,
    cr: Option<f32>,
) -> Result<(pipeline::Model, f32, PathBuf)> {
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
    let (mut m, cr) = pipeline::Model::from_checkpoint(&ck, arch, cr)?;
    if let Some(line) = cli::voxel::apply(&mut m)? {
        eprintln!("{line}");
    }
    if ck.metadata().get("trained").is_some_and(|v| v == "false") {
        eprintln!(
            "warning: {} holds untrained (randomly initialised) weights: the classes are meaningless",
            path.display()
        );
    }
    Ok((m, cr, path))
}

pub(crate) fn cmd_segment(a: SegmentArgs) -> Result<()> {
    let many = a.out_dir.is_some() || a.scans.len() > 1 || !a.scans[0].is_file();
    if many {
        for (given, flag) in [
            (a.out_labels.is_some(), "--out-labels"),
            (a.logits.is_some(), "--logits"),
            (a.labels.is_some(), "--labels"),
        ] {
            if given {
                return Err(Error::invalid(flag, "is for one scan; with many, use --out-dir (and `eval` on it)"));
            }
        }
    } else if !a.sequences.is_empty() {
        return Err(Error::invalid("--sequences", "needs a dataset root (a folder holding sequences/)"));
    }
    let jobs = if many { Some(cli::sequence::expand_inputs(&a.scans, &a.sequences)?) } else { None };
    let out_dir = match (&jobs, a.out_dir) {
        (Some(_), Some(d)) => Some(d),
        (Some(_), None) => {
            return Err(Error::invalid("--out-dir", "several scans need a folder to write their predictions to"))
        }
        (None, _) => None,
    };
    if a.rerun.is_some() && !cfg!(feature = "rerun") {
        return Err(Error::invalid("--rerun", "this build has no rerun support (build with `--features rerun`)"));
    }
    let device = check_device(a.device.as_str())?;
    let format = a.format.map(|f| f.as_str().parse::<PointFormat>()).transpose()?;
    let mode: pipeline::VoxelizeMode = a.voxelize.as_str().parse()?;
    let (model, cr, mpath) = load_model(a.model, a.arch.map(ArchArg::as_str), a.cr)?;
    let lm = LearningMap::load(&a.yaml.unwrap_or_else(default_yaml))?;
    if let (Some(jobs), Some(out_dir)) = (jobs, out_dir) {
        // Many scans: tuned plans pay for their timing after the first scan.
        let builder = device.map_builder();
        let engine = new_engine(device, builder, Grouping::Auto)?;
        println!(
            "{} cr={cr} widths {} ({}) on {} threads: {} scans",
            model.arch(),
            model.desc().widths_summary(),
            mpath.display(),
            rayon::current_num_threads(),
            jobs.len()
        );
        cli::sequence::run(cli::sequence::SequenceRun {
            jobs,
            out_dir,
            resume: a.resume,
            model: &model,
            engine: &engine,
            labels: &lm,
            format,
            mode,
            rerun: a.rerun.clone(),
        })?;
        open_viewer(a.rerun.as_deref(), a.spawn);
        return Ok(());
    }
    let scan = a.scans[0].clone();
    // One scan: timing plan candidates would cost more than it saves.
    let builder = device.map_builder();
    let engine = new_engine(device, builder, Grouping::Heuristic)?;
    let mut timings = pipeline::Timings::default();
    let t0 = Instant::now();
    let las = format.or_else(|| PointFormat::detect(&scan).ok()) == Some(PointFormat::Las);
    let prepared = if las {
        let l = sparseconv::io::las::read_las(&scan)?;
        let mut counts = std::collections::BTreeMap::new();
        for &c in &l.classes {
            *counts.entry(c).or_insert(0usize) += 1;
        }
        let classes: Vec<String> =
            counts.iter().map(|(c, n)| format!("{c} {} {n}", sparseconv::io::las::asprs_name(*c))).collect();
        println!(
            "{}: LAS/LAZ coordinates re-centred by ({}, {}, {}) m to fit the voxel key range; ASPRS classes: {}",
            scan.display(),
            l.centre[0],
            l.centre[1],
            l.centre[2],
            classes.join(", ")
        );
        pipeline::prepare_points(&l.cloud, mode)?
    } else {
        pipeline::prepare_file(&scan, format, mode)?
    };
    timings.voxelize = t0.elapsed().as_secs_f64();
    let gt = match &a.labels {
        Some(p) => Some(read_label(p, Some(prepared.points))?),
        None => None,
    };
    // The recording shows the network's levels: the layer trace records each conv's output.
    if a.rerun.is_some() {
        engine.start_trace();
    }
    let seg = pipeline::segment(&engine, &model, &prepared, &mut timings)?;
    let trace = engine.take_trace();
    println!(
        "{}: {} points -> {} voxels; {} cr={cr} widths {} ({}); {:.1} ms (voxelize {:.1}, kernel maps {:.1}{}, conv {:.1}, other {:.1}) on {} threads",
        scan.display(),
        prepared.points,
        prepared.voxels.len(),
        model.arch(),
        model.desc().widths_summary(),
        mpath.display(),
        timings.total() * 1e3,
        timings.voxelize * 1e3,
        timings.kernel_maps * 1e3,
        if timings.voxel_prune > 0.0 { format!(", voxel pruning {:.1}", timings.voxel_prune * 1e3) } else { String::new() },
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
        let points = match pipeline::points_of(&scan, format)? {
            Some(p) => p,
            None => voxel_points(&prepared.voxels),
        };
        let levels = sparseconv::viz::levels(&trace);
        sparseconv::viz::rerun::write_rrd(
            path,
            &lm,
            &sparseconv::viz::rerun::SceneLog {
                name: scan.display().to_string(),
                points: &points,
                pred: &seg.point_labels,
                gt: gt_train.as_deref(),
                voxels: prepared.voxels.coord_set(),
                voxel_labels: &seg.voxel_labels,
                levels: &levels,
                timings,
            },
        )?;
        println!("wrote rerun recording {}", path.display());
    }
    open_viewer(a.rerun.as_deref(), a.spawn);
    #[cfg(not(feature = "rerun"))]
    let _ = trace;
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

/// `--spawn`: open a written recording in the rerun viewer (when `rerun` is on PATH).
fn open_viewer(path: Option<&std::path::Path>, spawn: bool) {
    if let (Some(path), true) = (path, spawn) {
        match std::process::Command::new("rerun").arg(path).spawn() {
            Ok(_) => println!("opened the rerun viewer"),
            Err(e) => eprintln!("warning: could not start the `rerun` viewer ({e}); open {} yourself", path.display()),
        }
    }
}

/// Voxel centres in metres, for recordings of already-voxelized input.
#[cfg(feature = "rerun")]
pub(crate) fn voxel_points(v: &sparseconv::SparseTensor) -> sparseconv::voxel::PointCloud {
    let data =
        v.coords().iter().flat_map(|c| [c[1], c[2], c[3]].map(|q| (q as f32 + 0.5) * pipeline::VOXEL_SIZE)).collect();
    sparseconv::voxel::PointCloud { data, dims: 3 }
}

pub(crate) fn print_iou(c: &sparseconv::metrics::Confusion, lm: &LearningMap) {
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
