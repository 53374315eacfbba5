//! Fine-grained weight sparsity by magnitude: unstructured elements, 1×16 blocks (by each
//! block's L1), or N:M along `Cin` (the N largest of every M consecutive input channels of each
//! output channel). Zeroed weights get a `mask.*` tensor so training holds them at zero, and
//! each pruned conv a `format.*` metadata entry so loading keeps its kernel in that sparse
//! format for the CPU sparse kernels (`cpu::sparse`).

use std::collections::{BTreeMap, HashMap};

use super::channel::Selection;
use crate::error::{Error, Result};
use crate::io::tensors::Tensor;
use crate::nn::arch::NetDesc;
use crate::nn::checkpoint::SPARSE_FORMAT;
use crate::sparse_weights::{lowest, prune_nm, units, Format, Unit, BLOCK};

/// Named tensors.
pub type Tensors = BTreeMap<String, Tensor<f32>>;

/// What [`prune`] did.
#[derive(Debug, Clone, Default)]
pub struct SparsityReport {
    /// Convs pruned, with their zero fraction afterwards.
    pub pruned: Vec<(String, f64)>,
    /// Convs left dense, with the reason.
    pub skipped: Vec<(String, String)>,
}

/// Zero `sparsity` of the weights of every conv the format fits (for N:M, `sparsity` is
/// implied: 1 − N/M), add masks, and name the format in the metadata.
pub fn prune(
    desc: &NetDesc,
    tensors: &Tensors,
    format: Format,
    sparsity: f64,
    selection: Selection,
) -> Result<(Tensors, HashMap<String, String>, SparsityReport)> {
    if !(0.0..1.0).contains(&sparsity) {
        return Err(Error::invalid("--ratio", format!("must be in [0, 1), got {sparsity}")));
    }
    let mut out = tensors.clone();
    let mut meta = HashMap::new();
    let mut report = SparsityReport::default();
    // The convs the format fits, with their units' scores.
    let mut layers: Vec<(String, Vec<Unit>)> = Vec::new();
    for c in desc.convs() {
        let why = match format {
            Format::Block if !c.cout.is_multiple_of(BLOCK) => {
                Some(format!("Cout = {} is not a multiple of 16", c.cout))
            }
            Format::NM(n, m) if !c.cin.is_multiple_of(m as usize) => {
                // An N:M pattern is chosen for the whole network: one that does not fit a layer
                // is the user's mistake, not a layer to skip quietly.
                return Err(Error::invalid(
                    "--nm",
                    format!("{n}:{m}: M = {m} does not divide Cin = {} of `{}`", c.cin, c.kernel),
                ));
            }
            _ => None,
        };
        if let Some(why) = why {
            report.skipped.push((c.kernel.clone(), why));
            continue;
        }
        let t = tensors.get(&c.kernel).ok_or_else(|| Error::tensor(c.kernel.as_str(), "missing from the model"))?;
        match format {
            Format::NM(n, m) => {
                let t = out.get_mut(&c.kernel).ok_or_else(|| Error::tensor(c.kernel.as_str(), "missing"))?;
                prune_nm(&mut t.data, c.cin, c.cout, n as usize, m as usize);
            }
            _ => layers.push((c.kernel.clone(), units(&t.data, c.cin, c.cout, format))),
        }
    }
    let cut: Vec<usize> = match selection {
        Selection::Local => layers.iter().map(|(_, u)| ((u.len() as f64) * sparsity).round() as usize).collect(),
        Selection::Global => {
            // One threshold over scores divided by their layer's mean.
            let mut all: Vec<(f64, usize)> = Vec::new();
            for (l, (_, u)) in layers.iter().enumerate() {
                let mean = u.iter().map(|x| x.0).sum::<f64>() / u.len().max(1) as f64;
                all.extend(u.iter().map(|x| (if mean > 0.0 { x.0 / mean } else { x.0 }, l)));
            }
            all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let mut cut = vec![0usize; layers.len()];
            for &(_, l) in &all[..((all.len() as f64) * sparsity).floor() as usize] {
                cut[l] += 1;
            }
            cut
        }
    };
    for ((name, u), n) in layers.iter().zip(cut) {
        let t = out.get_mut(name).ok_or_else(|| Error::tensor(name.as_str(), "missing"))?;
        let scores: Vec<f64> = u.iter().map(|x| x.0).collect();
        for i in lowest(&scores, n) {
            for &e in &u[i].1 {
                t.data[e] = 0.0;
            }
        }
    }
    // Masks, formats and the report for every conv the format fits.
    for c in desc.convs() {
        if report.skipped.iter().any(|(n, _)| n == &c.kernel) {
            continue;
        }
        let t = &out[&c.kernel];
        let zeros = t.data.iter().filter(|&&v| v == 0.0).count();
        let mut mask: Vec<f32> = t.data.iter().map(|&v| f32::from(u8::from(v != 0.0))).collect();
        if let Some(old) = out.get(&format!("mask.{}", c.kernel)).filter(|m| m.data.len() == mask.len()) {
            mask.iter_mut().zip(&old.data).for_each(|(m, &o)| *m *= o);
        }
        let shape = t.shape.clone();
        report.pruned.push((c.kernel.clone(), zeros as f64 / t.data.len().max(1) as f64));
        out.insert(format!("mask.{}", c.kernel), Tensor { shape, data: mask });
        meta.insert(format!("{SPARSE_FORMAT}{}", c.kernel), format.name());
    }
    Ok((out, meta, report))
}

/// Zero `sparsity` of one conv's weights in `format` by magnitude (N:M: its own pattern), hold
/// them with a `mask.*` tensor, and return the metadata entry naming the format.
pub fn prune_one(
    tensors: &mut Tensors,
    kernel: &str,
    cin: usize,
    cout: usize,
    format: Format,
    sparsity: f64,
) -> Result<(String, String)> {
    if !(0.0..1.0).contains(&sparsity) {
        return Err(Error::invalid("sparsity", format!("must be in [0, 1), got {sparsity}")));
    }
    let t = tensors.get_mut(kernel).ok_or_else(|| Error::tensor(kernel, "missing from the model"))?;
    crate::sparse_weights::prune_kernel(&mut t.data, cin, cout, format, sparsity);
    let shape = t.shape.clone();
    let mut mask: Vec<f32> = t.data.iter().map(|&v| f32::from(u8::from(v != 0.0))).collect();
    if let Some(old) = tensors.get(&format!("mask.{kernel}")).filter(|m| m.data.len() == mask.len()) {
        mask.iter_mut().zip(&old.data).for_each(|(m, &o)| *m *= o);
    }
    tensors.insert(format!("mask.{kernel}"), Tensor { shape, data: mask });
    Ok((format!("{SPARSE_FORMAT}{kernel}"), format.name()))
}
