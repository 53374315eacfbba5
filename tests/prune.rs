//! Channel pruning against its reference: the physically smaller network must give the logits
//! of the full network with the removed channels held at zero, on the real scan, for MinkUNet
//! (the bundled trained weights) and SPVCNN (synthetic weights), with random and magnitude
//! groups; and the dependency groups must cover every channel of every tensor exactly once.

mod common;

use std::collections::{BTreeMap, HashMap};

use common::*;
use sparseconv::io::tensors::Tensor;
use sparseconv::nn::arch::{ArchKind, NetDesc};
use sparseconv::nn::checkpoint::Checkpoint;
use sparseconv::nn::minkunet::MinkUNet;
use sparseconv::pipeline::Model;
use sparseconv::prune::channel::{self, ChannelOptions, Selection};
use sparseconv::prune::groups::groups;
use sparseconv::prune::importance::{scores, Criterion};
use sparseconv::prune::offset::OffsetScope;
use sparseconv::prune::prune_channels;
use sparseconv::{Device, Engine, Grouping, MapBuilder};

const MODEL: &str = "data/models/minkunet_cr0.5.safetensors";

fn synthetic(kind: ArchKind, cr: f32, seed: u64) -> Checkpoint {
    let ck = Checkpoint::random(seed);
    Model::from_desc(&ck, &NetDesc::uniform(kind, cr, 19).expect("desc")).expect("shapes");
    let meta = HashMap::from([("arch".to_string(), kind.name().to_string())]);
    Checkpoint::from_tensors("<synthetic>", ck.synthesized(), meta)
}

fn logits(ck: &Checkpoint, kind: ArchKind) -> Vec<f32> {
    let desc = NetDesc::from_checkpoint(kind, ck, 19).expect("desc");
    let model = Model::from_desc(ck, &desc).expect("model");
    let x = real_scan().tensor;
    let e = Engine::new(Device::Cpu, MapBuilder::Sort, Grouping::Heuristic);
    model.forward(&e, &x).expect("forward")
}

fn opts(ratio: f64, selection: Selection, round_to: usize) -> ChannelOptions {
    ChannelOptions { ratio, selection, round_to, min_width: 1 }
}

/// Pruned against masked, and masked against the unpruned network (which must differ, or the
/// first comparison proves nothing).
fn check_pruned_equals_masked(label: &str, ck: &Checkpoint, kind: ArchKind, criterion: Criterion, o: ChannelOptions) {
    let p = prune_channels(ck, kind, criterion, &o, &[], 11).expect("prune");
    assert!(p.after.parameters() < p.before.parameters(), "{label}: nothing was removed");
    let masked = channel::masked(&p.groups, &p.plan, ck.tensors()).expect("masked");
    let masked = Checkpoint::from_tensors("<masked>", masked, HashMap::new());
    let (full, m, pr) = (logits(ck, kind), logits(&masked, kind), logits(&p.checkpoint(), kind));
    let err = rel_err(&pr, &m);
    assert!(err < 1e-5, "{label}: pruned vs masked logits differ by {err:e} (relative)");
    assert!(rel_err(&m, &full) > 1e-3, "{label}: masking changed nothing, the comparison is vacuous");
}

#[test]
fn minkunet_pruned_equals_masked_on_the_real_scan() {
    let ck = Checkpoint::load(&repo(MODEL)).expect("bundled model");
    // Odd widths (round-to 1) with random channels, and L1 with the kernel-friendly rounding.
    check_pruned_equals_masked(
        "minkunet random local 0.4",
        &ck,
        ArchKind::MinkUNet,
        Criterion::Random,
        opts(0.4, Selection::Local, 1),
    );
    check_pruned_equals_masked(
        "minkunet l1 global 0.5",
        &ck,
        ArchKind::MinkUNet,
        Criterion::L1,
        opts(0.5, Selection::Global, 8),
    );
}

#[test]
fn spvcnn_pruned_equals_masked_on_the_real_scan() {
    let ck = synthetic(ArchKind::Spvcnn, 0.5, 5);
    check_pruned_equals_masked(
        "spvcnn random local 0.3",
        &ck,
        ArchKind::Spvcnn,
        Criterion::Random,
        opts(0.3, Selection::Local, 1),
    );
    check_pruned_equals_masked(
        "spvcnn bn global 0.5",
        &ck,
        ArchKind::Spvcnn,
        Criterion::BatchNorm,
        opts(0.5, Selection::Global, 4),
    );
}

