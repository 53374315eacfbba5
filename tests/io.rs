//! Readers and writers: real files, round trips, and malformed input rejected with the file named.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use sparseconv::io::kitti::{read_bin, read_label, write_label, LearningMap};
use sparseconv::io::npy::{read_npy, read_points as read_npy_points, write_f32, NpyValues};
use sparseconv::io::ply::{read_ply, write_ply};
use sparseconv::io::{read_points, PointFormat};
use sparseconv::voxel::PointCloud;

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sparseconv-io-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    dir.join(name)
}

fn err_names_file(r: sparseconv::Result<impl std::fmt::Debug>, path: &Path, needle: &str) {
    let e = r.expect_err("should fail").to_string();
    assert!(e.contains(&path.display().to_string()), "error does not name the file: {e}");
    assert!(e.contains(needle), "error `{e}` does not mention `{needle}`");
}

#[test]
fn semantickitti_scan_and_labels() {
    let cloud = read_bin(&repo(SCAN)).expect("scan");
    assert_eq!(cloud.len(), 124_668);
    assert_eq!(cloud.dims, 4);
    let labels = read_label(&repo(LABELS), Some(cloud.len())).expect("labels");
    let lm = LearningMap::load(&repo("data/semantickitti/semantic-kitti.yaml")).expect("yaml");
    assert_eq!(lm.to_train(40), 9, "road is training id 9");
    assert_eq!(lm.to_train(10), 1, "car is training id 1");
    assert_eq!(lm.to_train(252), 1, "moving car folds into car");
    assert_eq!(lm.to_raw(9), 40);
    assert_eq!(lm.train_name(9), "road");
    assert_eq!(lm.colors.get(&40), Some(&[255, 0, 255]), "road colour (BGR [255,0,255] -> RGB)");
    let mut hist = [0usize; 20];
    for &l in &labels {
        hist[lm.to_train(l) as usize] += 1;
    }
    // This frame is mostly road, sidewalk, building, vegetation, with cars parked along the street.
    for (id, name) in [(1, "car"), (9, "road"), (13, "building"), (15, "vegetation")] {
        assert!(hist[id] > 1000, "{name}: only {} points", hist[id]);
    }
    // Tiny fixture from mmdetection3d.
    let tiny = read_bin(&repo("data/tiny/sequences/00/velodyne/000000.bin")).expect("tiny");
    assert_eq!(tiny.len(), 50);
    read_label(&repo("data/tiny/sequences/00/labels/000000.label"), Some(50)).expect("tiny labels");
}

#[test]
fn nuscenes_is_chosen_by_suffix_not_size() {
    let p = std::fs::read_dir(repo("data/nuscenes"))
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".pcd.bin"))
        .expect("nuScenes sweep");
    assert_eq!(PointFormat::detect(&p).expect("detect"), PointFormat::NuScenes);
    let c = read_points(&p, None).expect("sweep");
    assert_eq!((c.len(), c.dims), (34_688, 5));
    // The same bytes are also a multiple of 16: forcing the KITTI reader gives a different cloud.
    let k = read_points(&p, Some(PointFormat::Kitti)).expect("as kitti");
    assert_eq!(k.dims, 4);
    assert_ne!(k.len(), c.len());
}

