//! Voxel (activation) pruning: the fast path (pruned outputs never gathered, multiplied or
//! scattered) against a reference that computes every voxel and overwrites the pruned ones,
//! for single convs (written out here from the documented semantics) and the whole network on
//! the real scan; bit-identical across thread counts; the skipped work really absent from the
//! maps; bad plans and ratios rejected with one line and exit 2.

mod common;

use common::*;
use sparseconv::nn::checkpoint::Checkpoint;
use sparseconv::pipeline::{self, Model};
use sparseconv::voxel_prune::{importance, kept_rows, Fill, Score, VoxelPlan};
use sparseconv::{ConvWeight, Engine, KernelSpec, SparseTensor};

fn weight(seed: u64, vol: usize, cin: usize, cout: usize) -> ConvWeight {
    let k = sparseconv::bench::pseudo_random(vol * cin * cout, seed, 0.3);
    let b = sparseconv::bench::pseudo_random(cout, seed + 1, 0.1);
    ConvWeight::new(k, vol, cin, cout, Some(b)).expect("weight")
}

/// One submanifold conv, every fill and residual case: the fast path equals the full conv with
/// the pruned rows overwritten by hand.
#[test]
fn a_pruned_submanifold_conv_is_the_full_conv_with_pruned_rows_overwritten() {
    let spec = KernelSpec::new(3, 1, 1).expect("spec");
    for (cin, cout, with_res, fill) in [
        (8, 8, false, Fill::Input),
        (8, 8, true, Fill::Input),
        (8, 8, true, Fill::Zero),
        (8, 16, false, Fill::Input),
        (8, 16, true, Fill::Zero),
        (8, 8, false, Fill::Zero),
    ] {
        let x = random_tensor(3, 2, 10, 1, 0.3, cin);
        let res = with_res.then(|| {
            let f = sparseconv::bench::pseudo_random(x.len() * cout, 9, 1.0);
            SparseTensor::new(x.coord_set().clone(), f, cout).expect("residual")
        });
        let w = weight(5, 27, cin, cout);
        let e = Engine::default();
        let scores = importance(x.feats(), cin, Score::L1);
        let rows = kept_rows(&scores, |i| x.coords()[i][0], 0.6).expect("rows");
        let label = format!("{cin}->{cout} residual {with_res} fill {fill:?}");
        let fast = e.conv_voxel_pruned(&x, spec, None, &w, res.as_ref(), true, &rows, fill, false).expect("fast");
        let map = e.kernel_map(x.coord_set(), spec).expect("map");
        let full = e.conv_fused(&map, &x, &w, res.as_ref(), true).expect("full").into_feats();
        let mut want = full.clone();
        let mut keep = vec![false; x.len()];
        rows.iter().for_each(|&r| keep[r as usize] = true);
        for q in (0..x.len()).filter(|&q| !keep[q]) {
            for k in 0..cout {
                want[q * cout + k] = match (fill, &res) {
                    (Fill::Input, _) if cin == cout => x.feats()[q * cin + k],
                    (_, Some(r)) => r.feats()[q * cout + k].max(0.0),
                    (_, None) => 0.0,
                };
            }
        }
        assert!(rel_err(fast.feats(), &want) < 1e-5, "{label}: {}", rel_err(fast.feats(), &want));
        assert!(!same_bits(&full, &want), "{label}: pruning changed some rows");
        assert_eq!(rows.len(), x.len() - count_pruned(&x, 0.6), "{label}: kept count per batch item");
    }
}

