//! GPU kernels against the CPU: kernel maps equal exactly, convs within 1e-4 relative
//! (max |gpu − cpu| / max |cpu|), bit-identical from run to run; random clouds with negative
//! coordinates and the real scan. Without an adapter the tests say loudly that they skipped,
//! and fail when `CI=true` (CI installs lavapipe so an adapter exists).

mod common;

use std::sync::{Arc, OnceLock};

use common::*;
use sparseconv::bench::pseudo_random;
use sparseconv::cpu::{build_map, build_map_keeping};
use sparseconv::gpu::conv::{conv_forward, conv_forward_planned, Precision, WeightStationary};
use sparseconv::gpu::{kmap, GpuContext};
use sparseconv::{Engine, GroupingParams, KernelMap, KernelSpec, MapBuilder, Plan};

fn gpu() -> Option<&'static GpuContext> {
    static CTX: OnceLock<Option<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| match GpuContext::new() {
        Ok(c) => {
            eprintln!("GPU tests on {}", c.describe());
            Some(c)
        }
        Err(e) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true but no GPU adapter: {e}");
            }
            eprintln!("\n*** SKIPPED: GPU tests need an adapter: {e} ***\n");
            None
        }
    })
    .as_ref()
}

/// A shared context for the entry points that keep it (lazily fetched pairs).
fn arc_ctx() -> &'static Arc<GpuContext> {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| Arc::new(GpuContext::new().expect("an adapter (checked by gpu())")))
}

/// A crop of the real scan, negative y included (lavapipe runs whole networks slowly).
fn scan_crop() -> sparseconv::SparseTensor {
    let vox = real_scan().tensor;
    let (mut coords, mut feats) = (Vec::new(), Vec::new());
    for (i, c) in vox.coords().iter().enumerate() {
        if (60..130).contains(&c[1]) && (-60..40).contains(&c[2]) {
            coords.push(*c);
            feats.extend_from_slice(&vox.feats()[i * 4..(i + 1) * 4]);
        }
    }
    sparseconv::SparseTensor::from_parts(coords, feats, 4).expect("the crop is a valid tensor")
}

fn same_map(label: &str, a: &KernelMap, b: &KernelMap) {
    assert_eq!(a.offsets(), b.offsets(), "{label}: offsets");
    assert_eq!(a.out_coords().coords(), b.out_coords().coords(), "{label}: output coordinates");
    for k in 0..a.volume() {
        assert_eq!(a.pairs(k), b.pairs(k), "{label}: offset {k}");
    }
}

