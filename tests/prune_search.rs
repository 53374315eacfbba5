//! Pruning decisions: latency tables (every conv of the network and of its pruned versions is
//! priced, the file round-trips, a table from another target is refused), the sensitivity
//! sweep (one point per group and ratio, unpruned widths give the unpruned mIoU, thresholds
//! give plans), NetAdapt, AMC (every episode within budget, priced costs equal the built
//! networks', seeded runs repeat) and width plans end to end through the CLI (`sensitivity`,
//! `prune --plan`, `latency-table`, `amc`), with one line and exit 2 for bad input.

mod common;

use std::path::PathBuf;

use common::*;
use sparseconv::io::kitti::{read_label, LearningMap};
use sparseconv::nn::arch::{ArchKind, NetDesc};
use sparseconv::nn::checkpoint::Checkpoint;
use sparseconv::pipeline::{prepare_file, VoxelizeMode};
use sparseconv::prune::channel::{ChannelOptions, Selection};
use sparseconv::prune::importance::Criterion;
use sparseconv::prune::latency::LatencyTable;
use sparseconv::prune::plan::ConvCut;
use sparseconv::prune::sensitivity::{sweep, EvalSet};
use sparseconv::prune::{groups::groups, prune_channels, prune_channels_to, ChannelTarget};
use sparseconv::sparse_weights::Format;
use sparseconv::{Device, Engine, Grouping, MapBuilder};

const MODEL: &str = "data/models/minkunet_cr0.5.safetensors";
const TINY: &str = "data/tiny/sequences/00/velodyne/000000.bin";
const TINY_LABELS: &str = "data/tiny/sequences/00/labels/000000.label";

fn tmp(name: &str) -> PathBuf {
    tmp_path("search", name)
}

use common::{arg as s, run_cli as run};

fn engine() -> Engine {
    Engine::new(Device::Cpu, MapBuilder::Sort, Grouping::Auto)
}

fn tiny_table(e: &Engine, ck: &Checkpoint) -> LatencyTable {
    LatencyTable::measure(e, ck, ArchKind::MinkUNet, &repo(TINY), 16, 1, |_, _| {}).expect("table")
}

/// The measured table's shapes with times from a cost model (MACs per voxel, voxels falling
/// 8x per stride level): timings on a 50-point scan are noise, and the tests using this are
/// about the algorithms, not the clock.
fn model_table(e: &Engine, ck: &Checkpoint) -> LatencyTable {
    let mut t = tiny_table(e, ck);
    for (k, v) in t.entries.iter_mut() {
        *v = (k.cin * k.cout * (k.size as usize).pow(3)) as f64 / f64::from(k.map_stride).powi(3) * 1e-9;
    }
    (t.fixed, t.scale) = (1e-5, 1.0);
    t
}

