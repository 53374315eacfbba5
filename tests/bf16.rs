//! The CPU bf16 mode (`Precision::Bf16`): every conv kind against the dense-grid reference in
//! f64 on the same bf16-rounded inputs, the same bits for any thread count, and the bundled
//! model on the real scan against f32 (labels agree on ≥ 99.5% of voxels, mIoU within 0.2
//! points). On a CPU without AVX512_BF16 these tests skip loudly.

mod common;

use common::*;
use sparseconv::bench::pseudo_random;
use sparseconv::cpu::bf16;
use sparseconv::io::kitti::{read_label, LearningMap};
use sparseconv::metrics::Confusion;
use sparseconv::reference::{dense_conv_f64, downsampled_coords};
use sparseconv::{pipeline, ConvWeight, Device, Engine, Grouping, KernelSpec, MapBuilder, Precision, SparseTensor};

const TINY: &str = "data/tiny/sequences/00/velodyne/000000.bin";

fn skip() -> bool {
    if bf16::available() {
        return false;
    }
    eprintln!("\n*** SKIPPED: this CPU has no AVX512_BF16: {} ***\n", bf16::describe());
    true
}

fn engine(builder: MapBuilder) -> Engine {
    Engine::new(Device::Cpu, builder, Grouping::Heuristic).with_precision(Precision::Bf16)
}

/// (kernel, stride, cin, cout): widths on and off the 16 grid, narrow and odd, as pruning leaves them.
const CASES: &[(u32, u32, usize, usize)] = &[
    (3, 1, 4, 16),
    (3, 1, 3, 5),
    (3, 1, 1, 1),
    (3, 1, 8, 24),
    (3, 1, 19, 19),
    (3, 1, 30, 30),
    (3, 1, 64, 72),
    (3, 1, 128, 96),
    (1, 1, 48, 40),
    (2, 2, 16, 16),
    (2, 2, 7, 33),
    (3, 2, 5, 3),
];

/// `|got − want| ≤ TOL · Σ|x·w|` per element: the products of bf16 values are exact in f32,
/// so what is left is f32 summation, bounded by the terms' magnitude.
const TOL: f64 = 1e-5;

/// The reference on rounded inputs: the values, and the sums of absolute terms (the scale).
#[allow(clippy::too_many_arguments)]
fn reference(
    inputs: &[[i32; 4]],
    feats: &[f32],
    cin: usize,
    outputs: &[[i32; 4]],
    w: &ConvWeight,
    spec: KernelSpec,
    in_stride: i32,
    sign: i32,
) -> (Vec<f64>, Vec<f64>) {
    let x: Vec<f64> = feats.iter().map(|&v| f64::from(bf16::round(v))).collect();
    let k: Vec<f64> = w.kernel().iter().map(|&v| f64::from(bf16::round(v))).collect();
    let b: Option<Vec<f64>> = w.bias().map(|b| b.iter().map(|&v| f64::from(v)).collect());
    let want = dense_conv_f64(inputs, &x, cin, outputs, &k, w.cout, spec, in_stride, sign, b.as_deref());
    let ax: Vec<f64> = x.iter().map(|v| v.abs()).collect();
    let ak: Vec<f64> = k.iter().map(|v| v.abs()).collect();
    let scale = dense_conv_f64(inputs, &ax, cin, outputs, &ak, w.cout, spec, in_stride, sign, None);
    (want, scale)
}

fn check(label: &str, got: &[f32], want: &[f64], scale: &[f64]) {
    assert_eq!(got.len(), want.len(), "{label}: length");
    for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
        let err = (f64::from(g) - w).abs();
        assert!(err <= TOL * s + 1e-9, "{label}: element {i}: {g} against {w} (terms {s:.3e}, err {err:.3e})");
    }
}

#[test]
fn bf16_convs_match_the_dense_grid_on_rounded_inputs() {
    if skip() {
        return;
    }
    for (ci, &(k, s, cin, cout)) in CASES.iter().enumerate() {
        let seed = 500 + ci as u64;
        let x = random_tensor(seed, 2, 8, 1, 0.3, cin);
        let spec = KernelSpec::new(k, s, 1).expect("spec");
        let b = (ci % 2 == 0).then(|| pseudo_random(cout, seed + 7, 0.5));
        let w = ConvWeight::new(pseudo_random(spec.volume() * cin * cout, seed, 0.3), spec.volume(), cin, cout, b)
            .expect("weight");
        let outs = if s == 1 { x.coords().to_vec() } else { downsampled_coords(x.coords(), s as i32) };
        let (want, scale) = reference(x.coords(), x.feats(), cin, &outs, &w, spec, 1, 1);
        for (bname, builder) in [("hash", MapBuilder::Hash), ("sort", MapBuilder::Sort)] {
            let label = format!("bf16/{bname}: case {ci} k{k} s{s} {cin}->{cout}");
            let y = engine(builder).conv(&x, &w, spec).unwrap_or_else(|e| panic!("{label}: {e}"));
            check(&label, &rows_in_order(&y, &outs), &want, &scale);
        }
        // The transposed conv back onto the input coordinates (the U-Net's decoder).
        if s > 1 {
            let e = engine(MapBuilder::Sort);
            let probe = ConvWeight::new(vec![1.0; spec.volume() * cin], spec.volume(), cin, 1, None).expect("probe");
            let coarse_coords = e.conv(&x, &probe, spec).expect("down").coord_set().clone();
            let coarse_feats = pseudo_random(coarse_coords.len() * cout, seed + 3, 1.0);
            let coarse = SparseTensor::new(coarse_coords, coarse_feats, cout).expect("coarse");
            let wt = ConvWeight::new(
                pseudo_random(spec.volume() * cout * cin, seed + 4, 0.3),
                spec.volume(),
                cout,
                cin,
                None,
            )
            .expect("weight");
            let y = e.conv_transposed(&coarse, x.coord_set(), &wt, spec).expect("transposed");
            let (want, scale) = reference(coarse.coords(), coarse.feats(), cout, x.coords(), &wt, spec, 1, -1);
            check(&format!("bf16 transposed: case {ci}"), y.feats(), &want, &scale);
        }
    }
}

