//! `sparseconv prune` end to end: groups listed, a pruned file written that `segment`, `bench
//! --baseline` and `train --init` take like any model, and one line with exit 2 for bad input.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use sparseconv::nn::checkpoint::Checkpoint;
use sparseconv::pipeline::Model;

const MODEL: &str = "data/models/minkunet_cr0.5.safetensors";
const TINY: &str = "data/tiny/sequences/00/velodyne/000000.bin";

fn tmp(name: &str) -> PathBuf {
    tmp_path("prune", name)
}

use common::{arg as s, run_cli as run};

/// `prune MODEL ARGS --scan TINY --runs 0 --out OUT` (no timing), then `segment` of the result;
/// returns prune's stdout.
fn prune_and_segment(args: &[&str], out: &Path) -> String {
    let mut all = vec!["prune".to_string(), s(&repo(MODEL))];
    all.extend(args.iter().map(|a| a.to_string()));
    all.extend(["--scan", &s(&repo(TINY)), "--runs", "0", "--out", &s(out)].map(String::from));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let (code, stdout, err) = run(&all);
    assert_eq!(code, 0, "{args:?}: {err}");
    let (code, _, err) = run(&["segment", &s(&repo(TINY)), "--model", &s(out)]);
    assert_eq!(code, 0, "{args:?}: the pruned model does not segment: {err}");
    stdout
}