/// The fast paths: f32 and bf16 skip the pruned rows inside their output-tiled kernels (whole
/// tiles with no kept row included); sparse-format weights run on a map restricted to the kept
/// rows. Each against the full conv of the same engine with the pruned rows overwritten, bit
/// for bit, and the same bits for 1 and 3 threads.
#[test]
fn pruned_rows_are_skipped_on_every_cpu_path() {
    use sparseconv::gpu::conv::Precision;
    use sparseconv::sparse_weights::Format;
    use sparseconv::SparseMode;
    let spec = KernelSpec::new(3, 1, 1).expect("spec");
    let x16 = random_tensor(21, 1, 12, 1, 0.25, 16);
    let n = x16.len();
    assert!(n > 3000, "{n} voxels");
    // Rows below 2048 all pruned (whole 1024-row tasks), then every third row.
    let rows: Vec<u32> = (0..n as u32).filter(|&q| q >= 2048 && q % 3 != 0).collect();
    let mut keep = vec![false; n];
    rows.iter().for_each(|&r| keep[r as usize] = true);
    let paths = [
        ("f32 kept-row kernel", Precision::F32, false),
        ("bf16 kept-row kernel", Precision::Bf16, false),
        ("sparse weights, restricted map", Precision::F32, true),
    ];
    for (path, precision, sparse) in paths {
        if precision == Precision::Bf16 && !sparseconv::cpu::bf16::available() {
            eprintln!("SKIPPED {path}: this CPU has no AVX512_BF16");
            continue;
        }
        let engine = || {
            let e = Engine::default().with_precision(precision);
            if sparse {
                e.with_sparse_mode(SparseMode::Always)
            } else {
                e
            }
        };
        for (cout, fill, with_res) in
            [(16, Fill::Zero, true), (16, Fill::Input, false), (48, Fill::Zero, false), (24, Fill::Zero, true)]
        {
            let label = format!("{path}: 16->{cout} fill {fill:?} residual {with_res}");
            let res = with_res.then(|| {
                let f = sparseconv::bench::pseudo_random(n * cout, 4, 1.0);
                SparseTensor::new(x16.coord_set().clone(), f, cout).expect("residual")
            });
            let mut w = weight(11, 27, 16, cout);
            if sparse {
                w = w.with_format(Format::Element).expect("sparse format");
            }
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
                pool.install(|| {
                    let e = engine();
                    e.conv_voxel_pruned(&x16, spec, None, &w, res.as_ref(), true, &rows, fill, false).expect(&label)
                })
            };
            let fast = run(3);
            assert!(same_bits(fast.feats(), run(1).feats()), "{label}: bits differ between 3 and 1 threads");
            let e = engine();
            let map = e.kernel_map(x16.coord_set(), spec).expect("map");
            let mut want = e.conv_fused(&map, &x16, &w, res.as_ref(), true).expect("full").into_feats();
            for q in (0..n).filter(|&q| !keep[q]) {
                for k in 0..cout {
                    want[q * cout + k] = match (fill.resolve(16, cout), &res) {
                        (Fill::Input, _) => x16.feats()[q * 16 + k],
                        (_, Some(r)) => r.feats()[q * cout + k].max(0.0),
                        (_, None) => 0.0,
                    };
                }
            }
            // The kept rows are the full conv's rows: the same terms in the same order.
            assert!(same_bits(fast.feats(), &want), "{label}: max rel err {}", rel_err(fast.feats(), &want));
        }
    }
}

fn count_pruned(x: &SparseTensor, r: f32) -> usize {
    let mut per = std::collections::BTreeMap::new();
    x.coords().iter().for_each(|c| *per.entry(c[0]).or_insert(0usize) += 1);
    per.values().map(|&n| (r as f64 * n as f64).floor() as usize).sum()
}

/// A pruned downsampling conv keeps exactly the sites an important voxel falls into, with
/// every input's contribution to them, and the transposed conv back runs on its transpose.
#[test]
fn a_pruned_downsampling_conv_keeps_the_sites_of_important_voxels() {
    let down = KernelSpec::new(2, 2, 1).expect("spec");
    let x = random_tensor(4, 2, 12, 1, 0.3, 8);
    let w = weight(7, 8, 8, 8);
    let e = Engine::default();
    let rows = kept_rows(&importance(x.feats(), 8, Score::L2), |i| x.coords()[i][0], 0.5).expect("rows");
    let y = e.conv_voxel_pruned(&x, down, None, &w, None, false, &rows, Fill::Input, false).expect("fast");
    let full = e.conv(&x, &w, down).expect("full");
    // Sites: the parents of the kept rows, no others.
    let parent = |c: [i32; 4]| [c[0], c[1].div_euclid(2) * 2, c[2].div_euclid(2) * 2, c[3].div_euclid(2) * 2];
    let want: std::collections::BTreeSet<[i32; 4]> = rows.iter().map(|&r| parent(x.coords()[r as usize])).collect();
    assert_eq!(coord_set(y.coords()), want);
    assert!(want.len() < full.len(), "some sites are gone");
    // Each kept site's features: the full conv's (every child contributes).
    let at: std::collections::HashMap<[i32; 4], usize> =
        full.coords().iter().enumerate().map(|(i, &c)| (c, i)).collect();
    let got = y.feats();
    for (j, c) in y.coords().iter().enumerate() {
        let i = at[c];
        assert_eq!(&got[j * 8..(j + 1) * 8], &full.feats()[i * 8..(i + 1) * 8], "site {c:?}");
    }
    // The reference path: the same sites and bits.
    let r = e.conv_voxel_pruned(&x, down, None, &w, None, false, &rows, Fill::Input, true).expect("reference");
    assert!(same_bits(r.feats(), y.feats()));
    // Upsampling back onto x's coordinates: only the kept sites' children get anything.
    let up = e.conv_transposed(&y, x.coord_set(), &weight(8, 8, 8, 4), down).expect("transposed");
    assert_eq!(up.len(), x.len());
    let alive = |c: [i32; 4]| want.contains(&parent(c));
    for (q, c) in x.coords().iter().enumerate() {
        let row = &up.feats()[q * 4..(q + 1) * 4];
        // Without a parent the row is the bias only.
        let bias_only = row == weight(8, 8, 8, 4).bias().expect("bias");
        assert_eq!(bias_only, !alive(*c), "row {q}");
    }
}