#[test]
fn bf16_residual_and_relu_epilogue_match() {
    if skip() {
        return;
    }
    let x = random_tensor(77, 1, 8, 1, 0.4, 24);
    let spec = KernelSpec::new(3, 1, 1).expect("spec");
    let w = ConvWeight::new(pseudo_random(27 * 24 * 40, 78, 0.3), 27, 24, 40, Some(pseudo_random(40, 79, 0.5)))
        .expect("weight");
    let e = engine(MapBuilder::Sort);
    let map = e.kernel_map(x.coord_set(), spec).expect("map");
    let res = SparseTensor::new(x.coord_set().clone(), pseudo_random(x.len() * 40, 80, 1.0), 40).expect("residual");
    let y = e.conv_fused(&map, &x, &w, Some(&res), true).expect("fused");
    let (want, scale) = reference(x.coords(), x.feats(), 24, x.coords(), &w, spec, 1, 1);
    for (i, &g) in y.feats().iter().enumerate() {
        let v = (want[i] + f64::from(res.feats()[i])).max(0.0);
        let err = (f64::from(g) - v).abs();
        assert!(err <= TOL * (scale[i] + res.feats()[i].abs() as f64) + 1e-9, "element {i}: {g} against {v}");
    }
}

#[test]
fn bf16_gives_the_same_bits_for_every_thread_count() {
    if skip() {
        return;
    }
    let (model, _) = pipeline::Model::load(&repo("data/models/minkunet_cr0.5.safetensors"), None, None).expect("model");
    let prep = pipeline::prepare_file(&repo(SCAN), None, pipeline::VoxelizeMode::Mean).expect("scan");
    let logits = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
        pool.install(|| {
            pipeline::segment(&engine(MapBuilder::Sort), &model, &prep, &mut pipeline::Timings::default())
                .expect("segment")
                .logits
        })
    };
    let one = logits(1);
    for t in [2, 3] {
        assert!(same_bits(&one, &logits(t)), "bf16 logits differ between 1 and {t} threads");
    }
}

#[test]
fn bf16_segmentation_agrees_with_f32_on_the_real_scans() {
    if skip() {
        return;
    }
    let lm = LearningMap::load(&repo("data/semantickitti/semantic-kitti.yaml")).expect("yaml");
    let gt: Vec<u32> =
        read_label(&repo(LABELS), None).expect("labels").into_iter().map(|l| lm.to_train(l & 0xffff)).collect();
    for path in ["data/models/minkunet_cr0.5.safetensors", "data/models/minkunet_cr0.5_pruned.safetensors"] {
        let (model, _) = pipeline::Model::load(&repo(path), None, None).expect("model");
        let prep = pipeline::prepare_file(&repo(SCAN), None, pipeline::VoxelizeMode::Mean).expect("scan");
        let run = |e: Engine| pipeline::segment(&e, &model, &prep, &mut pipeline::Timings::default()).expect("segment");
        let f = run(Engine::new(Device::Cpu, MapBuilder::Sort, Grouping::Heuristic));
        let b = run(engine(MapBuilder::Sort));
        let same = f.voxel_labels.iter().zip(&b.voxel_labels).filter(|(p, q)| p == q).count();
        let agree = same as f64 / f.voxel_labels.len() as f64;
        assert!(agree >= 0.995, "{path}: bf16 and f32 labels agree on {:.3}% of voxels", 100.0 * agree);
        let miou = |labels: &[u32]| Confusion::from_labels(labels, &gt).expect("confusion").miou().expect("miou");
        let (mf, mb) = (miou(&f.point_labels), miou(&b.point_labels));
        assert!((mf - mb).abs() <= 0.002, "{path}: mIoU {:.2}% in f32, {:.2}% in bf16", 100.0 * mf, 100.0 * mb);
        eprintln!(
            "{path}: labels agree on {:.3}% of voxels; mIoU f32 {:.2}% bf16 {:.2}%",
            100.0 * agree,
            100.0 * mf,
            100.0 * mb
        );
    }
}

#[test]
fn precision_flag_is_checked_and_reported() {
    // Commands that run f32 only, and the wrong device for a precision: one line, exit 2.
    for (args, needle) in [
        (vec!["--precision", "bf16", "prune", "data/models/minkunet_cr0.5.safetensors", "--list-groups"], "f32"),
        (vec!["--precision", "f16", "segment", SCAN], "GPU mode"),
        (vec!["--precision", "bf16", "segment", SCAN, "--device", "gpu"], "CPU mode"),
        (vec!["--precision", "bf17", "segment", SCAN], "bf16"),
    ] {
        let (code, _, err) = run_cli(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let (code, out, err) =
        run_cli(&["--threads", "2", "--precision", "bf16", "bench", TINY, "--runs", "1", "--layers"]);
    assert_eq!(code, 0, "{err}");
    let want = if bf16::available() { "cpu (bf16)" } else { "cpu (f32 (no AVX512_BF16))" };
    assert!(out.contains(want), "{out}");
    if bf16::available() {
        assert!(out.contains("bf16 out-tiled"), "each layer names its kernel: {out}");
    } else {
        assert!(err.contains("no AVX512_BF16"), "says so in one line: {err}");
    }
}
