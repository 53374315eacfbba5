//! Kernel maps: both builders against brute force, against each other (random clouds and the
//! real scan), transposed maps, caching, and range errors.

mod common;

use std::sync::Arc;

use common::*;
use sparseconv::cpu::{build_map, build_map_keeping};
use sparseconv::reference::{brute_force_map, downsampled_coords};
use sparseconv::{CoordSet, Engine, KernelMap, KernelSpec, MapBuilder, MapKind};

fn pairs_of(map: &KernelMap) -> Vec<Vec<(u32, u32)>> {
    (0..map.volume())
        .map(|k| {
            let (i, o) = map.pairs(k);
            let v: Vec<(u32, u32)> = i.iter().copied().zip(o.iter().copied()).collect();
            // Canonical form: sorted by output row.
            assert!(v.windows(2).all(|w| w[0].1 < w[1].1), "offset {k}: pairs not sorted by output");
            let mut v = v;
            v.sort_unstable();
            v
        })
        .collect()
}

fn assert_same_map(a: &KernelMap, b: &KernelMap, what: &str) {
    assert_eq!(a.out_coords().coords(), b.out_coords().coords(), "{what}: output coords");
    assert_eq!(a.starts(), b.starts(), "{what}: per-offset sizes");
    assert_eq!(a.in_idx(), b.in_idx(), "{what}: input rows");
    assert_eq!(a.out_idx(), b.out_idx(), "{what}: output rows");
    assert_eq!(a.identity(), b.identity(), "{what}: identity");
}

#[test]
fn builders_match_brute_force() {
    let specs =
        [(1, 1, 1), (2, 1, 1), (3, 1, 1), (3, 1, 2), (5, 1, 1), (2, 2, 1), (3, 2, 1), (3, 2, 2), (5, 2, 1), (2, 3, 1)];
    for ts in [1, 2] {
        for (si, &(k, s, d)) in specs.iter().enumerate() {
            let x = random_tensor(10 + si as u64, 2, 7 * ts, ts, 0.25, 1);
            let spec = KernelSpec::new(k, s, d).expect("spec");
            let outs = if s == 1 { x.coords().to_vec() } else { downsampled_coords(x.coords(), ts * s as i32) };
            let want = brute_force_map(x.coords(), &outs, spec, ts, 1);
            let mut built = Vec::new();
            for builder in [MapBuilder::Hash, MapBuilder::Sort] {
                let label = format!("{builder:?} k{k} s{s} d{d} ts{ts}");
                let map = build_map(builder, x.coord_set(), spec).expect("map");
                assert_eq!(map.out_coords().coords(), &outs[..], "{label}: output coords in key order");
                assert_eq!(pairs_of(&map), want, "{label}: pairs");
                assert_eq!(map.kind(), if s == 1 { MapKind::Submanifold } else { MapKind::Down }, "{label}");
                built.push(map);
            }
            assert_same_map(&built[0], &built[1], &format!("hash vs sort k{k} s{s} d{d} ts{ts}"));
            // The transposed map is the upsampling map: input at q - δ.
            let up = built[0].transposed();
            let want_up = brute_force_map(&outs, x.coords(), spec, ts, -1);
            assert_eq!(pairs_of(&up), want_up, "transposed k{k} s{s} d{d} ts{ts}");
        }
    }
}

#[test]
fn symmetric_offsets_have_equal_sizes_and_transposed_pairs() {
    let x = random_tensor(77, 1, 8, 1, 0.3, 1);
    let map = build_map(MapBuilder::Sort, x.coord_set(), KernelSpec::new(3, 1, 1).expect("spec")).expect("map");
    assert_eq!(map.identity(), Some(13));
    for k in 0..27 {
        let m = map.mirror()[k].expect("odd kernels are symmetric");
        assert_eq!(m, 26 - k);
        let fwd: Vec<(u32, u32)> = pairs_of(&map)[k].clone();
        let mut back: Vec<(u32, u32)> = pairs_of(&map)[m].iter().map(|&(i, o)| (o, i)).collect();
        back.sort_unstable();
        assert_eq!(fwd, back, "map(-δ) is the transpose of map(δ)");
    }
    let order = map.canonical_order();
    assert_eq!(&order[..5], &[13, 0, 26, 1, 25]);
}

