//! `sparseconv conv`: one sparse convolution on safetensors files.

use sparseconv::io::tensors::{write, OutTensor, TensorFile};
use sparseconv::{ConvWeight, Engine, Error, KernelSpec, Result};
use std::path::Path;
use std::time::Instant;

pub(crate) fn read_weight(path: &Path, spec: KernelSpec, cin: usize) -> Result<ConvWeight> {
    let f = TensorFile::open(path)?;
    let k = f.f32("kernel", 3)?;
    let vol = spec.volume();
    if k.shape[0] != vol || k.shape[1] != cin {
        return Err(Error::format(
            path,
            format!(
                "tensor `kernel` has shape {:?}, expected [{vol}, {cin}, Cout] for kernel size {} and {cin} input channels",
                k.shape, spec.size
            ),
        ));
    }
    let cout = k.shape[2];
    let bias = if f.contains("bias") {
        let b = f.f32("bias", 1)?;
        if b.shape[0] != cout {
            return Err(Error::format(path, format!("tensor `bias` has shape {:?}, expected [{cout}]", b.shape)));
        }
        Some(b.data)
    } else {
        None
    };
    if let Some(i) = k.data.iter().position(|v| !v.is_finite()) {
        return Err(Error::format(path, format!("tensor `kernel` has a NaN or infinite value at index {i}")));
    }
    ConvWeight::new(k.data, vol, cin, cout, bias).map_err(|e| e.in_file(path))
}

pub(crate) fn cmd_conv(
    input: &Path,
    weight: &Path,
    k: u32,
    s: u32,
    d: u32,
    engine: Engine,
    output: &Path,
) -> Result<()> {
    let spec = KernelSpec::new(k, s, d)?;
    let x = sparseconv::io::tensors::read_voxels(input)?;
    let w = read_weight(weight, spec, x.channels())?;
    let t0 = Instant::now();
    let y = engine.conv(&x, &w, spec)?;
    let dt = t0.elapsed().as_secs_f64();
    let coords: Vec<i32> = y.coords().iter().flatten().copied().collect();
    write(
        output,
        vec![
            ("coords", OutTensor::I32(&coords, vec![y.len(), 4])),
            ("feats", OutTensor::F32(y.feats(), vec![y.len(), y.channels()])),
        ],
        None,
    )?;
    eprintln!(
        "conv k{k} s{s} d{d}: {} x {} -> {} x {} in {:.2} ms; wrote {}",
        x.len(),
        x.channels(),
        y.len(),
        y.channels(),
        dt * 1e3,
        output.display()
    );
    Ok(())
}