#[test]
fn every_channel_of_every_tensor_is_in_exactly_one_group() {
    for (kind, cr) in [(ArchKind::MinkUNet, 0.5), (ArchKind::MinkUNet, 1.0), (ArchKind::Spvcnn, 0.5)] {
        let ck = synthetic(kind, cr, 3);
        let desc = NetDesc::from_checkpoint(kind, &ck, 19).expect("desc");
        let gs = groups(&desc).expect("groups");
        // Every (tensor, channel axis, index) counted once over all groups.
        let mut seen: HashMap<(String, usize), Vec<u32>> = HashMap::new();
        for g in &gs {
            for s in &g.slots {
                let t = &ck.tensors()[&s.tensor];
                let n = t.shape[s.axis];
                let v = seen.entry((s.tensor.clone(), s.axis)).or_insert_with(|| vec![0; n]);
                for j in 0..g.width {
                    v[s.offset + j] += 1;
                }
            }
        }
        for (name, t) in ck.tensors() {
            // Channel axes: the last two of a kernel, both of a linear weight, the one of a vector.
            let axes: Vec<usize> = match t.shape.len() {
                3 => vec![1, 2],
                2 => vec![0, 1],
                _ => vec![0],
            };
            for a in axes {
                let counts = seen.get(&(name.clone(), a)).unwrap_or_else(|| panic!("{name} axis {a} is in no group"));
                assert!(counts.iter().all(|&c| c == 1), "{:?} cr {cr}: {name} axis {a} covered {counts:?}", kind);
            }
        }
        // The coupling the U-Net makes: identity residuals tie a stage's blocks, and the skip
        // sits after the up-conv's channels in its consumers.
        let group_of = |t: &str, produces: bool| {
            gs.iter().position(|g| g.slots.iter().any(|s| s.tensor == t && s.produces == produces)).expect(t)
        };
        assert_eq!(group_of("stage4.1.net.3.kernel", true), group_of("stage4.2.net.3.kernel", true));
        let up_skip = gs.iter().flat_map(|g| &g.slots).find(|s| s.tensor == "up1.1.0.net.0.kernel" && s.offset > 0);
        assert_eq!(up_skip.map(|s| s.offset), Some(desc.ups[0].resample.cout));
        if kind == ArchKind::Spvcnn {
            // The first point MLP's output is added to the encoder output.
            assert_eq!(group_of("point_transforms.0.0.weight", true), group_of("stage4.2.net.3.kernel", true));
        }
    }
}

#[test]
fn widths_come_from_shapes_and_shortcuts_survive_equal_widths() {
    let ck = synthetic(ArchKind::MinkUNet, 0.5, 9);
    let desc = NetDesc::from_checkpoint(ArchKind::MinkUNet, &ck, 19).expect("desc");
    assert_eq!(desc, NetDesc::uniform(ArchKind::MinkUNet, 0.5, 19).expect("uniform"));
    assert_eq!(desc.uniform_cr(), Some(0.5));
    // 50% with widths rounded to 16: stage2's first block goes 16 -> 16 but keeps its 1x1 shortcut.
    let p = prune_channels(&ck, ArchKind::MinkUNet, Criterion::L1, &opts(0.5, Selection::Local, 16), &[], 0)
        .expect("prune");
    let b = &p.after.stages[1].blocks[0];
    assert_eq!((b.c1.cin, b.c2.cout), (16, 16));
    assert!(b.shortcut.is_some(), "the shortcut conv must not vanish when widths become equal");
    assert_eq!(p.after.uniform_cr(), None);
    // Every kept width is a multiple of 16 (16 itself where 16 or fewer channels were wanted).
    for g in groups(&p.after).expect("groups").iter().filter(|g| g.prunable) {
        assert_eq!(g.width % 16, 0, "group {} has {} channels", g.name(), g.width);
    }
}

