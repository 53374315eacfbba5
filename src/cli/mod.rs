//! CLI commands that live in their own files (the older ones are still in `main.rs`), and
//! what they share.

pub mod amc;
pub mod args;
pub mod bench;
pub mod conv;
pub mod eval;
pub mod gamma;
pub mod imp;
pub mod latency_table;
pub mod netadapt;
pub mod plot;
pub mod prune;
pub mod rounds;
pub mod segment;
pub mod sensitivity;
pub mod sequence;
pub mod stack;
pub mod train;
pub mod voxel;

use std::path::{Path, PathBuf};

use sparseconv::io::kitti::{read_label, LearningMap, NUM_CLASSES};
use sparseconv::{Device, Error, Result};

/// Raw SemanticKITTI labels read from `path` as training ids, warning (once per file, with
/// the count) about class ids the learning map does not know: they are scored as ignored.
pub fn train_ids(path: &Path, raw: &[u32], lm: &LearningMap) -> Vec<u32> {
    let (ids, unknown) = lm.to_train_counted(raw);
    if unknown > 0 {
        eprintln!(
            "warning: {}: {unknown} of {} labels have class ids missing from the learning map; they are scored as ignored",
            path.display(),
            raw.len()
        );
    }
    ids
}

/// Ground truth as training ids: SemanticKITTI `.label` (raw ids, mapped) or Open3D-ML
/// `labels_*.npy` (training ids already).
pub fn ground_truth(g: &Path, lm: &LearningMap) -> Result<Vec<u32>> {
    if !g.to_string_lossy().to_ascii_lowercase().ends_with(".npy") {
        return Ok(train_ids(g, &read_label(g, None)?, lm));
    }
    let ids = sparseconv::io::npy::read_npy(g)?.to_i64().ok_or_else(|| Error::format(g, "labels must be integers"))?;
    ids.iter()
        .map(|&v| match u32::try_from(v) {
            Ok(v) if v as usize <= NUM_CLASSES => Ok(v),
            _ => Err(Error::format(g, format!("label {v} outside 0..={NUM_CLASSES}"))),
        })
        .collect()
}

/// Labelled scans for ranking pruned networks: each scan voxelized, each label file read as
/// training ids (SemanticKITTI `.label` or Open3D-ML `labels_*.npy`), paired in order.
pub fn eval_set(scans: &[PathBuf], labels: &[PathBuf]) -> Result<sparseconv::prune::sensitivity::EvalSet> {
    if scans.len() != labels.len() {
        return Err(Error::invalid("--labels", format!("{} scans but {} label files", scans.len(), labels.len())));
    }
    let lm = LearningMap::load(&default_yaml())?;
    let mut prepared = Vec::with_capacity(scans.len());
    let mut ids = Vec::with_capacity(labels.len());
    for (s, l) in scans.iter().zip(labels) {
        prepared.push(sparseconv::pipeline::prepare_file(s, None, sparseconv::pipeline::VoxelizeMode::Mean)?);
        ids.push(ground_truth(l, &lm)?);
    }
    sparseconv::prune::sensitivity::EvalSet::new(prepared, ids)
}

/// The device named by `--device`.
pub fn check_device(device: &str) -> Result<Device> {
    match device {
        "cpu" => Ok(Device::Cpu),
        // Before the adapter is opened (its loader may print to stderr).
        "gpu" if crate::PRECISION.get() == Some(&sparseconv::Precision::Bf16) => {
            Err(Error::invalid("--precision", "bf16 is a CPU mode: the GPU has f16"))
        }
        "gpu" => Device::gpu(),
        other => Err(Error::invalid("--device", format!("expected cpu or gpu, got `{other}`"))),
    }
}

/// A file bundled with the repository.
pub fn bundled(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The bundled SemanticKITTI yaml (learning map).
pub fn default_yaml() -> PathBuf {
    bundled("data/semantickitti/semantic-kitti.yaml")
}

/// The bundled SemanticKITTI scan.
pub fn bundled_scan() -> PathBuf {
    bundled("data/semantickitti/sequences/00/velodyne/000000.bin")
}

/// `--eval`/`--labels` as an eval set, or the bundled SemanticKITTI scan and its labels.
pub fn eval_or_bundled(scans: &[PathBuf], labels: &[PathBuf]) -> Result<sparseconv::prune::sensitivity::EvalSet> {
    if scans.is_empty() && labels.is_empty() {
        return eval_set(&[bundled_scan()], &[bundled("data/semantickitti/sequences/00/labels/000000.label")]);
    }
    eval_set(scans, labels)
}

/// Fine-tuning scans from `--data` (default: the three bundled labelled scans), each cropped to
/// `crop` metres around its centre when `crop > 0`.
pub fn fine_tune_scans(data: &[PathBuf], crop: f32) -> Result<Vec<sparseconv::train::data::Sample>> {
    let data = if data.is_empty() {
        vec![
            bundled("data/semantickitti"),
            bundled("data/open3dml/points_000700.npy"),
            bundled("data/open3dml/points_000750.npy"),
        ]
    } else {
        data.to_vec()
    };
    let train = sparseconv::train::trainer::load_samples(&data)?;
    if crop <= 0.0 {
        return Ok(train);
    }
    if !crop.is_finite() {
        return Err(Error::invalid("--crop", "must be a finite radius in metres"));
    }
    let cropped: Vec<_> = train.iter().map(|s| s.crop(crop)).collect();
    if let Some(i) = cropped.iter().position(|s| s.labels.is_empty()) {
        return Err(Error::invalid(
            "--crop",
            format!("a {crop} m crop leaves training scan {} ({} points) empty", i + 1, train[i].labels.len()),
        ));
    }
    Ok(cropped)
}

/// Resident memory of this process in MiB, now and at its peak (Linux `/proc/self/status`:
/// VmRSS, VmHWM); `None` elsewhere.
pub fn memory_mib() -> Option<(f64, f64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}
