//! Misuse through the public API gets an `Error`, not a crash or an out-of-bounds write:
//! kernel maps cannot be edited from outside (their fields are private), a plan built for
//! another map or with too few padded rows is refused before a kernel sizes a buffer from it,
//! and GPU buffer views never reach past their storage.

mod common;

use common::*;
use sparseconv::cpu::conv::conv_forward;
use sparseconv::plan::{Group, GroupingParams, Plan};
use sparseconv::{Engine, KernelSpec};

#[test]
fn plans_that_do_not_fit_their_map_are_refused() {
    let x = random_tensor(3, 1, 12, 1, 0.3, 8);
    let e = Engine::default();
    let map = e.kernel_map(x.coord_set(), KernelSpec::new(3, 1, 1).expect("spec")).expect("map");
    let w = vec![0.01f32; 27 * 8 * 8];
    let good = Plan::grouped(&map, GroupingParams { tolerance: 1.0, max_rows: usize::MAX });
    assert!(good.groups.iter().any(|g| g.offsets.len() > 1), "a grouped plan to corrupt");
    assert!(conv_forward(&map, &good, x.feats(), 8, &w, 8, None).is_ok());
    // Too few padded rows: the grouped kernel would write past its buffer.
    let mut short = good.clone();
    for g in short.groups.iter_mut().filter(|g| g.offsets.len() > 1) {
        g.padded_rows = 1;
    }
    let err = conv_forward(&map, &short, x.feats(), 8, &w, 8, None).unwrap_err().to_string();
    assert!(err.contains("pads to 1"), "{err}");
    // An offset the map does not have, and one listed twice.
    let mut far = good.clone();
    far.groups.push(Group { offsets: vec![27], padded_rows: 0 });
    assert!(conv_forward(&map, &far, x.feats(), 8, &w, 8, None).is_err());
    let mut twice = good.clone();
    let k = twice.groups[0].offsets[0];
    twice.groups.push(Group { offsets: vec![k], padded_rows: map.size(k) });
    assert!(conv_forward(&map, &twice, x.feats(), 8, &w, 8, None).is_err());
    // A 2×2×2 map's plan on a 3×3×3 map runs only the offsets it names (a valid subset), and
    // the 3×3×3 plan on the 2×2×2 map is refused.
    let down = e.kernel_map(x.coord_set(), KernelSpec::new(2, 2, 1).expect("spec")).expect("map");
    let w8 = vec![0.01f32; 8 * 8 * 8];
    let xd = vec![0.5f32; down.n_in() * 8];
    assert!(conv_forward(&down, &good, &xd, 8, &w8, 8, None).is_err());
}

#[test]
fn gpu_buffer_views_stay_inside_their_storage() {
    let Ok(gpu) = sparseconv::Device::gpu() else {
        eprintln!("SKIPPED gpu_buffer_views_stay_inside_their_storage: no GPU adapter");
        return;
    };
    let sparseconv::Device::Gpu(ctx) = gpu else { unreachable!("Device::gpu returns a GPU") };
    let a = ctx.scratch::<u32>("view", 100).expect("buffer");
    assert!(a.cast::<f32>(usize::MAX / 2).is_none(), "a view past the storage is refused");
    let b = ctx.scratch::<u32>("view", 100).expect("buffer");
    assert_eq!(b.cast::<f32>(50).map(|v| v.len()), Some(50));
}

/// Features "on a device" whose copy back always fails, as on a lost GPU.
#[derive(Debug)]
struct Lost(usize);

impl sparseconv::tensor::DeviceFeatures for Lost {
    fn len(&self) -> usize {
        self.0
    }
    fn to_host(&self) -> sparseconv::Result<Vec<f32>> {
        Err(sparseconv::Error::invalid("device", "lost"))
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[test]
fn a_lost_device_is_an_error_on_every_user_path() {
    let x = random_tensor(5, 1, 10, 1, 0.3, 4);
    let lost = sparseconv::SparseTensor::from_device(x.coord_set().clone(), Box::new(Lost(x.len() * 4)), 4)
        .expect("device tensor");
    let err = lost.try_feats().unwrap_err().to_string();
    assert!(err.contains("lost"), "{err}");
    // A conv on the CPU reads the features through the fallible path.
    let w = sparseconv::ConvWeight::new(vec![0.1; 27 * 4 * 2], 27, 4, 2, None).expect("weights");
    let e = Engine::default();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        e.conv(&lost, &w, KernelSpec::new(3, 1, 1).expect("spec")).map(|_| ())
    }));
    assert!(matches!(r, Ok(Err(_))), "an error, not a panic or a result");
    // A host map is always fetched.
    let map = e.kernel_map(x.coord_set(), KernelSpec::new(3, 1, 1).expect("spec")).expect("map");
    assert!(map.fetch().is_ok());
}
