//! `segment` over many scans (folders, dataset roots with --sequences, globs; the submission
//! layout; --resume) and `eval` over the folders it writes, on copies of the bundled scans.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use sparseconv::io::kitti::read_label;

const TINY: &str = "data/tiny/sequences/00/velodyne/000000.bin";
const TINY_LABELS: &str = "data/tiny/sequences/00/labels/000000.label";

/// A dataset root: sequences 00 (three frames, labelled) and 08 (two frames, no labels).
fn dataset(tag: &str) -> PathBuf {
    let root = tmp_path(tag, "dataset");
    for (seq, n, labelled) in [("00", 3, true), ("08", 2, false)] {
        let d = root.join("sequences").join(seq);
        std::fs::create_dir_all(d.join("velodyne")).expect("mkdir");
        std::fs::create_dir_all(d.join("labels")).expect("mkdir");
        for i in 0..n {
            std::fs::copy(repo(TINY), d.join("velodyne").join(format!("{i:06}.bin"))).expect("copy");
            if labelled {
                std::fs::copy(repo(TINY_LABELS), d.join("labels").join(format!("{i:06}.label"))).expect("copy");
            }
        }
    }
    root
}

fn s(p: &Path) -> String {
    arg(p)
}

#[test]
fn a_dataset_root_is_written_in_the_submission_layout_and_evaluated() {
    let root = dataset("seq-root");
    let out = tmp_path("seq-root", "out");
    let (code, stdout, err) =
        run_cli(&["--threads", "2", "segment", &s(&root), "--sequences", "00", "--out-dir", &s(&out)]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("segmented 3 scans (0 already written"), "{stdout}");
    assert!(stdout.contains("resident memory:"), "{stdout}");
    // The single-scan command writes the same labels for the same scan.
    let single = tmp_path("seq-root", "single.label");
    let (code, _, err) = run_cli(&["segment", TINY, "--out-labels", &s(&single)]);
    assert_eq!(code, 0, "{err}");
    let want = read_label(&single, None).expect("single");
    for i in 0..3 {
        let p = out.join(format!("sequences/00/predictions/{i:06}.label"));
        assert_eq!(read_label(&p, None).expect("prediction"), want, "{}", p.display());
    }
    assert!(!out.join("sequences/08").exists(), "--sequences 00 leaves 08 alone");
    // --resume skips what is written; without --sequences every sequence is run.
    let (code, stdout, err) = run_cli(&["segment", &s(&root), "--out-dir", &s(&out), "--resume"]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("segmented 2 scans (3 already written, skipped)"), "{stdout}");
    assert!(out.join("sequences/08/predictions/000001.label").is_file());
    // eval over the folders: the one sequence with labels, one table.
    let (code, stdout, err) =
        run_cli(&["eval", &s(&out.join("sequences/00")), "--labels", &s(&root.join("sequences/00"))]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("3 scans") && stdout.contains("mIoU"), "{stdout}");
    // The whole root: sequence 08 has predictions and no ground truth, which is said.
    let (code, _, err) = run_cli(&["eval", &s(&out), "--labels", &s(&root)]);
    assert_eq!(code, 2);
    assert!(err.contains("no ground truth for sequence 08"), "{err}");
}

#[test]
fn folders_and_globs_of_scans() {
    let root = dataset("seq-glob");
    let out = tmp_path("seq-glob", "out");
    let pattern = format!("{}/sequences/00/velodyne/00000[12].bin", s(&root));
    let (code, stdout, err) = run_cli(&["segment", &pattern, "--out-dir", &s(&out)]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("segmented 2 scans"), "{stdout}");
    assert!(out.join("sequences/00/predictions/000002.label").is_file());
    assert!(!out.join("sequences/00/predictions/000000.label").exists());
    // A sequence folder (with velodyne/) and a plain folder of scans.
    let out2 = tmp_path("seq-glob", "out2");
    let (code, stdout, err) = run_cli(&["segment", &s(&root.join("sequences/08")), "--out-dir", &s(&out2)]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("segmented 2 scans"), "{stdout}");
    assert!(out2.join("sequences/08/predictions/000001.label").is_file());
}

#[test]
fn bad_sequence_input_exits_2_with_one_line() {
    let root = dataset("seq-bad");
    let out = tmp_path("seq-bad", "out");
    let empty = tmp_path("seq-bad", "empty");
    std::fs::create_dir_all(&empty).expect("mkdir");
    let (r, o, e) = (s(&root), s(&out), s(&empty));
    let nomatch = format!("{r}/nothing*.bin");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["segment", &r], "--out-dir"),
        (vec!["segment", &r, "--sequences", "05", "--out-dir", &o], "sequences/05"),
        (vec!["segment", TINY, "--sequences", "00"], "dataset root"),
        (vec!["segment", &e, "--out-dir", &o], "no scan files"),
        (vec!["segment", &nomatch, "--out-dir", &o], "matches no scan"),
        (vec!["segment", &r, "--out-dir", &o, "--out-labels", "x.label"], "--out-labels"),
        (vec!["segment", TINY, TINY, "--out-dir", &o], "two scans would write"),
        (vec!["segment", TINY, "--resume"], "--out-dir"),
    ];
    for (args, needle) in cases {
        let (code, _, err) = run_cli(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn a_batch_segments_each_scan_as_alone() {
    use sparseconv::pipeline::{self, Timings, VoxelizeMode};
    use sparseconv::{Device, Engine, Grouping, MapBuilder};
    let (model, _) = pipeline::Model::load(&repo("data/models/minkunet_cr0.5.safetensors"), None, None).expect("model");
    let cloud = sparseconv::io::read_points(&repo(common::SCAN), None).expect("scan");
    let e = Engine::new(Device::Cpu, MapBuilder::Sort, Grouping::Heuristic);
    let one = pipeline::segment(
        &e,
        &model,
        &pipeline::prepare_points(&cloud, VoxelizeMode::Mean).expect("one"),
        &mut Timings::default(),
    )
    .expect("segment");
    let two = pipeline::prepare_batch(&[cloud.clone(), cloud.clone()]).expect("batch");
    assert_eq!(two.points, 2 * cloud.len());
    let both = pipeline::segment(&e, &model, &two, &mut Timings::default()).expect("segment batch");
    let n = cloud.len();
    assert_eq!(both.point_labels[..n], one.point_labels[..], "first scan of the batch");
    assert_eq!(both.point_labels[n..], one.point_labels[..], "second scan of the batch");
    let (code, out, err) = run_cli(&["bench", TINY, "--runs", "1", "--warmup", "0", "--batch", "3"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("batches of 3") && out.contains("peak resident memory"), "{out}");
    let (code, _, err) = run_cli(&["bench", TINY, "--batch", "0"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--batch"), "{err}");
}
