//! Kernel-map build on the real scan at 5 cm: hash vs merge-sort, submanifold k3 and down k2 s2.
//!
//! `cargo bench --bench kmap` (divan; each build starts from the coordinates, no cache).

use std::sync::{Arc, OnceLock};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use sparseconv::cpu::build_map;
use sparseconv::voxel::voxelize;
use sparseconv::{CoordSet, KernelSpec, MapBuilder};

fn coords() -> &'static Arc<CoordSet> {
    static C: OnceLock<Arc<CoordSet>> = OnceLock::new();
    C.get_or_init(|| {
        let scan = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("data/semantickitti/sequences/00/velodyne/000000.bin");
        let cloud = sparseconv::io::read_points(&scan, None).expect("bundled scan");
        voxelize(&cloud, 0.05).expect("voxelize").tensor.coord_set().clone()
    })
}

fn main() {
    let c = coords();
    eprintln!("# kmap bench: {} voxels, {} threads", c.len(), rayon::current_num_threads());
    divan::main();
}

#[divan::bench(args = ["hash", "sort"])]
fn submanifold_k3(bencher: divan::Bencher, builder: &str) {
    let b: MapBuilder = builder.parse().expect("builder");
    let spec = KernelSpec::new(3, 1, 1).expect("spec");
    bencher.bench(|| build_map(b, coords(), spec).expect("map"));
}

#[divan::bench(args = ["hash", "sort"])]
fn down_k2_s2(bencher: divan::Bencher, builder: &str) {
    let b: MapBuilder = builder.parse().expect("builder");
    let spec = KernelSpec::new(2, 2, 1).expect("spec");
    bencher.bench(|| build_map(b, coords(), spec).expect("map"));
}

#[divan::bench]
fn voxelize_scan(bencher: divan::Bencher) {
    let scan =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/semantickitti/sequences/00/velodyne/000000.bin");
    let cloud = sparseconv::io::read_points(&scan, None).expect("bundled scan");
    bencher.bench(|| voxelize(&cloud, 0.05).expect("voxelize"));
}
