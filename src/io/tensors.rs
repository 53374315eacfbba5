//! safetensors files: named f32 / i32 tensors with shape checks, and writing them back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::read_file;
use crate::error::{Error, Result};
use crate::tensor::{CoordSet, SparseTensor};

/// A tensor read from a file: shape plus values.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor<T> {
    /// Shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<T>,
}

/// The tensors of a safetensors file, read and validated on demand.
pub struct TensorFile {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl TensorFile {
    /// Read a file and check its header.
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = read_file(path)?;
        SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::format(path, format!("not a valid safetensors file: {e}")))?;
        Ok(Self { path: path.to_path_buf(), bytes })
    }

    fn st(&self) -> SafeTensors<'_> {
        // Checked in `open`.
        SafeTensors::deserialize(&self.bytes).unwrap_or_else(|_| unreachable!("validated in open"))
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self.st().names().into_iter().map(String::from).collect();
        n.sort();
        n
    }

    /// The file's `__metadata__`.
    pub fn metadata(&self) -> HashMap<String, String> {
        SafeTensors::read_metadata(&self.bytes).ok().and_then(|(_, m)| m.metadata().clone()).unwrap_or_default()
    }

    /// True when the file holds a tensor of that name.
    pub fn contains(&self, name: &str) -> bool {
        self.st().tensor(name).is_ok()
    }

    fn view(&self, name: &str, dtype: Dtype, rank: usize) -> Result<(Vec<usize>, Vec<u8>)> {
        let st = self.st();
        let t = st.tensor(name).map_err(|_| Error::format(&self.path, format!("missing tensor `{name}`")))?;
        if t.dtype() != dtype {
            return Err(Error::format(
                &self.path,
                format!("tensor `{name}` has dtype {:?}, expected {dtype:?}", t.dtype()),
            ));
        }
        if t.shape().len() != rank {
            return Err(Error::format(
                &self.path,
                format!("tensor `{name}` has shape {:?}, expected {rank} dimensions", t.shape()),
            ));
        }
        Ok((t.shape().to_vec(), t.data().to_vec()))
    }

    /// An f32 tensor of the given rank.
    pub fn f32(&self, name: &str, rank: usize) -> Result<Tensor<f32>> {
        let (shape, bytes) = self.view(name, Dtype::F32, rank)?;
        Ok(Tensor { shape, data: super::le_f32(&bytes) })
    }

    /// A float tensor of any rank, stored as F32, F16 or BF16, converted to f32.
    pub fn float_any(&self, name: &str) -> Result<Tensor<f32>> {
        let st = self.st();
        let t = st.tensor(name).map_err(|_| Error::format(&self.path, format!("missing tensor `{name}`")))?;
        let b = t.data();
        let data: Vec<f32> = match t.dtype() {
            Dtype::F32 => super::le_f32(b),
            Dtype::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => {
                return Err(Error::format(
                    &self.path,
                    format!("tensor `{name}` has dtype {other:?}, expected a float type"),
                ))
            }
        };
        Ok(Tensor { shape: t.shape().to_vec(), data })
    }

    /// Dtype name of a tensor (for messages).
    pub fn dtype(&self, name: &str) -> Option<String> {
        self.st().tensor(name).ok().map(|t| format!("{:?}", t.dtype()))
    }

    /// An i32 tensor of the given rank.
    pub fn i32(&self, name: &str, rank: usize) -> Result<Tensor<i32>> {
        let (shape, bytes) = self.view(name, Dtype::I32, rank)?;
        Ok(Tensor {
            shape,
            data: bytes.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        })
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// True when `path` names a safetensors file (voxelized input rather than a point cloud).
pub fn is_safetensors(path: &Path) -> bool {
    path.to_string_lossy().to_ascii_lowercase().ends_with(".safetensors")
}

/// Voxels from a safetensors file: `coords` (I32 `[N, 4]`: batch, x, y, z) and `feats`
/// (F32 `[N, C]`), validated (shapes, finite features, unique in-range coordinates).
pub fn read_voxels(path: &Path) -> Result<SparseTensor> {
    let f = TensorFile::open(path)?;
    let coords = f.i32("coords", 2)?;
    let feats = f.f32("feats", 2)?;
    if coords.shape[1] != 4 {
        return Err(Error::format(path, format!("tensor `coords` has shape {:?}, expected [N, 4]", coords.shape)));
    }
    if feats.shape[0] != coords.shape[0] {
        return Err(Error::format(
            path,
            format!("`coords` has {} rows but `feats` has {}", coords.shape[0], feats.shape[0]),
        ));
    }
    if let Some(i) = feats.data.iter().position(|v| !v.is_finite()) {
        return Err(Error::format(path, format!("tensor `feats` has a NaN or infinite value at index {i}")));
    }
    let rows: Vec<[i32; 4]> = coords.data.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]).collect();
    let set = CoordSet::new(rows, 1).map_err(|e| e.in_file(path))?;
    SparseTensor::new(Arc::new(set), feats.data, feats.shape[1]).map_err(|e| e.in_file(path))
}

/// A tensor to write.
pub enum OutTensor<'a> {
    /// f32 values with a shape.
    F32(&'a [f32], Vec<usize>),
    /// f32 values stored as f16 (halves the file; for shipped weights).
    F16(&'a [f32], Vec<usize>),
    /// i32 values with a shape.
    I32(&'a [i32], Vec<usize>),
}

/// Write named tensors (and optional metadata) to a safetensors file.
pub fn write(
    path: &Path,
    tensors: Vec<(&str, OutTensor<'_>)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let bytes: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, t)| match t {
            OutTensor::F32(d, s) => (n.to_string(), Dtype::F32, s, d.iter().flat_map(|v| v.to_le_bytes()).collect()),
            OutTensor::I32(d, s) => (n.to_string(), Dtype::I32, s, d.iter().flat_map(|v| v.to_le_bytes()).collect()),
            OutTensor::F16(d, s) => {
                (n.to_string(), Dtype::F16, s, d.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect())
            }
        })
        .collect();
    let mut views = Vec::with_capacity(bytes.len());
    for (n, dt, s, b) in &bytes {
        let v = TensorView::new(*dt, s.clone(), b)
            .map_err(|e| Error::invalid("write safetensors", format!("tensor `{n}`: {e}")))?;
        views.push((n.clone(), v));
    }
    let out =
        safetensors::serialize(views, metadata).map_err(|e| Error::invalid("write safetensors", e.to_string()))?;
    std::fs::write(path, out).map_err(|e| Error::io(path, e))
}