fn bundled() -> Model {
    let ck = Checkpoint::load(&repo("data/models/minkunet_cr0.5.safetensors")).expect("bundled model");
    Model::from_checkpoint(&ck, None, None).expect("model").0
}

fn plan(m: &Model, r: f32, fill: Fill, downs: bool) -> VoxelPlan {
    let mut p = VoxelPlan::uniform(m.desc().block_convs().iter().map(|c| c.kernel.as_str()), r).expect("plan");
    if downs {
        for st in &m.desc().stages[..2] {
            p.ratios.insert(st.resample.kernel.clone(), r);
        }
    }
    p.fill = fill;
    p
}

/// The whole network on the real scan: the fast path equals the reference (every voxel
/// computed, pruned ones overwritten), for both fills and with pruned downsampling; it runs
/// fewer pairs; and it gives the same bits on 1 and 2 threads.
#[test]
fn the_pruned_network_matches_the_reference_on_the_real_scan() {
    let p = pipeline::prepare_file(&repo(SCAN), None, pipeline::VoxelizeMode::Mean).expect("scan");
    let e = Engine::default();
    let base = bundled();
    for (r, fill, downs) in [(0.5, Fill::Input, false), (0.3, Fill::Zero, true), (0.7, Fill::Input, true)] {
        let label = format!("r {r} fill {fill:?} downsampling pruned {downs}");
        let mut pl = plan(&base, r, fill, downs);
        let mut fast = base.clone();
        fast.set_voxel_plan(&pl).expect("plan");
        pl.reference = true;
        let mut reference = base.clone();
        reference.set_voxel_plan(&pl).expect("plan");
        e.start_trace();
        let a = fast.forward(&e, &p.voxels).expect("fast");
        let fast_pairs: usize = e.take_trace().iter().map(|t| t.pairs * t.cin * t.cout).sum();
        e.start_trace();
        let b = reference.forward(&e, &p.voxels).expect("reference");
        let ref_pairs: usize = e.take_trace().iter().map(|t| t.pairs * t.cin * t.cout).sum();
        assert!(rel_err(&a, &b) < 1e-4, "{label}: {}", rel_err(&a, &b));
        assert!(
            (fast_pairs as f64) < (1.0 - 0.8 * r as f64) * ref_pairs as f64,
            "{label}: the fast path runs {fast_pairs} pair-MACs against {ref_pairs}"
        );
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("pool");
        let c = one.install(|| fast.forward(&Engine::default(), &p.voxels)).expect("1 thread");
        assert!(same_bits(&a, &c), "{label}: 1 thread differs");
    }
    // Unpruned logits differ (the plan does something), and r = 0 is no pruning at all.
    let none = base.forward(&e, &p.voxels).expect("unpruned");
    let mut zero = base.clone();
    zero.set_voxel_plan(&plan(&base, 0.0, Fill::Input, true)).expect("plan");
    assert!(same_bits(&none, &zero.forward(&e, &p.voxels).expect("r=0")));
}

#[test]
fn plans_naming_what_the_model_lacks_are_errors() {
    let mut m = bundled();
    let mut p = VoxelPlan::default();
    p.ratios.insert("stage9.1.net.0.kernel".into(), 0.5);
    assert!(m.set_voxel_plan(&p).unwrap_err().to_string().contains("stage9.1.net.0.kernel"));
    let mut p = VoxelPlan::default();
    p.ratios.insert("up1.0.net.0.kernel".into(), 0.5);
    assert!(m.set_voxel_plan(&p).unwrap_err().to_string().contains("transposed"));
}

