//! Shared test helpers: random clouds, the real scan, and the labelled backend/strategy matrix.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sparseconv::bench::pseudo_random;
use sparseconv::voxel::{voxelize, Voxelized};
use sparseconv::{CoordSet, Device, Engine, Grouping, GroupingParams, MapBuilder, SparseTensor};

/// Path inside the repository.
pub fn repo(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// Run the `sparseconv` binary: exit code, stdout, stderr.
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sparseconv")).args(args).output().expect("run sparseconv");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

/// `name` in a temporary directory of this test process, one per `tag`.
pub fn tmp_path(tag: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sparseconv-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    dir.join(name)
}

/// A path as a command-line argument.
pub fn arg(p: &Path) -> String {
    p.to_str().expect("utf8 path").to_string()
}

/// The bundled SemanticKITTI scan.
pub const SCAN: &str = "data/semantickitti/sequences/00/velodyne/000000.bin";
/// Its labels.
pub const LABELS: &str = "data/semantickitti/sequences/00/labels/000000.label";

/// The real scan voxelized at 5 cm.
pub fn real_scan() -> Voxelized {
    let cloud = sparseconv::io::read_points(&repo(SCAN), None).expect("bundled scan");
    voxelize(&cloud, 0.05).expect("voxelize")
}

/// Unique random coordinates in `[-half, half)^3` over `batches` scans, multiples of `stride`,
/// about `fill` of the cells occupied.
pub fn random_coords(seed: u64, batches: i32, half: i32, stride: i32, fill: f32) -> Vec<[i32; 4]> {
    let side = (2 * half / stride) as usize;
    let cells = side * side * side * batches as usize;
    let r = pseudo_random(cells, seed, 1.0);
    let mut v = Vec::new();
    let mut i = 0;
    for b in 0..batches {
        for x in 0..side as i32 {
            for y in 0..side as i32 {
                for z in 0..side as i32 {
                    if (r[i] + 1.0) * 0.5 < fill {
                        v.push([b, x * stride - half, y * stride - half, z * stride - half]);
                    }
                    i += 1;
                }
            }
        }
    }
    // Shuffle deterministically so row order is not key order.
    let keys = pseudo_random(v.len(), seed ^ 0xABCD, 1.0);
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| keys[a].total_cmp(&keys[b]));
    idx.into_iter().map(|i| v[i]).collect()
}

/// A random sparse tensor at tensor stride `stride`.
pub fn random_tensor(seed: u64, batches: i32, half: i32, stride: i32, fill: f32, c: usize) -> SparseTensor {
    let coords = random_coords(seed, batches, half, stride, fill);
    let n = coords.len();
    let set = Arc::new(CoordSet::new(coords, stride).expect("valid coords"));
    SparseTensor::new(set, pseudo_random(n * c, seed + 1, 1.0), c).expect("tensor")
}

/// One labelled configuration of the engine.
pub struct Strategy {
    pub label: String,
    pub engine: Engine,
}

/// Every CPU kernel-map builder × grouping mode, labelled so a failure names its path.
pub fn cpu_strategies() -> Vec<Strategy> {
    let mut out = Vec::new();
    for (bname, builder) in [("hash", MapBuilder::Hash), ("sort", MapBuilder::Sort)] {
        for (gname, grouping) in [
            ("ungrouped", Grouping::Off),
            ("grouped", Grouping::Fixed(GroupingParams { tolerance: 0.9, max_rows: 1 << 20 })),
            ("tuned", Grouping::Auto),
            ("output-tiled", Grouping::OutputTiled),
            ("heuristic", Grouping::Heuristic),
        ] {
            out.push(Strategy {
                label: format!("cpu/{bname}/{gname}"),
                engine: Engine::new(Device::Cpu, builder, grouping),
            });
        }
    }
    out
}

/// [`cpu_strategies`] and the GPU backend with both map builders, where an adapter exists
/// (lavapipe counts). Without one the GPU part is skipped loudly, and under `CI=true` that is
/// a failure: CI must run every backend.
pub fn every_backend() -> Vec<Strategy> {
    let mut out = cpu_strategies();
    match Device::gpu() {
        Ok(gpu) => {
            for (bname, builder) in [("hash", MapBuilder::Hash), ("sort", MapBuilder::Sort)] {
                out.push(Strategy {
                    label: format!("gpu/{bname}/tuned"),
                    engine: Engine::new(gpu.clone(), builder, Grouping::Auto),
                });
            }
        }
        Err(e) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true but no GPU adapter: {e}");
            }
            eprintln!("\n*** SKIPPED: the GPU strategies need an adapter: {e} ***\n");
        }
    }
    out
}

/// Same length and the same bits in every element (a truncated output is not "equal").
pub fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// max |a - b| / max |b| (0 when both are empty or zero).
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num = a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64).fold(0.0, f64::max);
    let den = b.iter().map(|y| y.abs() as f64).fold(0.0, f64::max);
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

/// Reorder the rows of `t` to follow `coords` (both must hold the same coordinate set).
pub fn rows_in_order(t: &SparseTensor, coords: &[[i32; 4]]) -> Vec<f32> {
    let c = t.channels();
    let pos: std::collections::HashMap<[i32; 4], usize> = t.coords().iter().enumerate().map(|(i, &q)| (q, i)).collect();
    assert_eq!(pos.len(), coords.len(), "output coordinate count differs");
    let mut out = Vec::with_capacity(coords.len() * c);
    for q in coords {
        let i = *pos.get(q).unwrap_or_else(|| panic!("output coordinate {q:?} missing"));
        out.extend_from_slice(&t.feats()[i * c..(i + 1) * c]);
    }
    out
}

/// Coordinates as a sorted set.
pub fn coord_set(c: &[[i32; 4]]) -> BTreeSet<[i32; 4]> {
    c.iter().copied().collect()
}
