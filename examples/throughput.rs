//! Measure end-to-end segmentation throughput (points in, labels out) on the bundled scan.
//!
//! ```sh
//! cargo run --release --example throughput -- [cr] [runs]
//! ```
//! Synthetic weights of the right shapes: the speed does not depend on the weight values.

use std::path::Path;
use std::time::Instant;

use sparseconv::bench::Stats;
use sparseconv::io::kitti::NUM_CLASSES;
use sparseconv::nn::checkpoint::Checkpoint;
use sparseconv::pipeline::{prepare_file, segment, Model, Timings, VoxelizeMode};
use sparseconv::Engine;

fn main() -> sparseconv::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cr: f32 = args.first().and_then(|v| v.parse().ok()).unwrap_or(0.5);
    let runs: usize = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(10);
    let scan = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/semantickitti/sequences/00/velodyne/000000.bin");
    let model = Model::load_arch("minkunet", &Checkpoint::random(1), cr, NUM_CLASSES)?;
    let engine = Engine::default();
    let mut samples = Vec::new();
    for r in 0..runs + 2 {
        let t0 = Instant::now();
        let input = prepare_file(&scan, None, VoxelizeMode::Mean)?;
        let seg = segment(&engine, &model, &input, &mut Timings::default())?;
        std::hint::black_box(&seg.point_labels);
        if r >= 2 {
            samples.push(t0.elapsed().as_secs_f64());
        }
    }
    let s = Stats::from_samples(samples);
    println!(
        "MinkUNet cr={cr}, {} threads: {:.1} ms per scan (median of {runs}, ±{:.1}) = {:.2} scans/s",
        rayon::current_num_threads(),
        s.median * 1e3,
        s.mad * 1e3,
        1.0 / s.median
    );
    Ok(())
}
