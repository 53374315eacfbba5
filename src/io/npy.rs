//! NumPy `.npy` arrays (float and integer), via the `npyz` crate.

use std::path::Path;

use npyz::{NpyFile, Order, TypeChar, WriterBuilder};

use super::read_file;
use crate::error::{Error, Result};
use crate::voxel::PointCloud;

/// The values of an `.npy` array, by element type.
#[derive(Debug, Clone, PartialEq)]
pub enum NpyValues {
    /// `<f4`
    F32(Vec<f32>),
    /// `<f8`
    F64(Vec<f64>),
    /// `<i4` (and smaller signed ints, widened)
    I32(Vec<i32>),
    /// `<i8`
    I64(Vec<i64>),
    /// `<u4` (and smaller unsigned ints, widened)
    U32(Vec<u32>),
}

/// A C-order `.npy` array.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// Shape.
    pub shape: Vec<usize>,
    /// Values in C order.
    pub values: NpyValues,
}

impl NpyArray {
    /// Values as f32 (integers converted exactly where they fit).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.values {
            NpyValues::F32(v) => v.clone(),
            NpyValues::F64(v) => v.iter().map(|&x| x as f32).collect(),
            NpyValues::I32(v) => v.iter().map(|&x| x as f32).collect(),
            NpyValues::I64(v) => v.iter().map(|&x| x as f32).collect(),
            NpyValues::U32(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }
    /// Values as i64, or `None` for float arrays.
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        match &self.values {
            NpyValues::I32(v) => Some(v.iter().map(|&x| x as i64).collect()),
            NpyValues::I64(v) => Some(v.clone()),
            NpyValues::U32(v) => Some(v.iter().map(|&x| x as i64).collect()),
            _ => None,
        }
    }
}

/// Check the header's `'shape': (…)` before the parser sizes anything from it: every
/// dimension a number and their product representable (npyz multiplies them unchecked).
/// The header length the preamble states must fit in the file: npyz allocates it before
/// reading (the fuzz test flipped the version byte to 3, whose 4-byte length then read as
/// 663 MB).
fn check_header_len(bytes: &[u8]) -> std::result::Result<(), String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a valid .npy file: no \\x93NUMPY preamble".into());
    }
    let (at, len) = match bytes[6] {
        1 => (10, u64::from(u16::from_le_bytes([bytes[8], bytes[9]]))),
        2 | 3 if bytes.len() >= 12 => (12, u64::from(u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]))),
        v => return Err(format!("not a valid .npy file: unsupported version {v}")),
    };
    if at + len > bytes.len() as u64 {
        return Err(format!("not a valid .npy file: a header of {len} bytes in a file of {}", bytes.len()));
    }
    Ok(())
}

fn check_shape_text(bytes: &[u8]) -> std::result::Result<(), String> {
    let head = &bytes[..bytes.len().min(65_536 + 12)];
    let text = String::from_utf8_lossy(head);
    let Some(at) = text.find("'shape'") else { return Ok(()) };
    let rest = &text[at..];
    let (Some(open), Some(close)) = (rest.find('('), rest.find(')')) else { return Ok(()) };
    if close < open {
        return Ok(());
    }
    let mut n: u64 = 1;
    for d in rest[open + 1..close].split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let d: u64 = d.trim_end_matches('L').parse().map_err(|_| format!("shape dimension `{d}` is not a count"))?;
        n = n.checked_mul(d).ok_or_else(|| format!("shape {} is too large", &rest[open..=close]))?;
    }
    Ok(())
}

