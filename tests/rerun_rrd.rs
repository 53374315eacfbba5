//! `segment --rerun` writes recordings laid out for a person (read back from the file with the
//! pinned SDK's decoder): prediction, ground truth and errors as separate roots with a
//! blueprint of separate views, classes through annotation contexts, one entity per network
//! level, no single-point time series for one scan, one time step per scan for a sequence, and
//! the voxel-pruning view when a plan ran.
#![cfg(feature = "rerun")]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use sparseconv::nn::checkpoint::{save, Checkpoint};
use sparseconv::nn::minkunet::MinkUNet;
use sparseconv::viz::rerun::{read_recording, RecordingContents};

fn weights(dir: &Path) -> PathBuf {
    let ck = Checkpoint::random(5);
    MinkUNet::load(&ck, 0.25, 19).expect("shapes");
    let w = dir.join("w.safetensors");
    save(&w, &ck.synthesized(), HashMap::new(), false).expect("save");
    w
}

fn segment(args: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_sparseconv")).arg("segment").args(args).output().expect("run");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn has(r: &RecordingContents, entity: &str, component: &str) -> bool {
    r.entities.get(entity).is_some_and(|e| e.components.iter().any(|c| c.contains(component)))
}

/// The blueprint holds a viewport, containers and at least `views` views, and asks for no
/// views of its own making.
fn check_blueprint(r: &RecordingContents, views: usize) {
    let n_views = r.blueprint.keys().filter(|k| k.starts_with("/view/")).count();
    let n_containers = r.blueprint.keys().filter(|k| k.starts_with("/container/")).count();
    assert!(r.blueprint.contains_key("/viewport"), "no viewport in the blueprint: {:?}", r.blueprint.keys());
    assert!(n_views >= views, "{n_views} views in the blueprint, expected at least {views}");
    assert!(n_containers >= 3, "{n_containers} containers (tabs, rows) in the blueprint");
}

#[test]
fn one_scan_gets_separate_views_levels_and_no_time_series() {
    let dir = tmp_path("rrd-one", "");
    let w = weights(&dir);
    let rrd = dir.join("scan.rrd");
    // The 50-point fixture: CI builds this test unoptimized (profile ci-rerun).
    let scan = repo("data/tiny/sequences/00/velodyne/000000.bin");
    let labels = repo("data/tiny/sequences/00/labels/000000.label");
    segment(&[&arg(&scan), "--model", &arg(&w), "--labels", &arg(&labels), "--rerun", &arg(&rrd)]);
    let r = read_recording(&rrd).expect("read back");
    // Three separate roots, each with points carrying class ids (colours from the contexts).
    for e in ["/prediction", "/ground_truth", "/errors"] {
        assert!(has(&r, e, "class_ids"), "{e} has no class ids: {:?}", r.entities.get(e));
        assert!(has(&r, e, "positions"), "{e} has no points");
    }
    assert!(has(&r, "/", "AnnotationContext"), "no class annotation context at /: {:?}", r.entities.keys());
    assert!(has(&r, "/errors", "AnnotationContext"), "no right/wrong annotation context at /errors");
    assert!(has(&r, "/summary", "text"));
    // One entity per network level (MinkUNet: strides 1 to 16), voxels carrying classes.
    for s in [1, 2, 4, 8, 16] {
        let e = format!("/levels/stride_{s}");
        assert!(has(&r, &e, "class_ids") && has(&r, &e, "radii"), "{e} missing: {:?}", r.entities.keys());
    }
    // One scan: its times are in the summary, not single-point time series.
    let series: Vec<&String> = r.entities.keys().filter(|k| k.starts_with("/timings")).collect();
    assert!(series.is_empty(), "single-point time series for one scan: {series:?}");
    assert!(!r.entities.keys().any(|k| k.starts_with("/voxel_pruning")), "no voxel plan ran");
    // Three scene views and five level views.
    check_blueprint(&r, 8);
    // A file that is not a recording is an error, not a panic.
    assert!(read_recording(&repo(SCAN)).is_err());
}

#[test]
fn a_sequence_gets_a_time_step_per_scan_and_the_pruning_view() {
    let dir = tmp_path("rrd-seq", "");
    let w = weights(&dir);
    // A two-scan sequence in the SemanticKITTI layout, labels beside the scans.
    let seq = dir.join("dataset/sequences/00");
    for (sub, ext) in [("velodyne", "bin"), ("labels", "label")] {
        std::fs::create_dir_all(seq.join(sub)).expect("dir");
        for f in ["000000", "000001"] {
            std::fs::copy(
                repo(&format!("data/tiny/sequences/00/{sub}/000000.{ext}")),
                seq.join(format!("{sub}/{f}.{ext}")),
            )
            .expect("copy");
        }
    }
    let rrd = dir.join("seq.rrd");
    segment(&[
        &arg(&seq),
        "--model",
        &arg(&w),
        "--out-dir",
        &arg(&dir.join("out")),
        "--rerun",
        &arg(&rrd),
        "--voxel-prune",
        "0.5",
    ]);
    let r = read_recording(&rrd).expect("read back");
    for stage in ["voxelize", "kernel_maps", "conv", "other", "total"] {
        let e = r.entities.get(&format!("/timings/{stage}_ms")).expect("a time series per stage");
        assert_eq!(e.rows, 2, "{stage}: one step per scan");
        assert!(e.timelines.contains("scan"), "{stage} is not on the scan timeline: {:?}", e.timelines);
    }
    let pred = r.entities.get("/prediction").expect("prediction");
    assert_eq!(pred.rows, 2);
    assert!(pred.timelines.contains("scan"));
    // Labels beside the scans: ground truth and errors per scan.
    assert_eq!(r.entities.get("/errors").map(|e| e.rows), Some(2));
    // --voxel-prune 0.5 prunes every level's block convs: a kept/pruned view per level.
    for s in [1, 2, 4, 8, 16] {
        let e = format!("/voxel_pruning/stride_{s}");
        assert!(has(&r, &e, "class_ids"), "{e} missing: {:?}", r.entities.keys());
    }
    assert!(has(&r, "/voxel_pruning", "AnnotationContext"));
    // Three scene views, five level views, five pruning views, the time series.
    check_blueprint(&r, 14);
}