#[test]
fn list_groups_prints_every_group_with_its_layers() {
    let (code, out, err) = run(&["prune", &s(&repo(MODEL)), "--list-groups"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("35 channel dependency groups of minkunet"), "{out}");
    // The stem output is read by stage 1 and, as the last skip, after up4's 48 channels.
    assert!(out.contains("up4.1.0.net.0.kernel[+48]"), "{out}");
    assert!(out.contains("(fixed: network input or logits)"), "{out}");
}

#[test]
fn a_pruned_model_segments_benches_and_trains() {
    let pruned = tmp("p50.safetensors");
    let (code, out, err) = run(&[
        "--threads",
        "2",
        "prune",
        &s(&repo(MODEL)),
        "--ratio",
        "0.5",
        "--scan",
        &s(&repo(TINY)),
        "--runs",
        "1",
        "--rounds",
        "1",
        "--out",
        &s(&pruned),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("16/16/32/64/128/128/64/48/48 -> 16/16/16/32/64/64/32/32/32"), "{out}");
    assert!(out.contains("up1.1.0.net.0") && out.contains("192x128 -> 96x64"), "{out}");
    assert!(out.contains("speed-up per round") && out.contains("conv FLOPs ratio"), "{out}");
    let ck = Checkpoint::load(&pruned).expect("pruned file");
    assert!(ck.metadata().get("pruned").is_some_and(|v| v.contains("channel l1 local ratio 0.5")));
    let (m, _) = Model::load(&pruned, None, None).expect("loads as a model");
    assert_eq!(m.desc().widths_summary(), "16/16/16/32/64/64/32/32/32");

    let (code, out, err) = run(&["segment", &s(&repo(TINY)), "--model", &s(&pruned)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("voxels"), "{out}");
    let (code, out, err) = run(&[
        "bench",
        &s(&repo(TINY)),
        "--model",
        &s(&pruned),
        "--baseline",
        &s(&repo(MODEL)),
        "--warmup",
        "0",
        "--runs",
        "1",
        "--rounds",
        "2",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("speed-up of model over baseline") && out.contains("16/16/16/32"), "{out}");

    let export = tmp("trained.safetensors");
    train_one_step(&pruned, "train", &export);
    let (m, _) = Model::load(&export, None, None).expect("trained pruned model loads");
    assert_eq!(m.desc().widths_summary(), "16/16/16/32/64/64/32/32/32", "training keeps the pruned structure");
}

/// `train --init MODEL` for one step on the bundled scan, exported; returns its stderr.
fn train_one_step(model: &std::path::Path, out: &str, export: &std::path::Path) -> String {
    let (code, _, err) = run(&[
        "train",
        "--init",
        &s(model),
        "--data",
        &s(&repo("data/semantickitti")),
        "--max-steps",
        "1",
        "--out",
        &s(&tmp(out)),
        "--export",
        &s(export),
    ]);
    assert_eq!(code, 0, "{err}");
    err
}

#[test]
fn an_offset_pruned_model_lists_its_offsets_and_segments() {
    let pruned = tmp("o30.safetensors");
    let out = prune_and_segment(&["--granularity", "offset", "--ratio", "0.3"], &pruned);
    assert!(out.contains("offsets kept") && out.contains("19/27"), "{out}");
    let ck = Checkpoint::load(&pruned).expect("pruned file");
    assert!(ck.metadata().get("kept_offsets.stem.0.kernel").is_some_and(|v| v.split(',').count() == 19));
    assert!(ck.get("mask.stem.0.kernel").is_some(), "training holds the removed offsets at zero");
}

#[test]
fn per_map_offset_pruning_shrinks_the_maps_themselves() {
    let pruned = tmp("o50map.safetensors");
    let out = prune_and_segment(&["--granularity", "offset", "--per-map", "--ratio", "0.5"], &pruned);
    // Every conv on a map keeps the same 13 of 27 offsets (13.5 removed rounds to 14), so the maps hold only those.
    assert!(out.contains("stride 1 k3 s1: 13/27") && out.contains("stride 16 k3 s1: 13/27"), "{out}");
    let ck = Checkpoint::load(&pruned).expect("pruned file");
    let kept = |n: &str| ck.metadata().get(&format!("kept_offsets.{n}.kernel")).cloned();
    assert_eq!(kept("stem.0"), kept("up4.1.1.net.3"), "convs on one map keep the same offsets");
    assert!(kept("stem.0").is_some_and(|v| v.split(',').count() == 13));
}

#[test]
fn weight_sparse_models_are_written_and_segment() {
    for (args, fmt) in [
        (vec!["--granularity", "block", "--ratio", "0.8"], "block"),
        (vec!["--granularity", "nm", "--nm", "1:4"], "1:4"),
        (vec!["--granularity", "element", "--ratio", "0.9", "--global"], "element"),
    ] {
        let pruned = tmp(&format!("{fmt}.safetensors").replace(':', "-"));
        let out = prune_and_segment(&args, &pruned);
        assert!(out.contains("on the GPU they run dense"), "{out}");
        let ck = Checkpoint::load(&pruned).expect("pruned file");
        assert_eq!(ck.metadata().get("format.up1.1.0.net.0.kernel").map(String::as_str), Some(fmt), "{fmt}");
        if fmt != "element" {
            continue;
        }
        // Fine-tuning from it: a tenth of the rate, and every pruned weight stays exactly zero.
        let export = tmp("trained_sparse.safetensors");
        let err = train_one_step(&pruned, "train_sparse", &export);
        assert!(err.contains("lr 2e-4"), "the default 2e-3 scaled by 0.1: {err}");
        let tuned = Checkpoint::load(&export).expect("exported");
        let name = "up1.1.0.net.0.kernel";
        let (a, b) = (&ck.get(name).expect("pruned").data, &tuned.get(name).expect("tuned").data);
        assert!(a.iter().zip(b).all(|(&p, &t)| p != 0.0 || t == 0.0), "a pruned weight grew back");
        assert!(a.iter().zip(b).any(|(&p, &t)| p != t), "the kept weights trained");
    }
}

#[test]
fn taylor_scores_come_from_labelled_scans() {
    let pruned = tmp("taylor.safetensors");
    let (code, out, err) = run(&[
        "prune",
        &s(&repo(MODEL)),
        "--criterion",
        "taylor",
        "--data",
        &s(&repo("data/semantickitti")),
        "--ratio",
        "0.3",
        "--global",
        "--round-to",
        "8",
        "--scan",
        &s(&repo(TINY)),
        "--runs",
        "0",
        "--out",
        &s(&pruned),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("pruned: channel taylor global ratio 0.3"), "{out}");
    let (m, _) = Model::load(&pruned, None, None).expect("loads");
    assert!(m.desc().parameters() < 5_435_235, "{}", m.desc().widths_summary());
}

#[test]
fn bad_prune_input_exits_2_with_one_line() {
    let model = s(&repo(MODEL));
    let out = s(&tmp("never.safetensors"));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["prune", &model, "--ratio", "1.0", "--out", &out], "[0, 1)"),
        (vec!["prune", &model, "--ratio=-0.2", "--out", &out], "[0, 1)"),
        (vec!["prune", &model, "--ratio", "0.5"], "--out"),
        (vec!["prune", &model, "--out", &out], "--ratio"),
        (vec!["prune", &model, "--ratio", "0.5", "--criterion", "size", "--out", &out], "--criterion"),
        (vec!["prune", &model, "--ratio", "0.5", "--granularity", "voxel", "--out", &out], "--granularity"),
        (vec!["prune", &model, "--ratio", "0.5", "--round-to", "0", "--out", &out], "--round-to"),
        (vec!["prune", &model, "--ratio", "0.5", "--granularity", "offset", "--criterion", "bn", "--out", &out], "l1"),
        (vec!["prune", &model, "--ratio", "0.5", "--criterion", "taylor", "--out", &out], "labelled scans"),
        (vec!["prune", "/nonexistent.safetensors", "--list-groups"], "nonexistent"),
        (vec!["prune", &model, "--granularity", "nm", "--nm", "3:2", "--out", &out], "--nm"),
        (vec!["prune", &model, "--granularity", "nm", "--nm", "2:3", "--out", &out], "--nm"),
        (vec!["prune", &model, "--arch", "spvcnn", "--list-groups"], "minkunet"),
    ];
    for (args, needle) in cases {
        let (code, _, err) = run(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert!(!Path::new(&out).exists(), "a failed prune writes nothing");
}

#[test]
fn the_shipped_pruned_model_is_the_plan_applied_and_segments() {
    let shipped = repo("data/models/minkunet_cr0.5_pruned.safetensors");
    let (m, _) = Model::from_checkpoint(&Checkpoint::load(&shipped).expect("shipped"), None, None).expect("model");
    let (full, _) =
        Model::from_checkpoint(&Checkpoint::load(&repo(MODEL)).expect("bundled"), None, None).expect("model");
    assert!(
        m.desc().parameters() * 4 < full.desc().parameters(),
        "physically smaller: {} against {} parameters",
        m.desc().parameters(),
        full.desc().parameters()
    );
    // Its recipe's first step: the plan applied to the bundled model gives its shapes.
    let planned = tmp("replanned.safetensors");
    let (code, _, err) = run(&[
        "prune",
        MODEL,
        "--plan",
        "data/models/minkunet_cr0.5_pruned.plan",
        "--runs",
        "0",
        "--scan",
        TINY,
        "--out",
        &s(&planned),
    ]);
    assert_eq!(code, 0, "{err}");
    let (p, _) = Model::from_checkpoint(&Checkpoint::load(&planned).expect("planned"), None, None).expect("model");
    assert_eq!(p.desc().widths_summary(), m.desc().widths_summary());
    let a = Checkpoint::load(&planned).expect("planned");
    let b = Checkpoint::load(&shipped).expect("shipped");
    for (name, t) in b.tensors().iter().filter(|(n, _)| !n.starts_with("mask.")) {
        assert_eq!(a.tensors().get(name).map(|x| &x.shape), Some(&t.shape), "{name}");
    }
    let (code, out, err) = run(&["demo", "--model", &s(&shipped)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("mIoU") && out.contains("16/8/24/40/88/88/48/32/48"), "{out}");
}