/// Read an `.npy` file.
pub fn read_npy(path: &Path) -> Result<NpyArray> {
    let bytes = read_file(path)?;
    let bad = |m: String| Error::format(path, m);
    check_header_len(&bytes).map_err(bad)?;
    check_shape_text(&bytes).map_err(bad)?;
    let npy = NpyFile::new(&bytes[..]).map_err(|e| bad(format!("not a valid .npy file: {e}")))?;
    if npy.order() == Order::Fortran {
        return Err(bad("Fortran-ordered arrays are not supported (save with np.ascontiguousarray)".into()));
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let ts = match npy.dtype() {
        npyz::DType::Plain(ts) => ts,
        other => return Err(bad(format!("unsupported dtype {}", other.descr()))),
    };
    let size = ts.size_field();
    // The header's shape must fit in the file before anything is sized from it: a corrupt
    // shape would otherwise overflow the element count or reserve memory the data lacks.
    let need = npy
        .shape()
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .and_then(|n| n.checked_mul(size as u64))
        .ok_or_else(|| bad(format!("shape {:?} is too large", npy.shape())))?;
    if need > bytes.len() as u64 {
        return Err(bad(format!("shape {:?} needs {need} bytes of data, the file has {}", npy.shape(), bytes.len())));
    }
    let read_err = |e: std::io::Error| Error::format(path, format!("truncated or corrupt data: {e}"));
    let values = match (ts.type_char(), size) {
        (TypeChar::Float, 4) => NpyValues::F32(npy.into_vec::<f32>().map_err(read_err)?),
        (TypeChar::Float, 8) => NpyValues::F64(npy.into_vec::<f64>().map_err(read_err)?),
        (TypeChar::Int, 8) => NpyValues::I64(npy.into_vec::<i64>().map_err(read_err)?),
        (TypeChar::Int, 4) => NpyValues::I32(npy.into_vec::<i32>().map_err(read_err)?),
        (TypeChar::Int, 2) => {
            NpyValues::I32(npy.into_vec::<i16>().map_err(read_err)?.into_iter().map(i32::from).collect())
        }
        (TypeChar::Int, 1) => {
            NpyValues::I32(npy.into_vec::<i8>().map_err(read_err)?.into_iter().map(i32::from).collect())
        }
        (TypeChar::Uint, 4) => NpyValues::U32(npy.into_vec::<u32>().map_err(read_err)?),
        (TypeChar::Uint, 2) => {
            NpyValues::U32(npy.into_vec::<u16>().map_err(read_err)?.into_iter().map(u32::from).collect())
        }
        (TypeChar::Uint, 1) => {
            NpyValues::U32(npy.into_vec::<u8>().map_err(read_err)?.into_iter().map(u32::from).collect())
        }
        _ => return Err(bad(format!("unsupported dtype {ts}"))),
    };
    let n = match &values {
        NpyValues::F32(v) => v.len(),
        NpyValues::F64(v) => v.len(),
        NpyValues::I32(v) => v.len(),
        NpyValues::I64(v) => v.len(),
        NpyValues::U32(v) => v.len(),
    };
    if n != shape.iter().product::<usize>() {
        return Err(bad(format!("shape {shape:?} does not match {n} values")));
    }
    Ok(NpyArray { shape, values })
}

/// Read an `[N, D]` (D >= 3) float array as a point cloud.
pub fn read_points(path: &Path) -> Result<PointCloud> {
    let a = read_npy(path)?;
    if a.shape.len() != 2 || a.shape[1] < 3 {
        return Err(Error::format(path, format!("expected points of shape [N, D>=3], got {:?}", a.shape)));
    }
    if a.to_i64().is_some() {
        return Err(Error::format(path, "expected a float array of points, got integers"));
    }
    PointCloud::new(a.to_f32(), a.shape[1]).map_err(|e| e.in_file(path))
}

/// Write an f32 or i32 array (for tests and tools).
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    let mut buf = Vec::new();
    {
        let mut w = npyz::WriteOptions::<f32>::new()
            .default_dtype()
            .shape(&shape.iter().map(|&d| d as u64).collect::<Vec<_>>())
            .writer(&mut buf)
            .begin_nd()
            .map_err(|e| Error::io(path, e))?;
        w.extend(data.iter().copied()).map_err(|e| Error::io(path, e))?;
        w.finish().map_err(|e| Error::io(path, e))?;
    }
    std::fs::write(path, buf).map_err(|e| Error::io(path, e))
}