#[test]
fn bad_voxel_flags_get_one_line_and_exit_2() {
    let model = arg(&repo("data/models/minkunet_cr0.5.safetensors"));
    let scan = arg(&repo(SCAN));
    let plan = tmp_path("voxel", "bad.plan");
    std::fs::write(&plan, "# sparseconv voxel plan\nconv stage9.1.net.0.kernel 0.5\n").expect("write");
    let bad_ratio = tmp_path("voxel", "ratio.plan");
    std::fs::write(&bad_ratio, "# sparseconv voxel plan\nconv stage1.1.net.0.kernel 1.5\n").expect("write");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--voxel-prune".into(), "1.0".into()], "outside [0, 1)"),
        (vec!["--voxel-prune".into(), "-0.2".into()], "outside [0, 1)"),
        (vec!["--voxel-plan".into(), arg(&plan)], "stage9.1.net.0.kernel"),
        (vec!["--voxel-plan".into(), arg(&bad_ratio)], "line 2"),
        (vec!["--voxel-prune".into(), "0.5".into(), "--voxel-fill".into(), "half".into()], "--voxel-fill"),
    ];
    for (flags, want) in cases {
        let mut args: Vec<String> = vec![
            "bench".into(),
            scan.clone(),
            "--model".into(),
            model.clone(),
            "--runs".into(),
            "1".into(),
            "--warmup".into(),
            "0".into(),
        ];
        args.extend(flags.iter().cloned());
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, err) = run_cli(&a);
        assert_eq!(code, 2, "{flags:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{flags:?}: {err}");
        assert!(err.contains(want), "{flags:?}: {err}");
    }
    // A command that runs no network refuses the flag.
    let (code, _, err) = run_cli(&["init-weights", &arg(&tmp_path("voxel", "w.safetensors")), "--voxel-prune", "0.5"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--voxel-prune"), "{err}");
}

/// The sweep's plan: per conv the largest ratio within the drop that also measured faster.
#[test]
fn the_voxel_sweep_plan_keeps_what_each_conv_may_lose() {
    use sparseconv::prune::sensitivity::{voxel_plan, VoxelPoint};
    let p = |name: &str, ratio: f64, miou: f64, seconds: f64| VoxelPoint { name: name.into(), ratio, miou, seconds };
    let pts = vec![
        p("", 0.0, 0.40, 1.0),
        p("a", 0.5, 0.399, 0.9),
        p("a", 0.8, 0.397, 0.8),
        p("b", 0.5, 0.38, 0.9),
        p("c", 0.5, 0.40, 1.1),
    ];
    let base = VoxelPlan { fill: Fill::Zero, ..VoxelPlan::default() };
    let plan = voxel_plan(&pts, 0.005, &base);
    assert_eq!(plan.ratios.len(), 1, "{plan:?}");
    assert_eq!(plan.ratios["a"], 0.8);
    assert_eq!(plan.fill, Fill::Zero);
    assert!(voxel_plan(&pts, 0.0, &base).ratios.is_empty());
}

/// The voxel-pruning config shipped next to the bundled model: its plan applies to the bundled
/// architecture, and its fine-tuned weights with the plan segment the labelled KITTI scan no
/// worse than the bundled model unpruned, less the one point, while the plan's convs
/// compute fewer pairs than unpruned.
#[test]
fn the_shipped_voxel_config_segments_within_a_point_of_the_bundled_model() {
    let plan_path = repo("data/models/minkunet_cr0.5_voxel.plan");
    let text = std::fs::read_to_string(&plan_path).expect("shipped plan");
    let plan = VoxelPlan::parse(&text, "shipped plan").expect("parse");
    assert!(!plan.is_empty());
    let shipped = repo("data/models/minkunet_cr0.5_voxel.safetensors");
    let (mut m, _) = Model::from_checkpoint(&Checkpoint::load(&shipped).expect("shipped"), None, None).expect("model");
    m.set_voxel_plan(&plan).expect("the plan names convs of the model");
    let miou = |model: &std::path::Path, flags: &[&str]| -> f64 {
        let (s, l, m) = (arg(&repo(SCAN)), arg(&repo(LABELS)), arg(model));
        let mut a = vec!["--threads", "2", "eval", &s, "--labels", &l, "--model", &m];
        a.extend_from_slice(flags);
        let (code, out, err) = run_cli(&a);
        assert_eq!(code, 0, "{err}");
        let line = out.lines().find(|l| l.starts_with("mIoU")).unwrap_or_else(|| panic!("no mIoU in {out}"));
        line.split_whitespace().nth(1).and_then(|v| v.trim_end_matches('%').parse().ok()).expect("mIoU value")
    };
    let p = arg(&plan_path);
    let pruned = miou(&shipped, &["--voxel-plan", &p]);
    let bundled = miou(&repo("data/models/minkunet_cr0.5.safetensors"), &[]);
    assert!(pruned >= bundled - 1.0, "shipped config {pruned}% against the bundled model's {bundled}%");
    let (code, out, err) = run_cli(&[
        "bench",
        &arg(&repo(SCAN)),
        "--model",
        &arg(&shipped),
        "--runs",
        "1",
        "--warmup",
        "0",
        "--layers",
        "--voxel-plan",
        &p,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("kept rows"), "the plan's convs run the kept-row kernel: {out}");
}
