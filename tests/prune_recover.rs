//! Recovery after pruning: iterative magnitude pruning with each restart (fine-tune, rewind to
//! an early step — lottery tickets — and re-initialization) holds every pruned weight at zero,
//! reaches the schedule's sparsity, starts each round from what it says, resumes to the same
//! bits, and refuses bad options with one line and exit 2.

mod common;

use std::path::PathBuf;

use common::*;
use sparseconv::io::kitti::{read_label, LearningMap};
use sparseconv::nn::arch::{ArchKind, NetDesc};
use sparseconv::nn::checkpoint::Checkpoint;
use sparseconv::pipeline::{prepare_file, VoxelizeMode};
use sparseconv::prune::iterative::{sparsity, Imp, ImpOptions, Restart, Schedule};
use sparseconv::prune::sensitivity::EvalSet;
use sparseconv::train::data::load_semantickitti;
use sparseconv::{Device, Engine, Grouping, MapBuilder};

const MODEL: &str = "data/models/minkunet_cr0.5.safetensors";
const TINY: &str = "data/tiny/sequences/00/velodyne/000000.bin";
const TINY_LABELS: &str = "data/tiny/sequences/00/labels/000000.label";

fn tmp(name: &str) -> PathBuf {
    tmp_path("recover", name)
}

fn opts(restart: Restart, steps: usize) -> ImpOptions {
    ImpOptions {
        final_sparsity: 0.6,
        schedule: Schedule::Fixed,
        rounds: 2,
        restart,
        pretrain_steps: 2,
        rewind_step: 1,
        steps,
        lr: 1e-3,
        cosine: false,
        seed: 3,
    }
}

