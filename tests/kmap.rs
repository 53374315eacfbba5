//! Kernel maps: both builders against brute force, against each other (random clouds and the
//! real scan), transposed maps, caching, and range errors.

mod common;

use std::sync::Arc;

use common::*;
use sparseconv::cpu::build_map;
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
    assert_eq!(a.out_coords.coords(), b.out_coords.coords(), "{what}: output coords");
    assert_eq!(a.starts(), b.starts(), "{what}: per-offset sizes");
    assert_eq!(a.in_idx(), b.in_idx(), "{what}: input rows");
    assert_eq!(a.out_idx(), b.out_idx(), "{what}: output rows");
    assert_eq!(a.identity, b.identity, "{what}: identity");
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
                assert_eq!(map.out_coords.coords(), &outs[..], "{label}: output coords in key order");
                assert_eq!(pairs_of(&map), want, "{label}: pairs");
                assert_eq!(map.kind, if s == 1 { MapKind::Submanifold } else { MapKind::Down }, "{label}");
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
    assert_eq!(map.identity, Some(13));
    for k in 0..27 {
        let m = map.mirror[k].expect("odd kernels are symmetric");
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
    assert!(Arc::ptr_eq(&d1.out_coords, &d2.out_coords), "downsampled coords are shared");
    let up = e.transposed_map(&d1.out_coords, x.coord_set(), down).expect("up");
    assert_eq!(up.kind, MapKind::Up);
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
