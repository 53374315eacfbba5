//! The trainer: loss falls on a crop of the real scan; a resumed run continues bit for bit;
//! masks hold weights at zero; the rewind point is kept; checkpoints load for inference;
//! bad configs are errors that name the setting.

mod common;

use std::path::PathBuf;

use common::*;
use sparseconv::io::tensors::Tensor;
use sparseconv::nn::checkpoint::{save, Checkpoint};
use sparseconv::pipeline::Model;
use sparseconv::train::data::Sample;
use sparseconv::train::trainer::{voxel_labels, TrainConfig, Trainer};
use sparseconv::voxel::PointCloud;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sparseconv-training-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// The points of the bundled scan inside a 30 m x 20 m box (negative y included), with labels.
fn scan_crop() -> Sample {
    let lm = sparseconv::io::kitti::LearningMap::load(&repo("data/semantickitti/semantic-kitti.yaml")).expect("yaml");
    let s = sparseconv::train::data::load_semantickitti(
        &repo("data/semantickitti/sequences/00/velodyne/000000.bin"),
        &repo("data/semantickitti/sequences/00/labels/000000.label"),
        &lm,
    )
    .expect("bundled scan");
    let (mut data, mut labels) = (Vec::new(), Vec::new());
    for i in 0..s.points.len() {
        let p = s.points.point(i);
        if (0.0..30.0).contains(&p[0]) && (-10.0..10.0).contains(&p[1]) {
            data.extend_from_slice(p);
            labels.push(s.labels[i]);
        }
    }
    Sample { points: PointCloud::new(data, 4).expect("crop"), labels }
}

/// Training `arch` on the crop: the loss halves, mIoU on the crop rises, and the model the
/// trainer hands out (through a checkpoint, BatchNorm folded) is of that architecture.
fn loss_falls(arch: &str, cr: f32, steps: usize) {
    let crop = scan_crop();
    assert!(crop.labels.len() > 10_000, "crop has {} points", crop.labels.len());
    let cfg = TrainConfig {
        arch: arch.into(),
        cr,
        data: vec![PathBuf::from("<in memory>")],
        epochs: steps,
        lr: 5e-3,
        warmup: 5,
        augment: false,
        ..TrainConfig::default()
    };
    let mut t = Trainer::from_samples(cfg, vec![crop.clone()], vec![crop]).expect("trainer");
    let miou0 = t.evaluate().expect("evaluate").0.unwrap_or(0.0);
    let losses: Vec<f64> = (0..steps).map(|_| t.train_step().expect("step").loss).collect();
    let late = losses[steps - 5..].iter().sum::<f64>() / 5.0;
    assert!(
        late < 0.5 * losses[0],
        "{arch}: loss did not fall: first {:.3}, last five {late:.3}: {losses:?}",
        losses[0]
    );
    let miou = t.evaluate().expect("evaluate").0.unwrap_or(0.0);
    assert!(miou > miou0 + 0.1, "{arch}: mIoU on the crop went from {miou0:.3} to {miou:.3}");
    assert_eq!(t.model().expect("model").arch(), arch);
}

#[test]
fn loss_falls_on_a_crop_of_the_real_scan() {
    loss_falls("minkunet", 0.25, 40);
}

#[test]
fn spvcnn_loss_falls_on_a_crop_of_the_real_scan() {
    loss_falls("spvcnn", 0.25, 40);
}