fn load(p: &std::path::Path) -> Checkpoint {
    Checkpoint::load(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn iterative_pruning_restarts_from_what_it_says_and_resumes_to_the_same_bits() {
    let lm = LearningMap::load(&repo("data/semantickitti/semantic-kitti.yaml")).expect("yaml");
    let gt: Vec<u32> = read_label(&repo(TINY_LABELS), None).expect("labels").iter().map(|&r| lm.to_train(r)).collect();
    let eval =
        EvalSet::new(vec![prepare_file(&repo(TINY), None, VoxelizeMode::Mean).expect("scan")], vec![gt]).expect("eval");
    let train = vec![load_semantickitti(&repo(TINY), &repo(TINY_LABELS), &lm).expect("tiny training scan")];
    let e = Engine::new(Device::Cpu, MapBuilder::Sort, Grouping::Heuristic);
    let imp = Imp { kind: ArchKind::MinkUNet, train, eval: &eval, engine: &e };
    let start = load(&repo(MODEL));
    let desc = NetDesc::from_checkpoint(ArchKind::MinkUNet, &start, 19).expect("desc");
    let kernels: Vec<String> = desc.convs().iter().map(|c| c.kernel.clone()).collect();
    let kernel = "stage2.1.net.0.kernel";
    // With no training per round, each round's weights are its restart point under its mask.
    for restart in [Restart::Continue, Restart::Rewind, Restart::Reinit] {
        let dir = tmp(&format!("zero_{restart:?}"));
        let _ = std::fs::remove_dir_all(&dir);
        let rounds = imp.run(&start, &opts(restart, 0), &dir, |_| {}).expect("run");
        assert_eq!(rounds.len(), 2);
        let r1 = load(&dir.join("round_01.safetensors"));
        assert!((sparsity(r1.tensors(), &kernels) - 0.3).abs() < 1e-3, "{restart:?}: round 1 at 30%");
        let w = &r1.get(kernel).expect("kernel").data;
        let mask = &r1.get(&format!("mask.{kernel}")).expect("mask").data;
        let from = match restart {
            Restart::Continue => load(&dir.join("round_00.safetensors")),
            Restart::Rewind => load(&dir.join("rewind.safetensors")),
            Restart::Reinit => {
                let dense = load(&dir.join("round_00.safetensors"));
                assert!(w.iter().zip(&dense.get(kernel).expect("dense").data).any(|(a, b)| *a != 0.0 && a != b));
                continue;
            }
        };
        let src = &from.get(kernel).expect("source").data;
        for ((&v, &m), &s) in w.iter().zip(mask).zip(src) {
            assert_eq!(v, if m != 0.0 { s } else { 0.0 }, "{restart:?}: weight is its restart value under the mask");
        }
        if restart == Restart::Rewind {
            let dense = load(&dir.join("round_00.safetensors"));
            assert_ne!(src, &dense.get(kernel).expect("dense").data, "rewind point is step 1, not the trained weights");
        }
    }
    // Training rounds: masks only grow, pruned weights stay zero, the final sparsity is exact.
    let dir = tmp("lottery");
    let _ = std::fs::remove_dir_all(&dir);
    let mut lines = Vec::new();
    imp.run(&start, &opts(Restart::Rewind, 1), &dir, |l| lines.push(l.to_string())).expect("lottery");
    let (r1, r2) = (load(&dir.join("round_01.safetensors")), load(&dir.join("round_02.safetensors")));
    assert!((sparsity(r2.tensors(), &kernels) - 0.6).abs() < 1e-3);
    for k in &kernels {
        let (a, b) = (&r1.get(k).expect("r1").data, &r2.get(k).expect("r2").data);
        assert!(a.iter().zip(b).all(|(&x, &y)| x != 0.0 || y == 0.0), "{k}: a pruned weight came back");
    }
    let csv = std::fs::read_to_string(dir.join("imp.csv")).expect("csv");
    assert_eq!(csv.lines().count(), 4, "header, dense, two rounds:\n{csv}");
    // Drop the last round and run again: it resumes after round 1 and makes the same bits.
    std::fs::remove_file(dir.join("round_02.safetensors")).expect("remove");
    let mut lines = Vec::new();
    imp.run(&start, &opts(Restart::Rewind, 1), &dir, |l| lines.push(l.to_string())).expect("resume");
    assert!(lines.iter().any(|l| l.contains("resuming after round 1")), "{lines:?}");
    let again = load(&dir.join("round_02.safetensors"));
    for k in &kernels {
        assert_eq!(again.get(k).expect("again").data, r2.get(k).expect("r2").data, "{k}: resumed run differs");
    }
    let bad = ImpOptions { rewind_step: 5, ..opts(Restart::Rewind, 1) };
    let err = imp.run(&start, &bad, &tmp("bad"), |_| {}).expect_err("rewind past training").to_string();
    assert!(err.contains("--rewind-step"), "{err}");
}

#[test]
fn imp_from_the_command_line() {
    let dir = tmp("cli");
    let _ = std::fs::remove_dir_all(&dir);
    let (tiny, labels) = (arg(&repo(TINY)), arg(&repo(TINY_LABELS)));
    let npy = arg(&repo("data/open3dml/points_000700.npy"));
    let out = arg(&dir);
    let base = ["imp", "--eval", &tiny, "--labels", &labels, "--data", &npy, "--crop", "8", "--out", &out];
    let mut args = base.to_vec();
    args.extend([
        "--final-sparsity",
        "0.5",
        "--schedule",
        "geometric",
        "--rate",
        "0.3",
        "--steps",
        "1",
        "--restart",
        "reinit",
    ]);
    let (code, stdout, err) = run_cli(&args);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("30.0% -> 50.0% (2 rounds)") && stdout.contains("round 2: sparsity 50.0%"), "{stdout}");
    for (bad, what) in [
        (["--restart", "magic", "--final-sparsity", "0.5"], "--restart"),
        (["--schedule", "cubic", "--final-sparsity", "0.5"], "--schedule"),
        (["--final-sparsity", "1.5", "--steps", "1"], "--final-sparsity"),
    ] {
        let mut args = base.to_vec();
        args.extend(bad);
        let (code, _, err) = run_cli(&args);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(what) && err.lines().count() == 1, "{err}");
    }
}

#[test]
fn bn_gamma_reports_quantiles_and_draws_a_histogram() {
    let png = tmp("gamma.png");
    let model = arg(&repo(MODEL));
    let (code, out, err) = run_cli(&["bn-gamma", &model, "--out", &arg(&png)]);
    assert_eq!(code, 0, "{err}");
    // Every BatchNorm of every conv: 3072 channels in MinkUNet cr = 0.5.
    assert!(out.contains(" 3072 ") && out.contains("median"), "{out}");
    assert_eq!(&std::fs::read(&png).expect("png")[..8], b"\x89PNG\r\n\x1a\n");
    let (code, _, err) = run_cli(&["bn-gamma", &arg(&tmp("missing.safetensors")), "--out", &arg(&png)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("missing.safetensors") && err.lines().count() == 1, "{err}");
}