#[test]
fn latency_tables_price_every_pruned_network_and_round_trip() {
    let ck = Checkpoint::load(&repo(MODEL)).expect("model");
    let e = engine();
    let t = tiny_table(&e, &ck);
    let desc = NetDesc::from_checkpoint(ArchKind::MinkUNet, &ck, 19).expect("desc");
    // Every conv at its own widths is an entry, measured (not interpolated).
    assert!(t.entries.len() > desc.convs().len(), "{} entries", t.entries.len());
    assert!(t.entries.values().all(|v| v.is_finite() && *v >= 0.0));
    assert!(t.scale > 0.0 && t.fixed >= 0.0, "calibration {} + {} x convs", t.fixed, t.scale);
    let full = t.predict(&desc).expect("unpruned");
    // Pruned on the table's grid and off it (round-to 8 lies between grid points).
    for round_to in [16, 8] {
        let o = ChannelOptions { ratio: 0.5, selection: Selection::Local, round_to, min_width: 16 };
        let p = prune_channels(&ck, ArchKind::MinkUNet, Criterion::L1, &o, &[], 0).expect("prune");
        let pred = t.predict(&p.after).expect("pruned");
        assert!(pred.is_finite() && pred > 0.0, "round-to {round_to}: {pred}");
        assert_eq!(t.convs(&p.after).expect("convs").len(), p.after.convs().len());
        let sum: f64 = t.convs(&p.after).expect("convs").iter().sum();
        assert!(
            (pred - (t.fixed + t.scale * sum)).abs() <= 1e-9 * pred,
            "round-to {round_to}: prediction is not the calibrated sum"
        );
    }
    let path = tmp("table.csv");
    t.save(&path).expect("save");
    let back = LatencyTable::load(&path).expect("load");
    assert_eq!(back.entries.len(), t.entries.len());
    assert_eq!(back.device, "cpu");
    assert!((back.predict(&desc).expect("reloaded") - full).abs() < 1e-6 * full.max(1.0) + 1e-6);
    // Measured with another thread count: refused where it would be used.
    let other = LatencyTable { threads: rayon::current_num_threads() + 1, ..back };
    let err = other.check_target(&e).expect_err("other target").to_string();
    assert!(err.contains("threads"), "{err}");
    std::fs::write(&path, "map_stride,kernel,stride,transposed,cin,cout,ms\n1,3,1,0,16,16,0.1\n").expect("write");
    let err = LatencyTable::load(&path).expect_err("no header").to_string();
    assert!(err.contains("table.csv") && err.contains("header"), "{err}");
}

#[test]
fn sensitivity_sweeps_every_group_and_thresholds_make_plans() {
    let ck = Checkpoint::load(&repo(MODEL)).expect("model");
    let e = engine();
    let t = model_table(&e, &ck);
    let lm = LearningMap::load(&repo("data/semantickitti/semantic-kitti.yaml")).expect("yaml");
    let gt: Vec<u32> = read_label(&repo(TINY_LABELS), None).expect("labels").iter().map(|&r| lm.to_train(r)).collect();
    let eval = EvalSet::new(vec![prepare_file(&repo(TINY), None, VoxelizeMode::Mean).expect("scan")], vec![gt.clone()])
        .expect("eval set");
    let opts = ChannelOptions { ratio: 0.0, selection: Selection::Local, round_to: 16, min_width: 16 };
    let ratios = [0.0, 0.5, 0.9];
    let sw = sweep(&ck, ArchKind::MinkUNet, Criterion::L1, &ratios, &opts, &eval, &e, &t, |_, _| {}).expect("sweep");
    let prunable: Vec<_> = sw.groups.iter().filter(|g| g.prunable).collect();
    assert_eq!(sw.points.len(), prunable.len() * ratios.len(), "one point per group and ratio");
    for p in &sw.points {
        let g = &sw.groups[p.group];
        assert_eq!(p.of, g.width);
        assert!(p.width <= g.width && p.width >= 16.min(g.width) && p.width % 16 == 0 || p.width == g.width);
        if p.width == g.width {
            assert_eq!(p.miou, sw.base.0, "{} at {}: unpruned widths, unpruned mIoU", p.name, p.ratio);
        }
    }
    assert!(sw.points.iter().any(|p| p.width < p.of && p.predicted < sw.base.1), "no pruned point is predicted faster");
    let csv = sw.to_csv();
    assert_eq!(csv.lines().count(), 2 + sw.points.len(), "header, unpruned, points");
    // Threshold 0 keeps groups whose every pruned width loses mIoU; 100 points prunes all the way.
    let strict = sw.plan(0.0).expect("plan");
    let loose = sw.plan(1.0).expect("plan");
    let gs = groups(&NetDesc::from_checkpoint(ArchKind::MinkUNet, &ck, 19).expect("desc")).expect("groups");
    let (ws, wl) =
        (strict.widths(ArchKind::MinkUNet, &gs).expect("fits"), loose.widths(ArchKind::MinkUNet, &gs).expect("fits"));
    for (g, (a, b)) in gs.iter().zip(ws.iter().zip(&wl)) {
        assert!(b <= a, "{}: a looser threshold kept more channels", g.name());
        if g.prunable {
            let narrowest = sw.points.iter().filter(|p| p.group == g.id).map(|p| p.width).min().expect("points");
            assert_eq!(*b, narrowest, "{}: any drop allowed, narrowest width", g.name());
        }
    }
    // The plan applies: the pruned network has exactly the planned widths.
    let p =
        prune_channels_to(&ck, ArchKind::MinkUNet, Criterion::L1, ChannelTarget::Widths(&wl), &[], 0).expect("apply");
    let after = groups(&p.after).expect("groups");
    assert_eq!(after.iter().map(|g| g.width).collect::<Vec<_>>(), wl);
    // Ratios out of range and the Taylor criterion are refused.
    assert!(sweep(&ck, ArchKind::MinkUNet, Criterion::L1, &[1.0], &opts, &eval, &e, &t, |_, _| {}).is_err());
    assert!(EvalSet::new(
        vec![prepare_file(&repo(TINY), None, VoxelizeMode::Mean).expect("scan")],
        vec![gt[1..].to_vec()]
    )
    .is_err());
}