#[test]
fn real_scan_maps_agree() {
    let vox = real_scan();
    let n = vox.tensor.len();
    assert!((85_000..95_000).contains(&n), "about 91k voxels at 5 cm, got {n}");
    for (k, s) in [(3, 1), (2, 2), (3, 2)] {
        let spec = KernelSpec::new(k, s, 1).expect("spec");
        let h = build_map(MapBuilder::Hash, vox.tensor.coord_set(), spec).expect("hash");
        let so = build_map(MapBuilder::Sort, vox.tensor.coord_set(), spec).expect("sort");
        assert_same_map(&h, &so, &format!("real scan k{k} s{s}"));
        if (k, s) == (3, 1) {
            let want = brute_force_map(vox.tensor.coords(), vox.tensor.coords(), spec, 1, 1);
            assert_eq!(pairs_of(&h), want, "real scan k3 submanifold vs brute force");
            // Real LiDAR surfaces: most voxels have several neighbours, far fewer than 27.
            let avg = h.total_pairs() as f64 / n as f64;
            assert!(avg > 3.0 && avg < 27.0, "avg neighbours {avg}");
        }
    }
}

#[test]
fn engine_caches_maps_per_coordinate_set() {
    let x = random_tensor(3, 1, 6, 1, 0.4, 2);
    let e = Engine::default();
    let spec = KernelSpec::new(3, 1, 1).expect("spec");
    let a = e.kernel_map(x.coord_set(), spec).expect("map");
    let b = e.kernel_map(x.coord_set(), spec).expect("map");
    assert!(Arc::ptr_eq(&a, &b), "same coords + spec: one build");
    let c = e.kernel_map(x.coord_set(), KernelSpec::new(3, 1, 2).expect("spec")).expect("map");
    assert!(!Arc::ptr_eq(&a, &c), "dilation is part of the key");
    let down = KernelSpec::new(2, 2, 1).expect("spec");
    let d1 = e.kernel_map(x.coord_set(), down).expect("down");
    let d2 = e.kernel_map(x.coord_set(), down).expect("down");
    assert!(Arc::ptr_eq(d1.out_coords(), d2.out_coords()), "downsampled coords are shared");
    let up = e.transposed_map(d1.out_coords(), x.coord_set(), down).expect("up");
    assert_eq!(up.kind(), MapKind::Up);
    assert_eq!(e.cached_maps(), 4);
    // A same-valued but separately built coordinate set is another key.
    let y = CoordSet::new(x.coords().to_vec(), 1).expect("coords");
    e.kernel_map(&Arc::new(y), spec).expect("map");
    assert_eq!(e.cached_maps(), 5);
}

#[test]
fn coordinates_outside_the_key_range_are_errors() {
    assert!(CoordSet::new(vec![[0, 1 << 17, 0, 0]], 1).is_err());
    assert!(CoordSet::new(vec![[200, 0, 0, 0]], 1).is_err());
    // Offsets that would overflow the key fields.
    let x = Arc::new(CoordSet::new(vec![[0, 0, 0, 0]], 1 << 12).expect("coords"));
    let spec = KernelSpec::new(15, 1, 1 << 10).expect("spec");
    for b in [MapBuilder::Hash, MapBuilder::Sort] {
        let e = build_map(b, &x, spec).expect_err("offsets too large");
        assert!(e.to_string().contains("coordinate range"), "{e}");
    }
    // The extreme corners that do fit still map correctly.
    let lim = sparseconv::coords::COORD_LIMIT;
    let c = vec![[0, -lim, -lim, -lim], [0, -lim + 1, -lim, -lim], [0, lim - 1, lim - 1, lim - 1]];
    let x = Arc::new(CoordSet::new(c.clone(), 1).expect("coords"));
    let spec = KernelSpec::new(3, 1, 1).expect("spec");
    let want = brute_force_map(&c, &c, spec, 1, 1);
    for b in [MapBuilder::Hash, MapBuilder::Sort] {
        assert_eq!(pairs_of(&build_map(b, &x, spec).expect("map")), want, "{b:?} at the range edges");
    }
}

