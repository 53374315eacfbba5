//! Log a scan and its segmentation to a rerun recording (needs `--features rerun`).
//!
//! ```sh
//! cargo run --release --features rerun --example rerun_log -- WEIGHTS.safetensors out.rrd
//! rerun out.rrd   # the viewer, installed separately (pip install rerun-sdk==0.36.*)
//! ```
//! Without weights it logs synthetic-weight predictions (meaningless colours, real geometry).

use std::path::{Path, PathBuf};

use sparseconv::io::kitti::{read_label, LearningMap, NUM_CLASSES};
use sparseconv::io::read_points;
use sparseconv::nn::checkpoint::Checkpoint;
use sparseconv::pipeline::{prepare_file, segment, Model, Timings, VoxelizeMode};
use sparseconv::viz::levels;
use sparseconv::viz::rerun::{write_rrd, SceneLog};
use sparseconv::Engine;

fn main() -> sparseconv::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let scan = root.join("data/semantickitti/sequences/00/velodyne/000000.bin");
    let labels = root.join("data/semantickitti/sequences/00/labels/000000.label");
    let model = match args.first() {
        Some(w) => Model::load(Path::new(w), None, None)?.0,
        None => Model::load_arch("minkunet", &Checkpoint::random(1), 0.5, NUM_CLASSES)?,
    };
    let out = args.get(1).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("scan.rrd"));
    let lm = LearningMap::load(&root.join("data/semantickitti/semantic-kitti.yaml"))?;
    let points = read_points(&scan, None)?;
    let input = prepare_file(&scan, None, VoxelizeMode::Mean)?;
    let mut timings = Timings::default();
    let engine = Engine::default();
    // The trace records each conv's output: the recording's per-level views come from it.
    engine.start_trace();
    let seg = segment(&engine, &model, &input, &mut timings)?;
    let levels = levels(&engine.take_trace());
    let gt: Vec<u32> = read_label(&labels, Some(points.len()))?.iter().map(|&r| lm.to_train(r)).collect();
    let log = SceneLog {
        name: scan.display().to_string(),
        points: &points,
        pred: &seg.point_labels,
        gt: Some(&gt),
        voxels: input.voxels.coord_set(),
        voxel_labels: &seg.voxel_labels,
        levels: &levels,
        timings,
    };
    write_rrd(&out, &lm, &log)?;
    println!("wrote {}", out.display());
    Ok(())
}