#[test]
fn gpu_kernel_maps_equal_cpu_maps() {
    let Some(ctx) = gpu() else { return };
    let real = real_scan().tensor;
    let cases = [
        ("random k3 sub", random_tensor(1, 2, 20, 1, 0.2, 1), KernelSpec::new(3, 1, 1).unwrap()),
        ("random k2 s2 down", random_tensor(2, 2, 20, 1, 0.2, 1), KernelSpec::new(2, 2, 1).unwrap()),
        ("random k3 s2 down", random_tensor(3, 1, 15, 1, 0.3, 1), KernelSpec::new(3, 2, 1).unwrap()),
        ("random k3 dilation 2", random_tensor(4, 1, 15, 1, 0.3, 1), KernelSpec::new(3, 1, 2).unwrap()),
        ("random stride-2 k2 s2 down", random_tensor(6, 2, 24, 2, 0.3, 1), KernelSpec::new(2, 2, 1).unwrap()),
        ("real scan k3 sub", real.clone(), KernelSpec::new(3, 1, 1).unwrap()),
        ("real scan k2 s2 down", real, KernelSpec::new(2, 2, 1).unwrap()),
    ];
    for (label, x, spec) in cases {
        let cpu = build_map(MapBuilder::Hash, x.coord_set(), spec).unwrap();
        let g = kmap::build(ctx, x.coord_set(), spec).unwrap();
        same_map(&format!("{label} (gpu hash)"), &g, &cpu);
        let actx = arc_ctx();
        let (g, tables) = kmap::build_sorted_with_tables(actx, x.coord_set(), spec, None).unwrap();
        assert!(!g.pairs_fetched(), "{label}: the pairs should wait on the device");
        same_map(&format!("{label} (gpu sort)"), &g, &cpu);
        // The conv's table, sorted by bitmask on the device, equals the host's stable sort.
        let t = tables.expect("the table fits one binding");
        let want = sparseconv::gpu::conv::SortedNeighbours::new(&cpu).unwrap();
        assert_eq!(actx.read(&t.nbr).unwrap(), want.nbr, "{label}: sorted neighbour rows");
        assert_eq!(actx.read(&t.out_rows).unwrap(), want.out_rows, "{label}: output rows");
        if spec.stride > 1 {
            let up = cpu.transposed();
            let tt = t.transposed(actx, up.volume(), up.n_out()).unwrap();
            let want = sparseconv::gpu::conv::SortedNeighbours::new(&up).unwrap();
            assert_eq!(actx.read(&tt.nbr).unwrap(), want.nbr, "{label}: transposed sorted rows");
            assert_eq!(actx.read(&tt.out_rows).unwrap(), want.out_rows, "{label}: transposed output rows");
        }
        assert!(cpu.total_pairs() > 0, "{label}: empty map");
        // Built for some offsets only (offset-pruned networks): the CPU's restricted map.
        let keep: Vec<bool> = (0..cpu.volume()).map(|k| k % 3 != 1).collect();
        let want = build_map_keeping(MapBuilder::Sort, x.coord_set(), spec, Some(&keep)).unwrap();
        let (g, t) = kmap::build_with_tables(actx, x.coord_set(), spec, Some(&keep)).unwrap();
        same_map(&format!("{label} (gpu hash, kept offsets)"), &g, &want);
        assert_eq!(g.kept_offsets(), Some(&keep[..]), "{label}");
        let t = t.expect("the table fits one binding");
        let nbr = actx.read(&t.nbr).unwrap();
        let sorted = sparseconv::gpu::conv::SortedNeighbours::new(&want).unwrap();
        assert_eq!(nbr, sorted.nbr, "{label}: kept-offset table");
        let (g, _) = kmap::build_sorted_with_tables(actx, x.coord_set(), spec, Some(&keep)).unwrap();
        same_map(&format!("{label} (gpu sort, kept offsets)"), &g, &want);
    }
}