#[test]
fn netadapt_meets_each_cut_saves_every_iteration_and_resumes() {
    use sparseconv::prune::netadapt::{NetAdapt, NetAdaptOptions};
    use sparseconv::train::data::load_semantickitti;
    let ck = Checkpoint::load(&repo(MODEL)).expect("model");
    let e = engine();
    let t = model_table(&e, &ck);
    let lm = LearningMap::load(&repo("data/semantickitti/semantic-kitti.yaml")).expect("yaml");
    let gt: Vec<u32> = read_label(&repo(TINY_LABELS), None).expect("labels").iter().map(|&r| lm.to_train(r)).collect();
    let eval =
        EvalSet::new(vec![prepare_file(&repo(TINY), None, VoxelizeMode::Mean).expect("scan")], vec![gt]).expect("eval");
    let train = vec![load_semantickitti(&repo(TINY), &repo(TINY_LABELS), &lm).expect("tiny training scan")];
    let na = NetAdapt { kind: ArchKind::MinkUNet, table: &t, eval: &eval, train, latency_scan: repo(TINY), engine: &e };
    let o = NetAdaptOptions {
        target_speedup: 3.0,
        first_cut: 0.1,
        decay: 0.9,
        round_to: 16,
        min_width: 8,
        short_steps: 1,
        long_steps: 1,
        lr: 2e-4,
        crop: None,
        max_iterations: 1,
        seed: 1,
    };
    let dir = tmp("netadapt");
    let _ = std::fs::remove_dir_all(&dir);
    let base = t.predict(&NetDesc::from_checkpoint(ArchKind::MinkUNet, &ck, 19).expect("desc")).expect("predict");
    let (_, its) = na.run(&ck, &o, &dir, |_| {}).expect("first iteration");
    assert_eq!(its.len(), 1);
    let it = &its[0];
    assert!(it.predicted <= it.target + 1e-12, "the kept proposal misses its cut: {} > {}", it.predicted, it.target);
    assert!(it.target <= base * 0.9 + 1e-9 && it.to < it.from && it.to % 16 == 0, "{it:?}");
    assert!(it.proposals > 1, "one proposal per group that can meet the cut");
    assert!(dir.join("iter_01.safetensors").exists() && dir.join("final.safetensors").exists());
    // Run again with room for one more: it resumes after iteration 1 and narrows further.
    let mut lines = Vec::new();
    let (last, its) = na
        .run(&ck, &NetAdaptOptions { max_iterations: 2, ..o.clone() }, &dir, |l| lines.push(l.to_string()))
        .expect("resumed");
    assert!(lines.iter().any(|l| l.contains("resuming after iteration 1")), "{lines:?}");
    assert_eq!(its.iter().map(|i| i.index).collect::<Vec<_>>(), vec![2]);
    let csv = std::fs::read_to_string(dir.join("netadapt.csv")).expect("csv");
    assert_eq!(csv.lines().count(), 3, "header and two iterations:\n{csv}");
    let desc = NetDesc::from_checkpoint(ArchKind::MinkUNet, &last, 19).expect("final desc");
    assert!(t.predict(&desc).expect("final") <= its[0].target + 1e-12);
    // A target no width can reach is one clear error.
    let far =
        na.run(&ck, &NetAdaptOptions { target_speedup: 1000.0, max_iterations: 30, ..o }, &tmp("netadapt_far"), |_| {});
    let err = far.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("narrowest network on this grid"), "{err}");
}

