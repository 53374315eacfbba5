//! `segment`, `eval` and `bench` end to end on the real scan, with synthetic MinkUNet weights
//! (no trained model is bundled yet), and their answers to bad input.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use common::*;
use sparseconv::io::kitti::{read_label, write_label, LearningMap};
use sparseconv::io::tensors::TensorFile;
use sparseconv::nn::checkpoint::{save, Checkpoint};
use sparseconv::nn::minkunet::MinkUNet;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sparseconv"))
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sparseconv-seg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    dir.join(name)
}

fn weights(cr: f32, meta: bool) -> PathBuf {
    let ck = Checkpoint::random(3);
    MinkUNet::load(&ck, cr, 19).expect("shapes");
    let mut m = HashMap::new();
    if meta {
        m.insert("arch".to_string(), "minkunet".to_string());
        m.insert("cr".to_string(), cr.to_string());
        m.insert("classes".to_string(), "19".to_string());
        m.insert("voxel_size".to_string(), "0.05".to_string());
    }
    let p = tmp(&format!("w-{cr}-{meta}.safetensors"));
    save(&p, &ck.synthesized(), m, false).expect("save");
    p
}

fn run(args: &[&str]) -> (i32, String, String) {
    let o = bin().args(args).output().expect("run");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

fn s(p: &std::path::Path) -> String {
    p.to_str().expect("utf8").to_string()
}

#[test]
fn segment_writes_labels_and_logits_that_round_trip() {
    let w = weights(0.5, true);
    let labels = tmp("pred.label");
    let logits = tmp("logits.safetensors");
    let scan = repo(SCAN);
    let (code, out, err) = run(&[
        "segment",
        &s(&scan),
        "--model",
        &s(&w),
        "--out-labels",
        &s(&labels),
        "--logits",
        &s(&logits),
        "--labels",
        &s(&repo(LABELS)),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("124668 points") && out.contains("mIoU"), "{out}");
    let pred = read_label(&labels, Some(124_668)).expect("labels");
    let lm = LearningMap::load(&repo("data/semantickitti/semantic-kitti.yaml")).expect("yaml");
    assert!(pred.iter().all(|&r| lm.to_train(r) != 0), "every point gets a real class (raw ids)");
    let f = TensorFile::open(&logits).expect("logits");
    let c = f.i32("coords", 2).expect("coords");
    let l = f.f32("logits", 2).expect("logits");
    assert_eq!(f.f32("feats", 2).expect("feats").shape, vec![c.shape[0], 4]);
    assert_eq!(l.shape, vec![c.shape[0], 19]);
    // Voxelized input goes through unchanged and gives the same logits.
    let logits2 = tmp("logits2.safetensors");
    let (code, _, err) = run(&["segment", &s(&logits), "--model", &s(&w), "--logits", &s(&logits2)]);
    assert_eq!(code, 0, "{err}");
    let l2 = TensorFile::open(&logits2).expect("logits").f32("logits", 2).expect("logits");
    assert_eq!(l.data, l2.data, "same voxels, same weights, same bits");
    // eval of the written predictions against ground truth, and of ground truth against itself.
    let (code, out, err) = run(&["eval", &s(&repo(LABELS)), "--labels", &s(&repo(LABELS))]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("mIoU 100.0%"), "{out}");
    let (code, out, _) = run(&["eval", &s(&labels), "--labels", &s(&repo(LABELS))]);
    assert_eq!(code, 0);
    assert!(out.contains("road"), "{out}");
    // eval on the scan itself segments it first: the same numbers as on the written labels.
    let (code, out2, err) = run(&["eval", &s(&scan), "--model", &s(&w), "--labels", &s(&repo(LABELS))]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, out2);
}

#[test]
fn cr_comes_from_metadata_or_shapes_and_contradictions_fail() {
    let with_meta = weights(0.5, true);
    let no_meta = weights(0.25, false);
    let tiny = repo("data/tiny/sequences/00/velodyne/000000.bin");
    let (code, out, err) = run(&["segment", &s(&tiny), "--model", &s(&no_meta)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("cr=0.25"), "cr inferred from the stem width: {out}");
    let (code, _, err) = run(&["segment", &s(&tiny), "--model", &s(&with_meta), "--cr", "1.0"]);
    assert_eq!(code, 2);
    assert!(err.contains("cr = 0.5") && err.contains("--cr 1"), "{err}");
    let (code, _, err) = run(&["segment", &s(&tiny), "--model", &s(&no_meta), "--cr", "0.5"]);
    assert_eq!(code, 2);
    assert!(err.contains("stem.0.kernel"), "{err}");
}

#[test]
fn bad_segment_eval_bench_input_exits_2_with_one_line() {
    let w = weights(0.5, true);
    let empty = tmp("empty.bin");
    std::fs::write(&empty, b"").expect("write");
    let nan = tmp("nan.bin");
    let mut b = Vec::new();
    for v in [f32::NAN, 0.0, 0.0, 0.0] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(&nan, b).expect("write");
    let short = tmp("short.label");
    write_label(&short, &[10, 40]).expect("write");
    let scan = s(&repo(SCAN));
    let bad_cfg = tmp("bad.yaml");
    std::fs::write(&bad_cfg, "data: [x]\nlr_max: 1\n").expect("write");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["segment".into(), s(&empty), "--model".into(), s(&w)], "no points"),
        (vec!["segment".into(), s(&nan), "--model".into(), s(&w)], "NaN"),
        (vec!["segment".into(), s(&tmp("nope.bin")), "--model".into(), s(&w)], "nope.bin"),
        (vec!["segment".into(), scan.clone(), "--model".into(), s(&tmp("nope.safetensors"))], "nope.safetensors"),
        (vec!["segment".into(), scan.clone(), "--model".into(), s(&repo(SCAN))], "not a valid safetensors"),
        (
            vec!["segment".into(), scan.clone(), "--model".into(), s(&w), "--device".into(), "tpu".into()],
            "possible values: cpu, gpu",
        ),
        (vec!["train".into(), "--out".into(), s(&tmp("run")), "--data".into(), s(&repo(SCAN))], "SemanticKITTI root"),
        (vec!["train".into(), "--out".into(), s(&tmp("run")), "--config".into(), s(&tmp("none.yaml"))], "none.yaml"),
        (
            vec!["train".into(), "--out".into(), s(&tmp("run")), "--config".into(), s(&bad_cfg)],
            "unknown setting `lr_max`",
        ),
        (vec!["train".into(), "--out".into(), s(&tmp("run")), "--resume".into(), s(&w)], "not a training checkpoint"),
        (
            vec!["segment".into(), scan.clone(), "--model".into(), s(&w), "--labels".into(), s(&short)],
            "2 labels for a scan of 124668",
        ),
        (
            vec!["segment".into(), scan.clone(), "--model".into(), s(&w), "--voxelize".into(), "max".into()],
            "--voxelize",
        ),
        (vec!["eval".into(), s(&short), "--labels".into(), s(&repo(LABELS))], "124668"),
        (vec!["bench".into(), s(&empty)], "no points"),
        (vec!["bench".into(), scan.clone(), "--cr".into(), "0".into()], "width factor"),
    ];
    for (args, needle) in cases {
        let a: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
        let (code, _, err) = run(&a);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: stderr `{err}` should mention `{needle}`");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    }
}

#[test]
fn gpu_without_a_matching_adapter_is_a_clear_error() {
    let w = weights(0.25, true);
    let o = bin()
        .args(["segment", &s(&repo(SCAN)), "--model", &s(&w), "--device", "gpu"])
        .env("SPARSECONV_ADAPTER", "no-such-adapter-anywhere")
        // Mesa prints a warning about this variable when it is unset.
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("no GPU") && err.contains("no-such-adapter-anywhere") && err.contains("lavapipe"), "{err}");
}

#[cfg(not(feature = "rerun"))]
#[test]
fn rerun_without_the_feature_is_a_clear_error() {
    let w = weights(0.25, true);
    let (code, _, err) = run(&["segment", &s(&repo(SCAN)), "--model", &s(&w), "--rerun", &s(&tmp("x.rrd"))]);
    assert_eq!(code, 2);
    assert!(err.contains("--features rerun"), "{err}");
}

#[test]
fn bench_reports_throughput_as_json() {
    let (code, out, err) = run(&["bench", &s(&repo(SCAN)), "--cr", "0.25", "--warmup", "0", "--runs", "1", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.trim().starts_with('{') && out.contains("\"scans_per_s\"") && out.contains("\"kernel_maps\""), "{out}");
}

/// The README's first command: the bundled model on the bundled scan gets the big classes right
/// (it was trained on this scan: this checks the pipeline and the shipped weights, not
/// generalization).
#[test]
fn demo_segments_the_bundled_scan_with_the_bundled_model() {
    let (code, out, err) = run(&["demo", "--rerun", &s(&tmp("demo.rrd"))]);
    assert_eq!(code, 0, "{err}");
    let iou = |class: &str| -> f64 {
        let line = out
            .lines()
            .find(|l| l.split_whitespace().count() == 2 && l.starts_with(class) && l.trim_end().ends_with('%'))
            .unwrap_or_else(|| panic!("no IoU line for {class} in:\n{out}"));
        line.split_whitespace().last().and_then(|v| v.trim_end_matches('%').parse().ok()).expect("IoU value")
    };
    for class in ["road", "car", "building", "vegetation"] {
        assert!(iou(class) > 60.0, "{class} IoU {} in:\n{out}", iou(class));
    }
    assert!(out.contains("mIoU"), "{out}");
}

#[test]
fn bench_reads_the_architecture_from_the_weights() {
    let w = tmp("bench_spvcnn.safetensors");
    let (code, _, err) = run(&["init-weights", &w.display().to_string(), "--arch", "spvcnn", "--cr", "0.25"]);
    assert_eq!(code, 0, "{err}");
    let scan = repo("data/tiny/sequences/00/velodyne/000000.bin").display().to_string();
    let (code, out, err) =
        run(&["bench", &scan, "--model", &w.display().to_string(), "--warmup", "0", "--runs", "1", "--json"]);
    assert_eq!(code, 0, "SPVCNN weights without --arch: {err}");
    assert!(out.contains("\"arch\":\"spvcnn\""), "{out}");
    // An explicit --arch that contradicts the weights is still refused.
    let (code, _, err) =
        run(&["bench", &scan, "--model", &w.display().to_string(), "--arch", "minkunet", "--runs", "1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.lines().count() == 1, "{err}");
}

#[test]
fn eval_warns_about_label_ids_the_learning_map_lacks() {
    let mut raw = read_label(&repo("data/tiny/sequences/00/labels/000000.label"), None).expect("labels");
    raw[..3].fill(999);
    let gt = tmp("unknown_ids.label");
    write_label(&gt, &raw).expect("write");
    let s = |p: &PathBuf| p.display().to_string();
    let (code, out, err) = run(&["eval", &s(&gt), "--labels", &s(&gt)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("mIoU"), "{out}");
    assert!(err.contains("3 of 50 labels") && err.contains("missing from the learning map"), "{err}");
    // Once per file: the prediction and the ground truth are the same file here.
    assert_eq!(err.matches("warning").count(), 2, "{err}");
}