#[test]
fn malformed_scans_and_labels_are_rejected() {
    let p = tmp("trunc.bin");
    std::fs::write(&p, vec![0u8; 16 * 3 + 5]).expect("write");
    err_names_file(read_bin(&p), &p, "truncated");
    let p = tmp("nan.bin");
    let mut bytes = Vec::new();
    for v in [1.0f32, 2.0, 3.0, 0.5, f32::NAN, 0.0, 0.0, 0.1] {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(&p, &bytes).expect("write");
    err_names_file(read_bin(&p), &p, "point 1");
    let p = tmp("inf.pcd.bin");
    let mut bytes = Vec::new();
    for v in [1.0f32, f32::INFINITY, 3.0, 0.5, 0.0] {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(&p, &bytes).expect("write");
    err_names_file(read_points(&p, None), &p, "NaN or infinite");
    let p = tmp("short.label");
    write_label(&p, &[1, 2, 3]).expect("write");
    err_names_file(read_label(&p, Some(4)), &p, "3 labels for a scan of 4 points");
    std::fs::write(&p, [0u8; 7]).expect("write");
    err_names_file(read_label(&p, None), &p, "truncated");
    let p = tmp("missing.bin");
    err_names_file(read_bin(&p), &p, "No such file");
    let p = tmp("scan.xyz");
    err_names_file(read_points(&p, None), &p, "--format");
    let p = tmp("bad.yaml");
    std::fs::write(&p, "learning_map: [1, 2\n").expect("write");
    err_names_file(LearningMap::load(&p), &p, "YAML");
}

#[test]
fn ply_roundtrip_ascii_and_binary() {
    let cloud = PointCloud::new(vec![-1.5, 2.25, 3.0, 0.5, 0.0, -0.125, 1e3, 0.75], 4).expect("cloud");
    for binary in [false, true] {
        let p = tmp(&format!("rt-{binary}.ply"));
        write_ply(&p, &cloud, &["remission"], binary).expect("write");
        let back = read_ply(&p).expect("read");
        assert_eq!(back, cloud, "binary={binary}");
        assert_eq!(read_points(&p, None).expect("dispatch"), cloud);
    }
    // Truncated binary body, missing coordinate, NaN in ascii.
    let p = tmp("rt-true.ply");
    let bytes = std::fs::read(&p).expect("read");
    let cut = tmp("cut.ply");
    std::fs::write(&cut, &bytes[..bytes.len() - 6]).expect("write");
    assert!(read_ply(&cut).is_err(), "truncated binary PLY");
    let noz = tmp("noz.ply");
    std::fs::write(
        &noz,
        "ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nproperty float y\nend_header\n1 2\n",
    )
    .expect("write");
    err_names_file(read_ply(&noz), &noz, "`z`");
    let nan = tmp("nan.ply");
    let bad = PointCloud { data: vec![1.0, f32::NAN, 2.0], dims: 3 };
    write_ply(&nan, &bad, &[], true).expect("write");
    err_names_file(read_ply(&nan), &nan, "NaN");
}

#[test]
fn npy_real_scan_and_roundtrip() {
    let pts = read_npy_points(&repo("data/open3dml/points_000700.npy")).expect("points");
    assert_eq!((pts.len(), pts.dims), (85_962, 3));
    let labels = read_npy(&repo("data/open3dml/labels_000700.npy")).expect("labels");
    assert_eq!(labels.shape, vec![85_962, 1]);
    let l = labels.to_i64().expect("integer labels");
    assert!(l.iter().all(|&v| (0..=19).contains(&v)));
    assert!(matches!(labels.values, NpyValues::I32(_)));
    let p = tmp("rt.npy");
    write_f32(&p, &[2, 3], &[1.0, -2.0, 3.5, 0.0, 1e-3, 7.0]).expect("write");
    let a = read_npy(&p).expect("read");
    assert_eq!(a.shape, vec![2, 3]);
    assert_eq!(a.values, NpyValues::F32(vec![1.0, -2.0, 3.5, 0.0, 1e-3, 7.0]));
    let bytes = std::fs::read(&p).expect("read");
    let cut = tmp("cut.npy");
    std::fs::write(&cut, &bytes[..bytes.len() - 3]).expect("write");
    err_names_file(read_npy(&cut), &cut, "truncated");
    std::fs::write(&cut, b"not numpy").expect("write");
    err_names_file(read_npy(&cut), &cut, "not a valid .npy");
    // Labels are not points.
    err_names_file(
        read_npy_points(&repo("data/open3dml/labels_000700.npy")),
        &repo("data/open3dml/labels_000700.npy"),
        "[N, D>=3]",
    );
}