#[test]
fn sensitivity_plan_and_latency_table_from_the_command_line() {
    let model = s(&repo(MODEL));
    let table = tmp("cli_table.csv");
    let (code, out, err) =
        run(&["latency-table", &model, "--scan", &s(&repo(TINY)), "--step", "16", "--reps", "1", "--out", &s(&table)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("conv shapes") && out.contains("calibrated"), "{out}");
    let dir = tmp("sens");
    let (code, out, err) = run(&[
        "sensitivity",
        &model,
        "--eval",
        &s(&repo(TINY)),
        "--labels",
        &s(&repo(TINY_LABELS)),
        "--ratios",
        "0.5",
        "--round-to",
        "16",
        "--table",
        &s(&table),
        "--threshold",
        "100",
        "--out",
        &s(&dir),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("groups x 1 ratios") && out.contains("plan for a drop"), "{out}");
    for f in ["sensitivity.png", "latency.png"] {
        let bytes = std::fs::read(dir.join(f)).expect(f);
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{f} is a PNG");
    }
    let plan = dir.join("plan.txt");
    let text = std::fs::read_to_string(&plan).expect("plan");
    assert!(text.contains("arch minkunet") && text.contains("group stage4.1.net.0.kernel 64 of 128"), "{text}");
    let pruned = tmp("planned.safetensors");
    let (code, out, err) =
        run(&["prune", &model, "--plan", &s(&plan), "--runs", "0", "--scan", &s(&repo(TINY)), "--out", &s(&pruned)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("to planned widths"), "{out}");
    // The plan was made for the unpruned network: the pruned one refuses it.
    let (code, _, err) =
        run(&["prune", &s(&pruned), "--plan", &s(&plan), "--runs", "0", "--out", &s(&tmp("x.safetensors"))]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("another network") && err.lines().count() == 1, "{err}");
    // A table measured with another thread count.
    let (code, _, err) = run(&["--threads", "3", "latency-table", "--table", &s(&table), "--check", &model]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("threads"), "{err}");
}

/// The tiny scan and its labels as an eval set.
fn tiny_eval() -> EvalSet {
    let lm = LearningMap::load(&repo("data/semantickitti/semantic-kitti.yaml")).expect("yaml");
    let gt: Vec<u32> = read_label(&repo(TINY_LABELS), None).expect("labels").iter().map(|&r| lm.to_train(r)).collect();
    EvalSet::new(vec![prepare_file(&repo(TINY), None, VoxelizeMode::Mean).expect("scan")], vec![gt]).expect("eval")
}

#[test]
fn amc_holds_every_episode_to_the_budget_and_is_reproducible() {
    use sparseconv::bench::conv_flops;
    use sparseconv::pipeline::Model;
    use sparseconv::prune::amc::{search, AmcOptions, Budget, Env, Reward};
    let ck = Checkpoint::load(&repo(MODEL)).expect("model");
    let e = engine();
    let eval = tiny_eval();
    let table = model_table(&e, &ck);
    let small = |budget, target, seed| {
        let mut o = AmcOptions::new(budget, target, 3, 3);
        o.ddpg.hidden = 16;
        o.ddpg.batch = 16;
        // The table's grid.
        (o.round_to, o.min_width) = (16, 16);
        o.seed = seed;
        o
    };
    for budget in [Budget::Flops, Budget::Latency] {
        let env = Env::new(ArchKind::MinkUNet, &ck, budget, Some(&table), &eval, &e).expect("env");
        let o = small(budget, 0.5, 1);
        let s = search(&env, &o, |_| {}).expect("search");
        assert_eq!(s.episodes.len(), 6);
        for ep in &s.episodes {
            assert!(ep.cost_ratio <= 0.5 + 1e-9, "{budget:?} episode {}: cost {}", ep.index, ep.cost_ratio);
            assert!((ep.reward + (1.0 - ep.miou)).abs() < 1e-12, "reward is -error");
            // Every width on the grid: multiples of 8 at or above lbound, or the full width.
            for (&w, g) in ep.widths.iter().zip(&env.groups) {
                assert!(
                    w == g.width || (w % 16 == 0 && w as f64 >= 0.2 * g.width as f64 && w >= 16),
                    "{w} of {}",
                    g.width
                );
            }
            // The priced cost is the pruned network's own: traced FLOPs, or the table's
            // prediction of the built network.
            let pruned = env.prune(&ep.widths).expect("prune");
            let desc = NetDesc::from_checkpoint(ArchKind::MinkUNet, &pruned, 19).expect("desc");
            let cost = env.cost(budget, &ep.widths).expect("cost");
            match budget {
                Budget::Flops => {
                    let m = Model::from_desc(&pruned, &desc).expect("model");
                    e.start_trace();
                    m.forward(&e, &eval.scans[0].voxels).expect("forward");
                    let traced: f64 = e.take_trace().iter().map(|t| conv_flops(t.pairs, t.cin, t.cout)).sum();
                    assert!((traced - cost).abs() <= 1e-9 * traced, "FLOPs {cost} vs traced {traced}");
                }
                Budget::Latency => {
                    let p = table.predict(&desc).expect("predict");
                    assert!((p - cost).abs() <= 1e-9 * p, "predicted {cost} vs the built network's {p}");
                }
            }
        }
        assert!(s.episodes.iter().all(|ep| ep.reward <= s.episodes[s.best].reward));
        // Same seed, same episodes; another seed explores elsewhere.
        assert_eq!(search(&env, &o, |_| {}).expect("again").to_csv(), s.to_csv(), "{budget:?}");
        assert_ne!(search(&env, &small(budget, 0.5, 2), |_| {}).expect("seed 2").to_csv(), s.to_csv());
        // The cost-weighted reward.
        let lc = AmcOptions { reward: Reward::ErrorLogCost, ..small(budget, 0.5, 1) };
        let ep = &search(&env, &lc, |_| {}).expect("log cost").episodes[0];
        let units = env.cost(budget, &ep.widths).expect("cost") * if budget == Budget::Latency { 1e6 } else { 1.0 };
        assert!((ep.reward + (1.0 - ep.miou) * units.ln()).abs() < 1e-9);
        // A budget below the narrowest network is one clear error.
        let err = search(&env, &small(budget, 0.01, 1), |_| {}).expect_err("unreachable").to_string();
        assert!(err.contains("narrowest network"), "{err}");
    }
    let err = Env::new(ArchKind::MinkUNet, &ck, Budget::Latency, None, &eval, &e).err().map(|e| e.to_string());
    assert!(err.unwrap_or_default().contains("latency table"));
}

#[test]
fn amc_from_the_command_line_writes_a_policy_prune_applies() {
    let model = s(&repo(MODEL));
    let dir = tmp("amc");
    let _ = std::fs::remove_dir_all(&dir);
    let tiny = s(&repo(TINY));
    let labels = s(&repo(TINY_LABELS));
    let common = [
        "--target",
        "0.6",
        "--warmup",
        "2",
        "--episodes",
        "2",
        "--hidden",
        "16",
        "--eval",
        &tiny,
        "--labels",
        &labels,
        "--scan",
        &tiny,
        "--rounds",
        "1",
    ];
    let mut args = vec!["amc", &model, "--out"];
    let out_dir = s(&dir);
    args.push(&out_dir);
    args.extend(common);
    let npy = s(&repo("data/open3dml/points_000700.npy"));
    args.extend(["--finetune-steps", "1", "--data", &npy, "--crop", "8"]);
    let (code, out, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("4 episodes") && out.contains("uniform keep") && out.contains("unpruned mIoU"), "{out}");
    let csv = std::fs::read_to_string(dir.join("amc.csv")).expect("amc.csv");
    assert_eq!(csv.lines().count(), 5, "header and 4 episodes:\n{csv}");
    let cmp = std::fs::read_to_string(dir.join("compare.csv")).expect("compare.csv");
    assert_eq!(cmp.lines().count(), 3, "header, amc, uniform:\n{cmp}");
    for f in ["amc.safetensors", "uniform.safetensors", "amc_ft.safetensors", "uniform_ft.safetensors"] {
        assert!(dir.join(f).exists(), "{f}");
    }
    let pruned = tmp("amc_planned.safetensors");
    let plan = s(&dir.join("policy.plan"));
    let (code, out, err) =
        run(&["prune", &model, "--plan", &plan, "--runs", "0", "--scan", &tiny, "--out", &s(&pruned)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("to planned widths"), "{out}");
    // The plan's widths are the saved network's.
    let a = Checkpoint::load(&pruned).expect("planned");
    let b = Checkpoint::load(&dir.join("amc.safetensors")).expect("amc");
    for (name, t) in a.tensors() {
        assert_eq!(Some(&t.shape), b.tensors().get(name).map(|t| &t.shape), "{name}");
    }
    for (bad, what) in [(["--budget", "params"], "--budget"), (["--reward", "acc"], "--reward")] {
        let mut args = vec!["amc", &model, "--out", &out_dir];
        args.extend(common);
        args.extend(bad);
        let (code, _, err) = run(&args);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(what) && err.lines().count() == 1, "{err}");
    }
    let mut args = vec!["amc", &model, "--out", &out_dir, "--budget", "latency"];
    args.extend(common);
    let (code, _, err) = run(&args);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--table"), "{err}");
}

/// Adaptive BatchNorm: afterwards the inference network (running statistics, folded) gives the
/// training-mode forward's logits (batch statistics) on the calibration scan, and the result
/// does not depend on the statistics it started from.
#[test]
fn adaptive_batchnorm_makes_running_statistics_the_batch_statistics() {
    use sparseconv::pipeline::Model;
    use sparseconv::prune::channel::{ChannelOptions, Selection};
    use sparseconv::prune::finetune::adaptive_bn;
    use sparseconv::train::data::load_semantickitti;
    use sparseconv::train::net::TrainNet;
    use sparseconv::voxel::voxelize_batch;
    let ck = Checkpoint::load(&repo(MODEL)).expect("model");
    let o = ChannelOptions { ratio: 0.5, selection: Selection::Local, round_to: 8, min_width: 8 };
    let pruned = prune_channels(&ck, ArchKind::MinkUNet, Criterion::L1, &o, &[], 0).expect("prune").checkpoint();
    let lm = LearningMap::load(&repo("data/semantickitti/semantic-kitti.yaml")).expect("yaml");
    // Enough voxels on the coarsest map that n/(n−1) is small.
    let scan = load_semantickitti(
        &repo("data/semantickitti/sequences/00/velodyne/000000.bin"),
        &repo("data/semantickitti/sequences/00/labels/000000.label"),
        &lm,
    )
    .expect("bundled scan")
    .crop(15.0);
    let cal = adaptive_bn(ArchKind::MinkUNet, &pruned, std::slice::from_ref(&scan)).expect("adaptive bn");
    let e = Engine::new(Device::Cpu, MapBuilder::Sort, Grouping::Heuristic);
    let vox = voxelize_batch(std::slice::from_ref(&scan.points), sparseconv::pipeline::VOXEL_SIZE).expect("voxels");
    let mut net = TrainNet::load_arch("minkunet", &cal, 0.5, 19).expect("train net");
    let (train_logits, _) = net.forward(&e, vox.tensor.clone()).expect("train forward");
    let desc = NetDesc::from_checkpoint(ArchKind::MinkUNet, &cal, 19).expect("desc");
    let infer = Model::from_desc(&cal, &desc).expect("model").forward(&e, &vox.tensor).expect("inference");
    // Unbiased (running) against biased (batch) variance differ by n/(n−1) per layer.
    let err = rel_err(&infer, &train_logits);
    assert!(err < 1e-2, "inference after adaptive BN vs training-mode logits: {err}");
    let before = Model::from_desc(&pruned, &desc).expect("model").forward(&e, &vox.tensor).expect("inference");
    assert!(rel_err(&before, &train_logits) > 10.0 * err, "the pruned network's own statistics were already right");
    // Start from other running statistics: the same result.
    let mut t = pruned.tensors().clone();
    for (name, v) in t.iter_mut() {
        if name.ends_with("running_mean") {
            v.data.iter_mut().for_each(|x| *x += 1.0);
        }
    }
    let other = Checkpoint::from_tensors("<shifted>", t, pruned.metadata().clone());
    let again = adaptive_bn(ArchKind::MinkUNet, &other, std::slice::from_ref(&scan)).expect("again");
    for (name, v) in cal.tensors() {
        if name.contains("running") {
            let w = &again.tensors()[name].data;
            assert!(rel_err(&v.data, w) < 1e-4, "{name}");
        }
    }
}

#[test]
fn cut_prices_interpolate_between_measured_offset_counts() {
    let e = engine();
    let ck = Checkpoint::load(&repo(MODEL)).expect("model");
    let desc = NetDesc::from_checkpoint(ArchKind::MinkUNet, &ck, 19).expect("desc");
    let mut t = model_table(&e, &ck);
    t.measure_cuts(&e, &ck, ArchKind::MinkUNet, &repo(TINY), &[0.5], &[(Format::Element, vec![0.9])], 1, |_, _| {})
        .expect("cuts");
    let conv = desc.convs().into_iter().find(|c| c.spec.volume() == 27).expect("a 3x3x3 conv").kernel.clone();
    assert!(t.cuts.iter().any(|c| c.0 == conv && c.3 == ConvCut::Offsets { kept: 13, of: 27 }));
    assert!(t.cuts.iter().any(|c| c.0 == conv && c.3 == ConvCut::Sparse(Format::Element, 0.9)));
    // Cuts that cost nothing: a conv with k offsets kept costs the dense time in proportion
    // to how far k is from 13 (the measured count) towards 27.
    for c in t.cuts.iter_mut() {
        c.4 = 0.0;
    }
    let full = t.predict(&desc).expect("dense");
    let at =
        |kept: usize| full - t.predict_cuts(&desc, &[(conv.clone(), ConvCut::Offsets { kept, of: 27 })]).expect("cut");
    let (d13, d20, d27) = (at(13), at(20), at(27));
    assert!(d13 > 0.0, "13 offsets cost nothing in this table: the conv's dense time is saved");
    assert!((d20 - d13 * 7.0 / 14.0).abs() < 1e-12 * full.max(1.0), "{d20} vs {}", d13 * 7.0 / 14.0);
    assert!(d27.abs() < 1e-12, "all offsets kept is the dense conv");
    // A cut the table never measured is an error naming what to measure.
    let err = t.predict_cuts(&desc, &[(conv.clone(), ConvCut::Sparse(Format::Block, 0.5))]).unwrap_err().to_string();
    assert!(err.contains("--sparse"), "{err}");
    let back = LatencyTable::load(&{
        let p = tmp("cuts.csv");
        t.save(&p).expect("save");
        p
    })
    .expect("load");
    assert_eq!(back.cuts.len(), t.cuts.len());
}

#[test]
fn offset_and_sparse_sensitivity_make_plans_prune_applies() {
    let model = s(&repo(MODEL));
    let table = tmp("cut_table.csv");
    let (code, out, err) = run(&[
        "latency-table",
        &model,
        "--scan",
        &s(&repo(TINY)),
        "--step",
        "16",
        "--reps",
        "1",
        "--offsets",
        "0.5",
        "--sparse",
        "element",
        "--sparsities",
        "0.9",
        "--out",
        &s(&table),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("cuts"), "{out}");
    let text = std::fs::read_to_string(&table).expect("table");
    assert!(text.contains("conv,cin,cout,cut,ms") && text.contains("offsets 13 of 27"), "{text}");
    assert!(text.contains("sparse element 0.9"), "{text}");
    for (granularity, ratio) in [("offset", "0.5"), ("element", "0.9")] {
        let dir = tmp(&format!("sens_{granularity}"));
        let (code, out, err) = run(&[
            "sensitivity",
            &model,
            "--eval",
            &s(&repo(TINY)),
            "--labels",
            &s(&repo(TINY_LABELS)),
            "--granularity",
            granularity,
            "--ratios",
            ratio,
            "--table",
            &s(&table),
            "--threshold",
            "100",
            "--out",
            &s(&dir),
        ]);
        assert_eq!(code, 0, "{granularity}: {err}");
        assert!(out.contains("convs x 1 ratios") && out.contains("conv cuts"), "{out}");
        let plan = dir.join("plan.txt");
        let text = std::fs::read_to_string(&plan).expect("plan");
        let cuts: Vec<&str> = text.lines().filter(|l| l.starts_with("conv ")).collect();
        assert!(cuts.len() > 10, "{text}");
        let pruned = tmp(&format!("planned_{granularity}.safetensors"));
        let (code, _, err) = run(&[
            "prune",
            &model,
            "--plan",
            &s(&plan),
            "--runs",
            "0",
            "--scan",
            &s(&repo(TINY)),
            "--out",
            &s(&pruned),
        ]);
        assert_eq!(code, 0, "{granularity}: {err}");
        let ck = Checkpoint::load(&pruned).expect("pruned");
        for l in &cuts {
            let name = l.split_whitespace().nth(1).expect("name");
            let t = &ck.tensors()[name];
            let zeros = t.data.iter().filter(|&&v| v == 0.0).count() as f64 / t.data.len() as f64;
            match granularity {
                "offset" => {
                    let kept = ck.metadata()[&format!("kept_offsets.{name}")].split(',').count();
                    assert!(l.ends_with(&format!("offsets {kept} of {}", t.shape[0])), "{l}: {kept} kept");
                    assert!(zeros >= 1.0 - kept as f64 / t.shape[0] as f64 - 1e-9, "{l}: {zeros}");
                }
                _ => {
                    assert_eq!(ck.metadata()[&format!("format.{name}")], "element", "{l}");
                    assert!((zeros - 0.9).abs() < 0.01, "{l}: {zeros} zeros");
                }
            }
        }
        // The table prices the pruned file from its metadata.
        let (code, out, err) = run(&["latency-table", "--table", &s(&table), "--check", &s(&pruned), "--runs", "1"]);
        assert_eq!(code, 0, "{granularity}: {err}");
        assert!(out.contains("predicted"), "{out}");
    }
    let (code, _, err) = run(&[
        "sensitivity",
        &model,
        "--eval",
        &s(&repo(TINY)),
        "--labels",
        &s(&repo(TINY_LABELS)),
        "--granularity",
        "filter",
        "--out",
        &s(&tmp("sens_bad")),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--granularity") && err.lines().count() == 1, "{err}");
}
