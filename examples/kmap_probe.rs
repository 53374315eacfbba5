//! Times the kernel-map builders step by step on the bundled scan (a profiling aid).
use sparseconv::cpu::build_map;
use sparseconv::{KernelSpec, MapBuilder};
use std::time::Instant;
fn main() {
    let scan = std::path::Path::new("data/semantickitti/sequences/00/velodyne/000000.bin");
    let cloud = sparseconv::io::read_points(scan, None).expect("scan");
    let vox = sparseconv::voxel::voxelize(&cloud, 0.05).expect("vox");
    let c = vox.tensor.coord_set().clone();
    for (k, s) in [(3, 1), (2, 2)] {
        for b in std::env::args().skip(1).map(|a| a.parse::<MapBuilder>().expect("builder")) {
            let spec = KernelSpec::new(k, s, 1).expect("spec");
            let mut best = f64::MAX;
            for _ in 0..200 {
                let t = Instant::now();
                std::hint::black_box(build_map(b, &c, spec).expect("map"));
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!("k{k} s{s} {b:?}: best {:.3} ms", best * 1e3);
        }
    }
}
