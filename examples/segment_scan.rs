//! Segment a LiDAR scan and print how many points fall into each class.
//!
//! ```sh
//! cargo run --release --example segment_scan -- data/semantickitti/sequences/00/velodyne/000000.bin WEIGHTS.safetensors
//! ```
//! Without a weights file it runs synthetic weights, which exercise the whole path but
//! predict nothing meaningful (it says so).

use std::path::{Path, PathBuf};

use sparseconv::io::kitti::{LearningMap, NUM_CLASSES};
use sparseconv::nn::checkpoint::Checkpoint;
use sparseconv::pipeline::{prepare_file, segment, Model, Timings, VoxelizeMode};
use sparseconv::Engine;

fn main() -> sparseconv::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let scan = args
        .first()
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("data/semantickitti/sequences/00/velodyne/000000.bin"));
    let model = match args.get(1) {
        Some(w) => Model::load(Path::new(w), None, None)?.0,
        None => {
            eprintln!("no weights given: using synthetic weights (the classes below are meaningless)");
            Model::load_arch("minkunet", &Checkpoint::random(1), 0.5, NUM_CLASSES)?
        }
    };
    let lm = LearningMap::load(&root.join("data/semantickitti/semantic-kitti.yaml"))?;
    let engine = Engine::default();
    let input = prepare_file(&scan, None, VoxelizeMode::Mean)?;
    let mut t = Timings::default();
    let seg = segment(&engine, &model, &input, &mut t)?;
    let mut hist = [0usize; NUM_CLASSES + 1];
    for &l in &seg.point_labels {
        hist[l as usize] += 1;
    }
    println!("{}: {} points, {} voxels, {:.1} ms", scan.display(), input.points, input.voxels.len(), t.total() * 1e3);
    for (id, n) in hist.iter().enumerate().filter(|(_, &n)| n > 0) {
        println!("{:>16} {:>8}", lm.train_name(id as u32), n);
    }
    Ok(())
}
