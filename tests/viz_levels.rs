//! The network's levels as the rerun recording shows them, read off the engine's layer trace:
//! on the real scan each level is the brute-force downsampling of the scan's voxels, and under
//! a voxel plan the per-voxel computed counts add up to the kept rows of every pruned conv.
//! The levels' majority classes against a naive count.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use sparseconv::pipeline::{self, Model};
use sparseconv::viz::{levels, majority_labels};
use sparseconv::voxel_prune::VoxelPlan;
use sparseconv::{CoordSet, Engine};

fn parents(coords: &[[i32; 4]], s: i32) -> BTreeSet<[i32; 4]> {
    coords.iter().map(|c| [c[0], c[1].div_euclid(s) * s, c[2].div_euclid(s) * s, c[3].div_euclid(s) * s]).collect()
}

#[test]
fn levels_of_the_real_scan_are_its_downsamplings() {
    let p = pipeline::prepare_file(&repo(SCAN), None, pipeline::VoxelizeMode::Mean).expect("scan");
    let (model, _) = Model::load(&repo("data/models/minkunet_cr0.5.safetensors"), None, None).expect("model");
    let e = Engine::default();
    e.start_trace();
    model.forward(&e, &p.voxels).expect("forward");
    let lv = levels(&e.take_trace());
    assert_eq!(lv.iter().map(|l| l.stride).collect::<Vec<_>>(), vec![1, 2, 4, 8, 16]);
    for l in &lv {
        let got: BTreeSet<[i32; 4]> = l.coords.coords().iter().copied().collect();
        assert_eq!(got, parents(p.voxels.coords(), l.stride), "stride {}", l.stride);
        assert!(l.convs >= 2, "stride {}: {} convs", l.stride, l.convs);
        assert_eq!(l.pruned_convs, 0);
        assert!(l.computed.iter().all(|&c| c == 0));
    }

    // Half of every block conv's outputs: each pruned conv computed n - floor(n/2) voxels.
    let mut pruned = model.clone();
    let plan = VoxelPlan::uniform(model.desc().block_convs().iter().map(|c| c.kernel.as_str()), 0.5).expect("plan");
    pruned.set_voxel_plan(&plan).expect("plan");
    e.start_trace();
    pruned.forward(&e, &p.voxels).expect("pruned forward");
    let lv = levels(&e.take_trace());
    assert_eq!(lv.len(), 5);
    for l in &lv {
        let n = l.coords.len();
        assert!(l.pruned_convs >= 2, "stride {}: {} pruned convs", l.stride, l.pruned_convs);
        let total: usize = l.computed.iter().map(|&c| c as usize).sum();
        assert_eq!(total, l.pruned_convs * (n - n / 2), "stride {}", l.stride);
        assert!(l.computed.iter().all(|&c| c as usize <= l.pruned_convs));
        assert!(l.computed.iter().any(|&c| c > 0), "stride {}: nothing computed", l.stride);
        assert!(l.computed.iter().any(|&c| (c as usize) < l.pruned_convs), "stride {}: nothing pruned", l.stride);
    }
}

#[test]
fn majority_labels_match_a_naive_count() {
    let fine_coords = random_coords(11, 2, 12, 1, 0.3);
    let labels: Vec<u32> = (0..fine_coords.len()).map(|i| ((i * 7 + i / 3) % 5) as u32).collect();
    let fine = CoordSet::new(fine_coords.clone(), 1).expect("fine");
    for s in [2, 4] {
        // A level missing a few parents (as after pruned downsampling) gets labels for the rest.
        let lvl: Vec<[i32; 4]> =
            parents(&fine_coords, s).into_iter().enumerate().filter(|(i, _)| i % 5 != 0).map(|(_, c)| c).collect();
        let level = CoordSet::new(lvl.clone(), s).expect("level");
        let got = majority_labels(&fine, &labels, &level, 5).expect("labels");
        for (c, g) in lvl.iter().zip(&got) {
            let mut h = BTreeMap::new();
            for (f, &l) in fine_coords.iter().zip(&labels) {
                if parents(&[*f], s).contains(c) {
                    *h.entry(l).or_insert(0) += 1;
                }
            }
            let best = h.iter().fold((0u32, 0), |b, (&l, &n)| if n > b.1 { (l, n) } else { b });
            assert_eq!(*g, best.0, "stride {s} voxel {c:?}: counts {h:?}");
        }
    }
    assert!(majority_labels(&fine, &labels[1..], &fine, 5).is_err());
}