#[test]
fn selection_respects_ratio_rounding_and_minimum() {
    let ck = synthetic(ArchKind::MinkUNet, 1.0, 2);
    let desc = NetDesc::from_checkpoint(ArchKind::MinkUNet, &ck, 19).expect("desc");
    let gs = groups(&desc).expect("groups");
    let s = scores(&gs, ck.tensors(), Criterion::L2, None, 0).expect("scores");
    let none = channel::select(&gs, &s, &opts(0.0, Selection::Local, 1)).expect("ratio 0");
    assert!(gs.iter().zip(&none.keep).all(|(g, k)| k.len() == g.width), "ratio 0 keeps everything");
    let o = ChannelOptions { ratio: 0.75, selection: Selection::Local, round_to: 8, min_width: 16 };
    let plan = channel::select(&gs, &s, &o).expect("select");
    for (g, k) in gs.iter().zip(&plan.keep) {
        if g.prunable {
            let want = (g.width as f64 * 0.25).round() as usize;
            assert_eq!(k.len(), o.kept(g.width, want), "{}", g.name());
            assert!(k.len() >= 16.min(g.width) && k.len() % 8 == 0, "{}: {}", g.name(), k.len());
            // The kept channels are the highest-scoring ones.
            let s = &s[g.id];
            let lowest_kept = k.iter().map(|&j| s[j]).fold(f64::INFINITY, f64::min);
            assert!((0..g.width).filter(|j| !k.contains(j)).all(|j| s[j] <= lowest_kept), "{}", g.name());
        } else {
            assert_eq!(k.len(), g.width);
        }
    }
    for bad in [1.0, -0.1, f64::NAN] {
        assert!(channel::select(&gs, &s, &opts(bad, Selection::Local, 1)).is_err(), "ratio {bad}");
    }
}

#[test]
fn widths_that_do_not_chain_are_an_error_naming_the_layer() {
    let ck = synthetic(ArchKind::MinkUNet, 0.5, 4);
    let mut t: BTreeMap<String, Tensor<f32>> = ck.tensors().clone();
    let k = t.get_mut("stage3.1.net.3.kernel").expect("tensor");
    // [27, 64, 64] -> [27, 63, 64]: the second conv now reads fewer channels than the first writes.
    k.shape = vec![27, 63, 64];
    k.data.truncate(27 * 63 * 64);
    let bad = Checkpoint::from_tensors("bad.safetensors", t, HashMap::new());
    let e = NetDesc::from_checkpoint(ArchKind::MinkUNet, &bad, 19).expect_err("must not load").to_string();
    assert!(e.contains("bad.safetensors") && e.contains("stage3.1.net.3.kernel") && e.contains("63"), "{e}");
}

#[test]
fn a_conv_skips_zero_offsets_with_the_same_bits_on_every_strategy() {
    use sparseconv::cpu::conv::{conv_forward_ex, Epilogue};
    use sparseconv::{ConvWeight, KernelSpec, Plan, SparseTensor};
    let vox = real_scan().tensor;
    let x =
        SparseTensor::from_parts(vox.coords().to_vec(), sparseconv::bench::pseudo_random(vox.len() * 16, 3, 1.0), 16)
            .expect("input");
    let spec = KernelSpec::new(3, 1, 1).expect("spec");
    let mut k = sparseconv::bench::pseudo_random(27 * 16 * 32, 4, 0.2);
    // Offsets 0, 5, 13 (the centre) and 22 removed.
    for o in [0usize, 5, 13, 22] {
        k[o * 512..(o + 1) * 512].fill(0.0);
    }
    let w = ConvWeight::new(k.clone(), 27, 16, 32, None).expect("weight");
    assert_eq!(w.zero_offsets().iter().filter(|&&z| z).count(), 4);
    for st in cpu_strategies() {
        let e = &st.engine;
        let map = e.kernel_map(x.coord_set(), spec).expect("map");
        // The reference runs every offset's pairs.
        let full = conv_forward_ex(
            &map,
            &Plan::ungrouped(&map),
            x.feats(),
            16,
            &k,
            32,
            Epilogue { bias: None, residual: None, relu: false, pruned: None },
        )
        .expect("full");
        e.start_trace();
        let y = e.conv_with_map(&map, &x, &w).expect("skipping");
        let ran = e.take_trace()[0].pairs;
        let removed: usize = [0usize, 5, 13, 22].iter().map(|&o| map.size(o)).sum();
        assert_eq!(ran, map.total_pairs() - removed, "{}: pairs run", st.label);
        assert_eq!(y.feats().len(), full.len(), "{}", st.label);
        let same = y.feats().len() == full.len()
            && y.feats().iter().zip(&full).all(|(a, b)| a.to_bits() == b.to_bits() || (*a == 0.0 && *b == 0.0));
        assert!(same, "{}: skipping zero offsets changed the result", st.label);
    }
}

