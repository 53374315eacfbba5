//! Kernel-offset (pattern) pruning: remove whole offsets of a conv — all `Cin × Cout` weights
//! of offset `k` — by the L1 magnitude of their slices, per layer or with one global threshold
//! over per-layer-normalized magnitudes. A removed offset's slice is zeroed and a `mask.*`
//! tensor holds it at zero in training; the CPU conv never gathers or multiplies the pairs of an
//! all-zero offset (`ConvWeight::zero_offsets`), so the layer's work shrinks by the pairs those
//! offsets had on the scan, not by their count (on LiDAR scans the centre and the six face
//! offsets carry most pairs).

use std::collections::{BTreeMap, HashMap};

use super::channel::Selection;
use crate::error::{Error, Result};
use crate::io::tensors::Tensor;
use crate::nn::arch::NetDesc;

pub use crate::nn::checkpoint::KEPT_OFFSETS;

/// Offsets kept per conv with more than one offset, by kernel tensor name.
pub type OffsetPlan = BTreeMap<String, Vec<usize>>;

/// Named tensors.
pub type Tensors = BTreeMap<String, Tensor<f32>>;

/// L1 magnitude of each offset's `[Cin, Cout]` slice.
fn slice_l1(t: &Tensor<f32>) -> Vec<f64> {
    let per = t.shape[1..].iter().product::<usize>().max(1);
    t.data.chunks(per).map(|c| c.iter().map(|v| v.abs() as f64).sum()).collect()
}

/// The `kept` offsets of kernel `t` (`[K, ...]`) with the largest L1 slices, ascending.
pub fn largest(t: &Tensor<f32>, kept: usize) -> Vec<usize> {
    let m = slice_l1(t);
    let mut idx: Vec<usize> = (0..m.len()).collect();
    idx.sort_by(|&a, &b| m[b].total_cmp(&m[a]).then(a.cmp(&b)));
    idx.truncate(kept.max(1));
    idx.sort_unstable();
    idx
}

/// Which convs lose the same offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OffsetScope {
    /// Each conv its own offsets.
    #[default]
    Conv,
    /// Every conv on one kernel map ([`NetDesc::conv_maps`]) the same offsets, ranked by the
    /// sum of their per-layer-normalized L1: the map itself then loses those offsets, so they
    /// are neither searched for nor stored (`MinkUNet::share_map_offsets`). Convs pruned each
    /// on their own rarely agree, and their maps stay almost whole.
    Map,
}

/// Choose the offsets each conv keeps: `ratio` of them removed (at least one kept), the
/// smallest by L1 first; `Global` ranks all offsets of all convs by L1 over their layer's mean.
/// With [`OffsetScope::Map`] the units ranked are the maps' offsets, not the convs'.
pub fn select(
    desc: &NetDesc,
    tensors: &BTreeMap<String, Tensor<f32>>,
    ratio: f64,
    selection: Selection,
    scope: OffsetScope,
) -> Result<OffsetPlan> {
    if !(0.0..1.0).contains(&ratio) {
        return Err(Error::invalid("--ratio", format!("must be in [0, 1), got {ratio}")));
    }
    // Units ranked: one per conv, or one per map; each lists its convs.
    let mut mags: Vec<(Vec<String>, Vec<f64>)> = Vec::new();
    let mut unit_of: Vec<(i32, crate::kmap::KernelSpec)> = Vec::new();
    for (c, key) in desc.convs().into_iter().zip(desc.conv_maps()).filter(|(c, _)| c.spec.volume() > 1) {
        let t = tensors.get(&c.kernel).ok_or_else(|| Error::tensor(c.kernel.as_str(), "missing from the model"))?;
        let m = slice_l1(t);
        match scope {
            OffsetScope::Conv => mags.push((vec![c.kernel.clone()], m)),
            OffsetScope::Map => {
                let mean = m.iter().sum::<f64>() / m.len().max(1) as f64;
                let norm: Vec<f64> = m.iter().map(|&v| if mean > 0.0 { v / mean } else { v }).collect();
                match unit_of.iter().position(|k| *k == key) {
                    Some(u) if mags[u].1.len() == norm.len() => {
                        mags[u].0.push(c.kernel.clone());
                        mags[u].1.iter_mut().zip(&norm).for_each(|(a, b)| *a += b);
                    }
                    _ => {
                        unit_of.push(key);
                        mags.push((vec![c.kernel.clone()], norm));
                    }
                }
            }
        }
    }
    let rank = |m: &[f64], n: usize| -> Vec<usize> {
        let mut idx: Vec<usize> = (0..m.len()).collect();
        idx.sort_by(|&a, &b| m[b].total_cmp(&m[a]).then(a.cmp(&b)));
        idx.truncate(n.max(1));
        idx.sort_unstable();
        idx
    };
    let mut plan = OffsetPlan::new();
    match selection {
        Selection::Local => {
            for (names, m) in &mags {
                let keep = m.len() - ((m.len() as f64) * ratio).round() as usize;
                for name in names {
                    plan.insert(name.clone(), rank(m, keep));
                }
            }
        }
        Selection::Global => {
            let mut all: Vec<(f64, usize)> = Vec::new();
            for (l, (_, m)) in mags.iter().enumerate() {
                let mean = m.iter().sum::<f64>() / m.len() as f64;
                all.extend(m.iter().map(|&v| (if mean > 0.0 { v / mean } else { v }, l)));
            }
            all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let mut removed = vec![0usize; mags.len()];
            for &(_, l) in &all[..((all.len() as f64) * ratio).floor() as usize] {
                removed[l] += 1;
            }
            for (l, (names, m)) in mags.iter().enumerate() {
                for name in names {
                    plan.insert(name.clone(), rank(m, m.len() - removed[l]));
                }
            }
        }
    }
    Ok(plan)
}

/// Zero the removed offsets, add a `mask.{kernel}` tensor for each pruned conv (so training
/// holds them at zero), and return the metadata entries listing the kept offsets.
pub fn apply(plan: &OffsetPlan, tensors: &BTreeMap<String, Tensor<f32>>) -> Result<(Tensors, HashMap<String, String>)> {
    let mut out = tensors.clone();
    let mut meta = HashMap::new();
    for (name, keep) in plan {
        let t = out.get_mut(name).ok_or_else(|| Error::tensor(name.as_str(), "missing from the model"))?;
        let k = t.shape[0];
        if keep.len() == k {
            continue;
        }
        let per = t.shape[1..].iter().product::<usize>();
        let mut mask = vec![1f32; t.data.len()];
        for o in (0..k).filter(|o| keep.binary_search(o).is_err()) {
            t.data[o * per..(o + 1) * per].fill(0.0);
            mask[o * per..(o + 1) * per].fill(0.0);
        }
        let shape = t.shape.clone();
        // A training checkpoint's own mask (element sparsity) stays in force as well.
        if let Some(old) = tensors.get(&format!("mask.{name}")).filter(|m| m.data.len() == mask.len()) {
            mask.iter_mut().zip(&old.data).for_each(|(m, &o)| *m *= o);
        }
        out.insert(format!("mask.{name}"), Tensor { shape, data: mask });
        meta.insert(format!("{KEPT_OFFSETS}{name}"), keep.iter().map(|o| o.to_string()).collect::<Vec<_>>().join(","));
    }
    Ok((out, meta))
}