#[test]
fn resume_continues_bit_for_bit_with_masks_and_rewind() {
    let dir = tmp("resume");
    let cfg = TrainConfig {
        cr: 0.125,
        data: vec![repo("data/open3dml/points_000700.npy")],
        epochs: 4,
        warmup: 1,
        rewind_at: Some(1),
        optimizer: "sgd".into(),
        lr: 0.05,
        ..TrainConfig::default()
    };
    // Initial weights with a mask zeroing every other value of one kernel.
    let fresh = Trainer::new(cfg.clone(), None).unwrap();
    let mut tensors = fresh.params().tensors();
    let name = "stage1.1.net.0.kernel";
    let shape = tensors[name].shape.clone();
    let n = tensors[name].data.len();
    let mask: Vec<f32> = (0..n).map(|i| (i % 2) as f32).collect();
    tensors.insert(format!("mask.{name}"), Tensor { shape, data: mask });
    let init = dir.join("init.safetensors");
    save(&init, &tensors, fresh.metadata(), false).unwrap();

    let mut straight = Trainer::new(cfg.clone(), Some(&init)).unwrap();
    for _ in 0..4 {
        straight.train_step().unwrap();
    }
    let mut first = Trainer::new(cfg, Some(&init)).unwrap();
    first.train_step().unwrap();
    let after_one = first.params().values.clone();
    first.train_step().unwrap();
    let ckpt = dir.join("checkpoint.safetensors");
    first.save_checkpoint(&ckpt).unwrap();
    let mut resumed = Trainer::resume(&ckpt, None).unwrap();
    assert_eq!(resumed.step, 2);
    resumed.train_step().unwrap();
    resumed.train_step().unwrap();
    assert_eq!(resumed.params().values, straight.params().values, "resumed run differs from the straight run");

    let i = resumed.params().find(name).unwrap();
    let w = &resumed.params().values[i];
    assert!(w.iter().step_by(2).all(|&v| v == 0.0), "masked weights stayed exactly zero");
    assert!(w.iter().skip(1).step_by(2).any(|&v| v != 0.0), "unmasked weights train");

    // The checkpoint holds the rewind point (weights after step 1) and loads for inference.
    let ck = Checkpoint::load(&ckpt).unwrap();
    let j = first.params().find("stem.0.kernel").unwrap();
    assert_eq!(ck.get("rewind.stem.0.kernel").unwrap().data, after_one[j]);
    assert!(ck.get(&format!("mask.{name}")).is_some());
    Model::from_checkpoint(&ck, None, None).expect("a training checkpoint loads as a model");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn voxel_labels_take_the_majority() {
    // Voxel 0: labels 9, 9, 1 -> 9; voxel 1: 0, 0, 4 -> 0 (unlabeled majority); voxel 2: tie 3/5 -> 3.
    let inverse = [0, 0, 0, 1, 1, 1, 2, 2];
    let labels = [9, 9, 1, 0, 0, 4, 5, 3];
    assert_eq!(voxel_labels(&inverse, &labels, 3), vec![9, 0, 3]);
}

#[test]
fn config_errors_name_the_setting() {
    let origin = repo("train.yaml");
    let err = |y: &str| TrainConfig::from_yaml(y, &origin).unwrap_err().to_string();
    assert!(err("data: [a]\nepochs: -1\n").contains("`epochs`"));
    assert!(err("data: [a]\nlearning_rate: 0.1\n").contains("unknown setting `learning_rate`"));
    assert!(err("data: [a]\noptimizer: rmsprop\n").contains("optimizer"));
    assert!(err("epochs: 3\n").contains("no training data"));
    assert!(err("data: [a]\ncr: 0\n").contains("cr"));
    let c = TrainConfig::from_yaml("data: [x/y]\nl1: {\"@bn\": 1.0e-4}\nrewind_at: 5\n", &origin).unwrap();
    assert_eq!(c.data, vec![repo("x/y")]);
    assert_eq!(c.l1[0].pattern, "@bn");
    let again = TrainConfig::from_yaml(&c.to_yaml(), &origin).unwrap();
    assert_eq!(again, c, "config survives the YAML round trip stored in checkpoints");
}

#[test]
fn a_training_step_gives_the_same_bits_on_any_thread_count() {
    let cfg = TrainConfig {
        cr: 0.125,
        data: vec![repo("data/open3dml/points_000700.npy")],
        epochs: 2,
        ..TrainConfig::default()
    };
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut t = Trainer::new(cfg.clone(), None).unwrap();
            t.train_step().unwrap();
            t.train_step().unwrap();
            t.params().values.clone()
        })
    };
    let one = run(1);
    assert!(one == run(3), "1 and 3 threads disagree after two steps");
}