#[test]
fn offset_pruned_models_skip_pairs_and_match_the_full_computation() {
    use sparseconv::prune::prune_offsets;
    let ck = Checkpoint::load(&repo(MODEL)).expect("bundled model");
    let p = prune_offsets(&ck, ArchKind::MinkUNet, 0.4, Selection::Global, OffsetScope::Conv).expect("prune");
    let pruned = p.checkpoint();
    // The same weights with the removed offsets at 1e-30 instead of 0: nothing is skipped,
    // every pair is computed, and the result may differ only by those tiny products.
    let mut full_t = p.tensors.clone();
    for (name, keep) in &p.offsets {
        let t = full_t.get_mut(name).expect("kernel");
        let per = t.shape[1] * t.shape[2];
        for o in (0..t.shape[0]).filter(|o| !keep.contains(o)) {
            t.data[o * per..(o + 1) * per].fill(1e-30);
        }
    }
    let full = Checkpoint::from_tensors("<full>", full_t, HashMap::new());
    let (a, b) = (logits(&pruned, ArchKind::MinkUNet), logits(&full, ArchKind::MinkUNet));
    let err = rel_err(&a, &b);
    assert!(err < 1e-6, "offset-pruned vs fully computed logits: {err:e}");
    assert!(rel_err(&a, &logits(&ck, ArchKind::MinkUNet)) > 1e-3, "pruning removed nothing that mattered");
    // The metadata lists what was kept, and a list that contradicts the tensors is refused.
    let key = p.metadata.keys().find(|k| k.starts_with("kept_offsets.")).expect("a listed conv").clone();
    let mut meta = p.metadata.clone();
    meta.insert(key.clone(), "0".into());
    let bad = Checkpoint::from_tensors("lying.safetensors", p.tensors.clone(), meta);
    let e = NetDesc::from_checkpoint(ArchKind::MinkUNet, &bad, 19).expect_err("refused").to_string();
    assert!(e.contains(&key) && e.contains("not zero"), "{e}");
}

#[test]
fn offset_pruned_models_build_maps_for_the_offsets_they_use_with_the_same_bits() {
    use sparseconv::prune::prune_offsets;
    let ck = Checkpoint::load(&repo(MODEL)).expect("bundled model");
    // Per-layer pruning at 60%: several maps lose offsets every conv on them dropped.
    let p = prune_offsets(&ck, ArchKind::MinkUNet, 0.6, Selection::Local, OffsetScope::Conv).expect("prune");
    let pruned = p.checkpoint();
    let desc = NetDesc::from_checkpoint(ArchKind::MinkUNet, &pruned, 19).expect("desc");
    let shared = MinkUNet::from_desc(&pruned, &desc).expect("load");
    let mut whole = shared.clone();
    whole.full_maps();
    let mut m = shared.clone();
    let restricted = m.convs_mut().iter().filter(|c| c.map_offsets.is_some()).count();
    assert!(restricted > 0, "no map lost an offset");
    let x = real_scan().tensor;
    let run = |m: &MinkUNet| {
        let e = Engine::new(Device::Cpu, MapBuilder::Sort, Grouping::Heuristic);
        m.forward(&e, &x).expect("forward")
    };
    let (a, b) = (run(&shared), run(&whole));
    assert_eq!(a.len(), b.len(), "logit count");
    assert!(same_bits(&a, &b), "kept-offset maps changed the logits");
    // Each map holds exactly the union of its convs' offsets.
    let maps = desc.conv_maps();
    let convs = m.convs_mut();
    for (i, c) in convs.iter().enumerate() {
        let Some(keep) = &c.map_offsets else { continue };
        let union: Vec<bool> = (0..keep.len())
            .map(|o| convs.iter().zip(&maps).any(|(d, mk)| *mk == maps[i] && !d.weight.zero_offsets()[o]))
            .collect();
        assert_eq!(&keep[..], &union[..], "conv {i}: map offsets are not the union of its map's convs");
    }
}
