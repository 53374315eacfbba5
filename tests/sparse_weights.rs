//! Weight-sparse convs against the dense conv of the same (masked) weights, on the real scan's
//! maps: every format, odd and kernel-friendly widths, submanifold and downsampling maps, the
//! same bits on 1 and 3 threads; the formats' own checks; a pruned model on the engine.

mod common;

use std::collections::HashMap;

use common::*;
use sparseconv::bench::pseudo_random;
use sparseconv::cpu::build_map;
use sparseconv::cpu::conv::{conv_forward_ex, Epilogue};
use sparseconv::cpu::sparse::conv_sparse;
use sparseconv::device::SparseMode;
use sparseconv::nn::arch::{ArchKind, NetDesc};
use sparseconv::nn::checkpoint::Checkpoint;
use sparseconv::pipeline::Model;
use sparseconv::prune::channel::Selection;
use sparseconv::prune::prune_sparse;
use sparseconv::sparse_weights::{prune_kernel, Format, OffsetWeights, SparseWeights};
use sparseconv::{ConvWeight, Device, Engine, Grouping, KernelSpec, MapBuilder, Plan, SparseTensor};

fn on_threads<T: Send>(n: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new().num_threads(n).build().expect("pool").install(f)
}

#[test]
fn sparse_kernels_match_the_dense_conv_of_the_masked_weights() {
    let x0 = real_scan().tensor;
    // A crop keeps the test quick; both map kinds of the network.
    let keep: Vec<usize> = (0..x0.len()).filter(|&i| (0..60).contains(&x0.coords()[i][1])).collect();
    let coords: Vec<[i32; 4]> = keep.iter().map(|&i| x0.coords()[i]).collect();
    let sub = KernelSpec::new(3, 1, 1).expect("spec");
    let down = KernelSpec::new(2, 2, 1).expect("spec");
    let cases = [
        (Format::Element, 0.7, 12, 20),
        (Format::Element, 0.9, 64, 64),
        (Format::Block, 0.5, 20, 32),
        (Format::Block, 0.9, 64, 64),
        (Format::Block, 0.7, 128, 48),
        (Format::NM(2, 4), 0.0, 16, 24),
        (Format::NM(1, 4), 0.0, 64, 64),
    ];
    for (f, s, cin, cout) in cases {
        let feats = pseudo_random(coords.len() * cin, 5, 1.0);
        let x = SparseTensor::from_parts(coords.clone(), feats, cin).expect("input");
        for spec in [sub, down] {
            let map = build_map(MapBuilder::Sort, x.coord_set(), spec).expect("map");
            let vol = spec.volume();
            let mut w = pseudo_random(vol * cin * cout, 6, 0.3);
            prune_kernel(&mut w, cin, cout, f, s);
            // One offset entirely pruned too: its pairs must be skipped, not mis-added.
            w[cin * cout..2 * cin * cout].fill(0.0);
            let sw = SparseWeights::new(f, &w, vol, cin, cout).expect("format");
            assert_eq!(sw.to_dense(), w, "{f:?}: the format holds exactly the weights");
            assert!(matches!(sw.offsets[1], OffsetWeights::Empty));
            let bias = pseudo_random(cout, 7, 0.5);
            let res = pseudo_random(map.n_out() * cout, 8, 0.5);
            let epi = Epilogue { bias: Some(&bias), residual: Some(&res), relu: true, pruned: None };
            let dense = conv_forward_ex(&map, &Plan::ungrouped(&map), x.feats(), cin, &w, cout, epi).expect("dense");
            let one = on_threads(1, || conv_sparse(&map, x.feats(), cin, &sw, epi).expect("sparse"));
            let three = on_threads(3, || conv_sparse(&map, x.feats(), cin, &sw, epi).expect("sparse"));
            let label = format!("{} {s} {cin}->{cout} k{}", f.name(), spec.size);
            let err = rel_err(&one, &dense);
            assert!(err < 1e-5, "{label}: sparse vs dense masked: {err:e}");
            assert_eq!(one.len(), three.len(), "{label}");
            assert!(same_bits(&one, &three), "{label}: 1 vs 3 threads");
        }
    }
}