/// 64-bit keys from a few values, so runs of equal keys test stability.
fn dup_keys(n: usize, seed: u64) -> Vec<u64> {
    pseudo_random(n, seed, 1.0)
        .iter()
        .map(|&r| ((r * 1000.0) as i64 as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .collect()
}

#[test]
fn gpu_radix_sort_and_scan_match_cpu() {
    use sparseconv::gpu::sort::{exclusive_scan, sort_pairs, KeyValues};
    let Some(ctx) = gpu() else { return };
    // One block, several blocks, and enough blocks that the scans recurse twice.
    for n in [0usize, 1, 700, 5000, 1_200_000] {
        let keys = dup_keys(n, n as u64 + 7);
        let hi: Vec<u32> = keys.iter().map(|k| (k >> 32) as u32).collect();
        let lo: Vec<u32> = keys.iter().map(|&k| k as u32).collect();
        let val: Vec<u32> = (0..n as u32).collect();
        let input = KeyValues {
            hi: ctx.to_device("hi", &hi).unwrap(),
            lo: ctx.to_device("lo", &lo).unwrap(),
            val: ctx.to_device("val", &val).unwrap(),
        };
        let varying = keys.iter().fold(0u64, |a, &k| a | (k ^ keys.first().copied().unwrap_or(0)));
        let mut enc = ctx.encoder();
        let sorted = sort_pairs(ctx, &mut enc, &input, varying).unwrap();
        let counts: Vec<u32> = (0..n as u32).map(|i| i % 7).collect();
        let scanned = ctx.to_device("counts", &counts).unwrap();
        exclusive_scan(ctx, &mut enc, scanned.raw(), n).unwrap();
        ctx.submit(enc);
        let (h, l, v) = (ctx.read(&sorted.hi).unwrap(), ctx.read(&sorted.lo).unwrap(), ctx.read(&sorted.val).unwrap());
        let mut want: Vec<(u64, u32)> = keys.iter().copied().zip(0..).collect();
        want.sort_by_key(|e| e.0); // stable
        let got: Vec<(u64, u32)> =
            h.iter().zip(&l).zip(&v).map(|((&h, &l), &v)| ((u64::from(h) << 32) | u64::from(l), v)).collect();
        assert!(got == want, "n = {n}: radix sort differs from a stable CPU sort");
        let want_scan: Vec<u32> = counts
            .iter()
            .scan(0u32, |acc, &c| {
                let start = *acc;
                *acc += c;
                Some(start)
            })
            .collect();
        assert_eq!(ctx.read(&scanned).unwrap(), want_scan, "n = {n}: exclusive scan");
    }
}

#[test]
fn gpu_conv_matches_cpu_and_repeats_bit_for_bit() {
    let Some(ctx) = gpu() else { return };
    let e = Engine::default();
    let real = real_scan().tensor;
    // (label, input coords, spec, transposed, cin, cout, bias, residual, relu)
    type Case = (&'static str, sparseconv::SparseTensor, KernelSpec, bool, usize, usize, bool, bool, bool);
    let cases: Vec<Case> = vec![
        (
            "random k3 4->16",
            random_tensor(5, 2, 18, 1, 0.25, 1),
            KernelSpec::new(3, 1, 1).unwrap(),
            false,
            4,
            16,
            true,
            false,
            true,
        ),
        (
            "random k2s2 down 24->40",
            random_tensor(6, 2, 18, 1, 0.25, 1),
            KernelSpec::new(2, 2, 1).unwrap(),
            false,
            24,
            40,
            false,
            false,
            false,
        ),
        (
            "random k2s2 up 40->24",
            random_tensor(7, 2, 18, 1, 0.25, 1),
            KernelSpec::new(2, 2, 1).unwrap(),
            true,
            40,
            24,
            true,
            true,
            true,
        ),
        (
            "random k1 70->33",
            random_tensor(8, 1, 12, 1, 0.3, 1),
            KernelSpec::new(1, 1, 1).unwrap(),
            false,
            70,
            33,
            false,
            true,
            false,
        ),
        ("real scan k3 32->32", real, KernelSpec::new(3, 1, 1).unwrap(), false, 32, 32, true, true, true),
    ];
    for (ci, (label, base, spec, transposed, cin, cout, bias, residual, relu)) in cases.into_iter().enumerate() {
        let map: Arc<KernelMap> = if transposed {
            let down = e.kernel_map(base.coord_set(), spec).unwrap();
            e.transposed_map(down.out_coords(), base.coord_set(), spec).unwrap()
        } else {
            e.kernel_map(base.coord_set(), spec).unwrap()
        };
        let x = pseudo_random(map.n_in() * cin, 10 + ci as u64, 1.0);
        let w = pseudo_random(spec.volume() * cin * cout, 20 + ci as u64, 0.3);
        let b = bias.then(|| pseudo_random(cout, 30, 0.5));
        let r = residual.then(|| pseudo_random(map.n_out() * cout, 40, 1.0));
        let epi = sparseconv::cpu::conv::Epilogue { bias: b.as_deref(), residual: r.as_deref(), relu, pruned: None };
        let cpu = sparseconv::cpu::conv::conv_forward_ex(&map, &Plan::ungrouped(&map), &x, cin, &w, cout, epi).unwrap();
        let plans = [
            ("output-stationary", Plan::output_tiled(&map)),
            ("weight-stationary ungrouped", Plan::ungrouped(&map)),
            ("weight-stationary grouped", Plan::grouped(&map, GroupingParams { tolerance: 0.6, max_rows: 1 << 20 })),
        ];
        for (pname, plan) in &plans {
            let label = format!("{label} {pname}");
            let run = |p| conv_forward_planned(ctx, &map, plan, &x, cin, &w, cout, b.as_deref(), r.as_deref(), relu, p);
            let g1 = run(Precision::F32).unwrap();
            let err = rel_err(&g1, &cpu);
            assert!(err < 1e-4, "{label}: relative error {err:e}");
            let g2 = run(Precision::F32).unwrap();
            assert!(same_bits(&g1, &g2), "{label}: second run differs");
            let h = run(Precision::F16).unwrap();
            let err = rel_err(&h, &cpu);
            assert!(err < 5e-3, "{label} f16: relative error {err:e} over the stated bound 5e-3");
            assert!(err > 0.0, "{label} f16: identical to f32, so the f16 path did not run");
        }
        // The plain entry point is the output-stationary kernel.
        let g = conv_forward(ctx, &map, &x, cin, &w, cout, b.as_deref(), r.as_deref(), relu, Precision::F32).unwrap();
        assert!(rel_err(&g, &cpu) < 1e-4, "{label}: conv_forward");
    }
}

#[test]
fn minkunet_on_gpu_matches_cpu() {
    use sparseconv::nn::checkpoint::Checkpoint;
    use sparseconv::pipeline::Model;
    use sparseconv::{Device, Grouping};
    let Some(_) = gpu() else { return };
    let x = scan_crop();
    let model = Model::load_arch("minkunet", &Checkpoint::random(3), 0.5, 19).unwrap();
    let cpu = model.forward(&Engine::default(), &x).unwrap();
    let dev = Device::gpu().unwrap();
    let fixed = Grouping::Fixed(GroupingParams { tolerance: 0.6, max_rows: 1 << 20 });
    // Output-stationary (heuristic: narrow layers) and weight-stationary layers, both map builders.
    for (label, builder, grouping) in [
        ("gpu/hash/heuristic", MapBuilder::Hash, Grouping::Heuristic),
        ("gpu/sort/ungrouped", MapBuilder::Sort, Grouping::Off),
        ("gpu/sort/grouped", MapBuilder::Sort, fixed),
    ] {
        let g = model.forward(&Engine::new(dev.clone(), builder, grouping), &x).unwrap();
        let err = rel_err(&g, &cpu);
        assert!(err < 1e-3, "{label}: MinkUNet logits on the GPU: relative error {err:e}");
    }
    // Maps used only by output-stationary layers never bring their pairs to the host.
    let e = Engine::new(dev.clone(), MapBuilder::Hash, Grouping::OutputTiled);
    model.forward(&e, &x).unwrap();
    let m = e.kernel_map(x.coord_set(), KernelSpec::new(3, 1, 1).unwrap()).unwrap();
    assert!(!m.pairs_fetched(), "the stem's map fetched its pairs");
    assert_eq!(m.in_idx(), build_map(MapBuilder::Hash, x.coord_set(), m.spec()).unwrap().in_idx(), "fetched later");
    // Features stay on the device between layers; f16 storage converts them there.
    let e = Engine::new(dev.clone(), MapBuilder::Hash, Grouping::Auto).with_precision(Precision::F16);
    let g = model.forward(&e, &x).unwrap();
    let err = rel_err(&g, &cpu);
    assert!(err > 0.0 && err < 2e-2, "gpu/hash/auto f16: MinkUNet logits: relative error {err:e} (bound 2e-2)");
}

#[test]
fn work_larger_than_one_binding_is_split() {
    let Some(_) = gpu() else { return };
    let x = random_tensor(9, 2, 16, 1, 0.3, 1);
    let spec = KernelSpec::new(3, 1, 1).unwrap();
    let cpu_map = build_map(MapBuilder::Hash, x.coord_set(), spec).unwrap();
    // A fresh context that pretends to bind just enough for the coordinates and hash table
    // (which cannot be split) but not the features or the neighbour table.
    let limit = 32 * x.len() as u64;
    let ctx = GpuContext::new().unwrap().with_binding_limit(limit);
    let map = kmap::build(&ctx, x.coord_set(), spec).unwrap();
    same_map("split kernel map", &map, &cpu_map);
    same_map("split sorted kernel map", &kmap::build_sorted(&ctx, x.coord_set(), spec).unwrap(), &cpu_map);
    let (cin, cout) = (48, 24);
    let limit = limit as usize;
    assert!(map.n_in() * cin * 4 > limit && map.n_out() * 27 * 4 > limit, "the test must force splits");
    let xf = pseudo_random(map.n_in() * cin, 50, 1.0);
    let w = pseudo_random(27 * cin * cout, 51, 0.3);
    let b = pseudo_random(cout, 52, 0.5);
    let r = pseudo_random(map.n_out() * cout, 53, 1.0);
    let epi = sparseconv::cpu::conv::Epilogue { bias: Some(&b), residual: Some(&r), relu: true, pruned: None };
    let cpu = sparseconv::cpu::conv::conv_forward_ex(&map, &Plan::ungrouped(&map), &xf, cin, &w, cout, epi).unwrap();
    let g = conv_forward(&ctx, &map, &xf, cin, &w, cout, Some(&b), Some(&r), true, Precision::F32).unwrap();
    let err = rel_err(&g, &cpu);
    assert!(err < 1e-4, "split conv: relative error {err:e}");
    // Weight-stationary: inputs and outputs fit, the products of all offsets do not.
    let (cin, cout) = (8, 24);
    let ctx = GpuContext::new().unwrap().with_binding_limit(128 * map.n_in() as u64);
    let xf = pseudo_random(map.n_in() * cin, 54, 1.0);
    let w = pseudo_random(27 * cin * cout, 55, 0.3);
    let plan = Plan::ungrouped(&map);
    let ws = WeightStationary::prepare(&ctx, &map, &plan, cin, cout).unwrap().expect("inputs fit one binding");
    assert!(ws.chunk_count() > 1, "the test must force several chunks");
    let epi = sparseconv::cpu::conv::Epilogue { bias: Some(&b), residual: Some(&r), relu: true, pruned: None };
    let cpu = sparseconv::cpu::conv::conv_forward_ex(&map, &plan, &xf, cin, &w, cout, epi).unwrap();
    let g =
        conv_forward_planned(&ctx, &map, &plan, &xf, cin, &w, cout, Some(&b), Some(&r), true, Precision::F32).unwrap();
    let err = rel_err(&g, &cpu);
    assert!(err < 1e-4, "chunked weight-stationary conv: relative error {err:e}");
}

#[test]
fn scratch_buffers_return_to_the_pool() {
    let Some(ctx) = gpu() else { return };
    let a = ctx.scratch::<u32>("first", 3000).unwrap();
    let raw = a.raw().clone();
    let held = ctx.scratch::<u32>("held", 3000).unwrap();
    assert!(held.raw() != &raw, "a buffer in use is never handed out twice");
    drop(a.cast::<f32>(10));
    // Same size class (16 KiB): the dropped buffer comes back.
    let b = ctx.scratch::<f32>("second", 2500).unwrap();
    assert!(b.raw() == &raw, "the dropped scratch buffer was not reused");
    assert_eq!(b.len(), 2500);
}

#[test]
fn gpu_concat_and_half_packing_match_cpu() {
    use sparseconv::gpu::elementwise::{concat, pack_half};
    let Some(ctx) = gpu() else { return };
    let (n, ca, cb) = (1001, 5, 3);
    let a = pseudo_random(n * ca, 60, 2.0);
    let b = pseudo_random(n * cb, 61, 2.0);
    let y = concat(ctx, &ctx.to_device("a", &a).unwrap(), ca, &ctx.to_device("b", &b).unwrap(), cb).unwrap();
    let want = sparseconv::cpu::elementwise::concat(&a, ca, &b, cb);
    assert_eq!(ctx.read(&y).unwrap(), want, "concat");
    // An odd count: the last word pads with 0.
    let v = pseudo_random(2 * 777 + 1, 62, 100.0);
    let packed = ctx.read(&pack_half(ctx, &ctx.to_device("v", &v).unwrap()).unwrap()).unwrap();
    assert_eq!(packed.len(), 778);
    for (i, &x) in v.iter().enumerate() {
        let bits = (packed[i / 2] >> (16 * (i % 2))) as u16;
        let want = half::f16::from_f32(x).to_bits();
        assert!(bits.abs_diff(want) <= 1, "value {i} ({x}): f16 bits {bits:#x}, CPU rounds to {want:#x}");
    }
    assert_eq!(packed[777] >> 16, 0, "padding half");
}

#[test]
fn buffers_of_another_context_are_an_error_not_a_panic() {
    use sparseconv::gpu::elementwise::concat;
    let Some(ctx) = gpu() else { return };
    let other = GpuContext::new().unwrap();
    let a = other.to_device("a", &[1.0f32, 2.0]).unwrap();
    let b = ctx.to_device("b", &[3.0f32, 4.0]).unwrap();
    let err = concat(ctx, &a, 1, &b, 1).unwrap_err().to_string();
    assert!(err.contains("another GPU context"), "{err}");
    assert!(ctx.read(&a).unwrap_err().to_string().contains("another GPU context"));
    assert_eq!(other.read(&a).unwrap(), vec![1.0, 2.0]);
}

/// The GPU engine keeps a weight's device copy between calls, and an edit through
/// `kernel_mut`/`bias_mut` drops it: the next conv uses the new values.
#[test]
fn edited_weights_are_not_hidden_by_the_device_copy() {
    use sparseconv::{ConvWeight, Device, Grouping};
    let Some(_) = gpu() else { return };
    let x = random_tensor(21, 2, 12, 1, 0.3, 8);
    let spec = KernelSpec::new(3, 1, 1).unwrap();
    let mut w =
        ConvWeight::new(pseudo_random(27 * 8 * 16, 4, 0.3), 27, 8, 16, Some(pseudo_random(16, 5, 0.1))).unwrap();
    let gpu_engine = Engine::new(Device::gpu().unwrap(), MapBuilder::Hash, Grouping::Auto);
    let cpu_engine = Engine::default();
    for edit in 0..3 {
        let g = gpu_engine.conv(&x, &w, spec);
        let g = g.unwrap().feats().to_vec();
        let c = cpu_engine.conv(&x, &w, spec).unwrap().feats().to_vec();
        let err = rel_err(&g, &c);
        assert!(err < 1e-4, "after edit {edit}: GPU conv differs from the CPU by {err:e}");
        // Twice: the second call runs on the cached copy.
        let again = gpu_engine.conv(&x, &w, spec).unwrap().feats().to_vec();
        assert_eq!(again, g, "after edit {edit}: the cached weights gave other values");
        match edit {
            0 => w.kernel_mut().iter_mut().for_each(|v| *v *= -2.0),
            _ => w.bias_mut().expect("bias").iter_mut().for_each(|v| *v += 1.0),
        }
    }
}

#[test]
fn channel_and_offset_pruned_models_run_on_the_gpu() {
    use sparseconv::nn::arch::{ArchKind, NetDesc};
    use sparseconv::nn::checkpoint::Checkpoint;
    use sparseconv::pipeline::Model;
    use sparseconv::prune::channel::{ChannelOptions, Selection};
    use sparseconv::prune::importance::Criterion;
    use sparseconv::prune::prune_channels;
    use sparseconv::{Device, Grouping};
    let Some(_) = gpu() else { return };
    let x = scan_crop();
    for kind in [ArchKind::MinkUNet, ArchKind::Spvcnn] {
        let synth = Checkpoint::random(8);
        Model::from_desc(&synth, &NetDesc::uniform(kind, 0.5, 19).unwrap()).unwrap();
        let ck = Checkpoint::from_tensors("<synthetic>", synth.synthesized(), Default::default());
        // Round-to 1: widths like 13 and 37, the GPU kernels' odd-width paths.
        let o = ChannelOptions { ratio: 0.3, selection: Selection::Global, round_to: 1, min_width: 1 };
        let p = prune_channels(&ck, kind, Criterion::Random, &o, &[], 4).unwrap();
        let model = Model::from_desc(&p.checkpoint(), &p.after).unwrap();
        let cpu = model.forward(&Engine::default(), &x).unwrap();
        let e = Engine::new(Device::gpu().unwrap(), MapBuilder::Sort, Grouping::Heuristic);
        let err = rel_err(&model.forward(&e, &x).unwrap(), &cpu);
        assert!(err < 1e-3, "gpu/{}: pruned {} logits: relative error {err:e}", kind.name(), p.after.widths_summary());
        // Offset-pruned: the CPU skips the zero offsets' pairs, the GPU runs them with zeros.
        let p = sparseconv::prune::prune_offsets(
            &ck,
            kind,
            0.4,
            Selection::Local,
            sparseconv::prune::offset::OffsetScope::Map,
        )
        .unwrap();
        let model = Model::from_desc(&p.checkpoint(), &p.after).unwrap();
        let cpu = model.forward(&Engine::default(), &x).unwrap();
        let err = rel_err(&model.forward(&e, &x).unwrap(), &cpu);
        assert!(err < 1e-3, "gpu/{}: offset-pruned logits: relative error {err:e}", kind.name());
        // Weight-sparse formats run dense on the GPU (the CPU forced onto its sparse kernels).
        let p = sparseconv::prune::prune_sparse(
            &ck,
            kind,
            sparseconv::sparse_weights::Format::Block,
            0.8,
            Selection::Local,
        )
        .unwrap();
        let model = Model::from_desc(&p.checkpoint(), &p.after).unwrap();
        let cpu_e = Engine::default().with_sparse_mode(sparseconv::SparseMode::Always);
        let cpu = model.forward(&cpu_e, &x).unwrap();
        let err = rel_err(&model.forward(&e, &x).unwrap(), &cpu);
        assert!(err < 1e-3, "gpu/{}: block-sparse logits: relative error {err:e}", kind.name());
    }
}

/// Voxel pruning on the GPU: one pruned conv per fill and residual case against the CPU's
/// fast path on the same kept rows (pruned rows exactly, computed rows within tolerance); the
/// row sums behind the scores equal the CPU's bits; the bundled network pruned at R 0.5 on a
/// crop of the real scan agrees with the CPU and repeats bit for bit.
#[test]
fn voxel_pruning_on_gpu_matches_cpu() {
    use sparseconv::gpu::DeviceFeats;
    use sparseconv::nn::checkpoint::Checkpoint;
    use sparseconv::pipeline::Model;
    use sparseconv::voxel_prune::{importance, kept_rows, Fill, Score, VoxelPlan};
    use sparseconv::{ConvWeight, Device, Grouping, SparseTensor};
    let Some(_) = gpu() else { return };
    let dev = Device::gpu().unwrap();
    let ge = Engine::new(dev.clone(), MapBuilder::Hash, Grouping::Auto);
    let ce = Engine::default();
    let spec = KernelSpec::new(3, 1, 1).unwrap();
    for (cin, cout, with_res, fill) in [
        (8, 8, false, Fill::Input),
        (16, 16, true, Fill::Input),
        (16, 16, true, Fill::Zero),
        (8, 16, false, Fill::Zero),
        (8, 16, true, Fill::Zero),
    ] {
        let label = format!("{cin}->{cout} residual {with_res} fill {fill:?}");
        let x = random_tensor(7, 2, 10, 1, 0.3, cin);
        let res = with_res.then(|| {
            let f = pseudo_random(x.len() * cout, 9, 1.0);
            SparseTensor::new(x.coord_set().clone(), f, cout).unwrap()
        });
        let w =
            ConvWeight::new(pseudo_random(27 * cin * cout, 5, 0.3), 27, cin, cout, Some(pseudo_random(cout, 6, 0.1)))
                .unwrap();
        // Features on the device, as between layers of a network: scores come from row sums there.
        let Device::Gpu(ctx) = &dev else { unreachable!("Device::gpu() gave a GPU") };
        let buf = ctx.to_device("x", x.feats()).unwrap();
        let xg = SparseTensor::from_device(x.coord_set().clone(), Box::new(DeviceFeats::new(buf, ctx.clone())), cin)
            .unwrap();
        let xc = x.clone();
        let (sg, sc) = (ge.voxel_scores(&xg, Score::L1).unwrap(), importance(xc.feats(), cin, Score::L1));
        assert!(same_bits(&sg, &sc), "{label}: GPU L1 scores differ from the CPU's");
        let rows = kept_rows(&sc, |i| x.coords()[i][0], 0.5).unwrap();
        let g = ge.conv_voxel_pruned(&xg, spec, None, &w, res.as_ref(), true, &rows, fill, false).unwrap();
        let c = ce.conv_voxel_pruned(&xc, spec, None, &w, res.as_ref(), true, &rows, fill, false).unwrap();
        let err = rel_err(g.feats(), c.feats());
        assert!(err < 1e-4, "{label}: relative error {err:e}");
        let mut keep = vec![false; x.len()];
        rows.iter().for_each(|&r| keep[r as usize] = true);
        let pruned = |t: &[f32]| -> Vec<f32> {
            (0..x.len()).filter(|&q| !keep[q]).flat_map(|q| t[q * cout..(q + 1) * cout].to_vec()).collect()
        };
        assert!(same_bits(&pruned(g.feats()), &pruned(c.feats())), "{label}: pruned rows' fill differs");
    }
    // Maps restricted to different kept rows of one coordinate set (the route for work over one
    // binding) share the coordinates' ids: the GPU must not reuse one's tables for the other.
    let x = random_tensor(8, 1, 10, 1, 0.3, 8);
    let w = ConvWeight::new(pseudo_random(27 * 64, 3, 0.3), 27, 8, 8, None).unwrap();
    let map = ce.kernel_map(x.coord_set(), spec).unwrap();
    for parity in [0, 1] {
        let keep: Vec<bool> = (0..x.len()).map(|q| q % 2 == parity).collect();
        let sub = map.for_outputs(&keep).unwrap();
        let g = ge.conv_fused(&sub, &x, &w, None, false).unwrap();
        let c = ce.conv_fused(&sub, &x, &w, None, false).unwrap();
        let err = rel_err(g.feats(), c.feats());
        assert!(err < 1e-4, "restricted map, rows of parity {parity}: relative error {err:e}");
    }
    // The network on a crop of the real scan (lavapipe is slow), R 0.5 on every block conv and
    // the first two downsamplings.
    let x = scan_crop();
    let ck = Checkpoint::load(&repo("data/models/minkunet_cr0.5.safetensors")).unwrap();
    let base = Model::from_checkpoint(&ck, None, None).unwrap().0;
    for fill in [Fill::Zero, Fill::Input] {
        let mut plan = VoxelPlan::uniform(base.desc().block_convs().iter().map(|c| c.kernel.as_str()), 0.5).unwrap();
        for st in &base.desc().stages[..2] {
            plan.ratios.insert(st.resample.kernel.clone(), 0.5);
        }
        plan.fill = fill;
        let mut m = base.clone();
        m.set_voxel_plan(&plan).unwrap();
        let cpu = m.forward(&ce, &x).unwrap();
        let e = Engine::new(dev.clone(), MapBuilder::Hash, Grouping::Auto);
        e.start_trace();
        let a = m.forward(&e, &x).unwrap();
        let trace = e.take_trace();
        let kept = trace.iter().filter(|t| t.plan.contains("kept rows")).count();
        assert_eq!(kept, 32, "fill {fill:?}: {kept} convs ran the GPU's kept-row table, not the 32 block convs");
        let b = m.forward(&Engine::new(dev.clone(), MapBuilder::Hash, Grouping::Auto), &x).unwrap();
        assert!(same_bits(&a, &b), "fill {fill:?}: the pruned network on the GPU is not repeatable");
        let labels = |l: &[f32]| -> Vec<usize> {
            l.chunks(19)
                .map(|r| r.iter().enumerate().fold(0, |best, (j, &v)| if v > r[best] { j } else { best }))
                .collect()
        };
        let (lg, lc) = (labels(&a), labels(&cpu));
        let agree = lg.iter().zip(&lc).filter(|(a, b)| a == b).count() as f64 / lc.len() as f64;
        let err = rel_err(&a, &cpu);
        eprintln!("voxel-pruned network, fill {fill:?}: GPU against CPU {err:e} relative, labels agree {agree:.5}");
        assert!(agree > 0.999 && err < 1e-3, "fill {fill:?}: labels agree {agree}, relative error {err:e}");
    }
}