#[test]
fn maps_built_for_kept_offsets_hold_exactly_their_pairs() {
    for (si, &(k, st)) in [(3u32, 1u32), (2, 2), (3, 2), (5, 1)].iter().enumerate() {
        let x = random_tensor(40 + si as u64, 2, 9, 1, 0.3, 1);
        let spec = KernelSpec::new(k, st, 1).expect("spec");
        let outs = if st == 1 { x.coords().to_vec() } else { downsampled_coords(x.coords(), st as i32) };
        let all = brute_force_map(x.coords(), &outs, spec, 1, 1);
        let kv = spec.volume();
        // Dropping: every third offset; the centre alone; one of each mirror pair; nothing.
        let masks: Vec<Vec<bool>> = vec![
            (0..kv).map(|o| o % 3 != 0).collect(),
            (0..kv).map(|o| o == kv / 2).collect(),
            (0..kv).map(|o| o < kv / 2).collect(),
            vec![true; kv],
        ];
        for keep in &masks {
            let want: Vec<Vec<(u32, u32)>> =
                all.iter().zip(keep).map(|(p, &kept)| if kept { p.clone() } else { Vec::new() }).collect();
            let full = build_map(MapBuilder::Hash, x.coord_set(), spec).expect("map");
            for builder in [MapBuilder::Hash, MapBuilder::Sort] {
                let label = format!("{builder:?} k{k} s{st} keep {keep:?}");
                let map = build_map_keeping(builder, x.coord_set(), spec, Some(keep)).expect("map");
                assert_eq!(pairs_of(&map), want, "{label}: pairs");
                assert_eq!(map.kept_offsets().is_some(), keep.iter().any(|&b| !b), "{label}: recorded mask");
                assert_same_map(&map, &full.keeping(keep).expect("keeping"), &label);
                // The transpose keeps the same offsets.
                assert_eq!(map.transposed().kept_offsets(), map.kept_offsets(), "{label}: transposed");
            }
        }
        let e = build_map_keeping(MapBuilder::Sort, x.coord_set(), spec, Some(&[true; 2])).expect_err("wrong length");
        assert!(e.to_string().contains("flags for a kernel of"), "{e}");
    }
}

#[test]
fn the_engine_caches_kept_offset_maps_apart_and_refuses_weights_they_drop() {
    use sparseconv::ConvWeight;
    let x = random_tensor(7, 2, 12, 1, 0.3, 4);
    let spec = KernelSpec::new(3, 1, 1).expect("spec");
    let e = Engine::new(sparseconv::Device::Cpu, MapBuilder::Sort, sparseconv::Grouping::Off);
    let mut keep = vec![true; 27];
    keep[0] = false;
    let full = e.kernel_map(x.coord_set(), spec).expect("full");
    let part = e.kernel_map_keeping(x.coord_set(), spec, Some(&keep)).expect("kept");
    assert_eq!(e.cached_maps(), 2, "one map per set of kept offsets");
    assert!(full.size(0) > 0 && part.size(0) == 0, "offset 0 dropped only in the kept map");
    assert!(Arc::ptr_eq(&full, &e.kernel_map_keeping(x.coord_set(), spec, Some(&[true; 27])).expect("all")));
    // Weights that use the dropped offset are refused on that map, allowed once zero there.
    let mut w = ConvWeight::new(vec![0.5; 27 * 4 * 4], 27, 4, 4, None).expect("weight");
    let err = e.conv_with_map(&part, &x, &w).expect_err("uses a dropped offset").to_string();
    assert!(err.contains("without offset 0"), "{err}");
    w.kernel_mut()[..16].fill(0.0);
    let a = e.conv_with_map(&part, &x, &w).expect("kept map");
    let b = e.conv_with_map(&full, &x, &w).expect("full map");
    assert_eq!(a.feats(), b.feats(), "dropping an all-zero offset's pairs changes nothing");
}