#[test]
fn formats_refuse_weights_without_their_structure() {
    let mut w = pseudo_random(27 * 8 * 16, 1, 1.0);
    assert!(SparseWeights::new(Format::NM(2, 4), &w, 27, 8, 16).is_err(), "dense weights are not 2:4");
    prune_kernel(&mut w, 8, 16, Format::NM(2, 4), 0.0);
    assert!(SparseWeights::new(Format::NM(2, 4), &w, 27, 8, 16).is_ok());
    assert!(SparseWeights::new(Format::NM(2, 3), &w, 27, 8, 16).is_err(), "3 does not divide 8");
    assert!(SparseWeights::new(Format::Block, &pseudo_random(27 * 8 * 20, 2, 1.0), 27, 8, 20).is_err());
    assert!(Format::parse("3:2").is_err() && Format::parse("0:4").is_err() && Format::parse("dense").is_err());
    // A hand-made value that breaks the invariants is an error, not a wild read.
    let mut sw = SparseWeights::new(Format::Element, &w, 27, 8, 16).expect("format");
    if let OffsetWeights::Columns { rows, .. } = &mut sw.offsets[0] {
        rows[0] = 99;
    }
    let x = real_scan().tensor;
    let xs = SparseTensor::from_parts(x.coords()[..500].to_vec(), pseudo_random(500 * 8, 3, 1.0), 8).expect("x");
    let map = build_map(MapBuilder::Sort, xs.coord_set(), KernelSpec::new(3, 1, 1).expect("spec")).expect("map");
    let e = conv_sparse(&map, xs.feats(), 8, &sw, Epilogue::default()).expect_err("refused");
    assert!(e.to_string().contains("input channel"), "{e}");
}

#[test]
fn the_engine_runs_sparse_layers_as_its_mode_says() {
    let x0 = real_scan().tensor;
    let x = SparseTensor::from_parts(x0.coords().to_vec(), pseudo_random(x0.len() * 32, 1, 1.0), 32).expect("x");
    let mut k = pseudo_random(27 * 32 * 32, 2, 0.2);
    prune_kernel(&mut k, 32, 32, Format::Block, 0.8);
    let w = ConvWeight::new(k, 27, 32, 32, None).expect("w").with_format(Format::Block).expect("block");
    let run = |mode: SparseMode| {
        let e = Engine::new(Device::Cpu, MapBuilder::Sort, Grouping::Heuristic).with_sparse_mode(mode);
        let map = e.kernel_map(x.coord_set(), KernelSpec::new(3, 1, 1).expect("spec")).expect("map");
        e.start_trace();
        let y = e.conv_with_map(&map, &x, &w).expect("conv");
        (y.feats().to_vec(), e.take_trace()[0].plan.clone())
    };
    let (dense, dl) = run(SparseMode::Never);
    let (sparse, sl) = run(SparseMode::Always);
    assert!(dl == "output-tiled" && sl.starts_with("sparse block"), "{dl} / {sl}");
    assert!(rel_err(&sparse, &dense) < 1e-5);
}

#[test]
fn a_sparsified_model_loads_its_formats_and_keeps_its_answer() {
    let ck = Checkpoint::load(&repo("data/models/minkunet_cr0.5.safetensors")).expect("model");
    for f in [Format::Block, Format::NM(2, 4), Format::Element] {
        let p = prune_sparse(&ck, ArchKind::MinkUNet, f, 0.8, Selection::Local).expect("prune");
        assert!(p.metadata.keys().any(|k| k.starts_with("format.")), "{f:?}");
        let pk = p.checkpoint();
        let desc = NetDesc::from_checkpoint(ArchKind::MinkUNet, &pk, 19).expect("desc");
        let model = Model::from_desc(&pk, &desc).expect("model with formats");
        let x = real_scan().tensor;
        let logits = |mode| {
            let e = Engine::new(Device::Cpu, MapBuilder::Sort, Grouping::Heuristic).with_sparse_mode(mode);
            model.forward(&e, &x).expect("forward")
        };
        let err = rel_err(&logits(SparseMode::Always), &logits(SparseMode::Never));
        assert!(err < 1e-4, "{f:?}: sparse vs dense kernels on the same weights: {err:e}");
    }
    // A format the tensors do not have is refused when the model loads.
    let mut meta: HashMap<String, String> = ck.metadata().clone();
    meta.insert("format.stage1.1.net.0.kernel".into(), "1:4".into());
    let bad = Checkpoint::from_tensors("lying.safetensors", ck.tensors().clone(), meta);
    let desc = NetDesc::from_checkpoint(ArchKind::MinkUNet, &bad, 19).expect("desc");
    let e = Model::from_desc(&bad, &desc).expect_err("refused").to_string();
    assert!(e.contains("lying.safetensors") && e.contains("format.stage1.1.net.0.kernel"), "{e}");
}
