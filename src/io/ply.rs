//! PLY point clouds (ascii and binary little-endian) via `ply-rs-bw`, the maintained ply-rs fork.

use std::path::Path;

use ply_rs_bw::parser::Parser;
use ply_rs_bw::ply::{
    Addable, DefaultElement, ElementDef, Encoding, Ply, Property, PropertyDef, PropertyType, ScalarType,
};
use ply_rs_bw::writer::Writer;

use super::read_file;
use crate::error::{Error, Result};
use crate::voxel::PointCloud;

/// Names accepted for the fourth column (remission / intensity), in order of preference.
const INTENSITY: [&str; 4] = ["remission", "intensity", "reflectance", "scalar_intensity"];

fn scalar(p: &Property) -> Option<f64> {
    Some(match *p {
        Property::Char(v) => v as f64,
        Property::UChar(v) => v as f64,
        Property::Short(v) => v as f64,
        Property::UShort(v) => v as f64,
        Property::Int(v) => v as f64,
        Property::UInt(v) => v as f64,
        Property::Float(v) => v as f64,
        Property::Double(v) => v,
        _ => return None,
    })
}

/// Read the `vertex` element: x, y, z and, when present, remission/intensity as a fourth column.
pub fn read_ply(path: &Path) -> Result<PointCloud> {
    let bytes = read_file(path)?;
    let parser = Parser::<DefaultElement>::new();
    let ply = parser.read_ply(&mut &bytes[..]).map_err(|e| {
        let one_line = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
        Error::format(path, format!("invalid PLY: {one_line}"))
    })?;
    let def = ply.header.elements.get("vertex").ok_or_else(|| Error::format(path, "no `vertex` element"))?;
    for axis in ["x", "y", "z"] {
        if !def.properties.contains_key(axis) {
            return Err(Error::format(path, format!("vertex element has no `{axis}` property")));
        }
    }
    let extra = INTENSITY.iter().find(|n| def.properties.contains_key(**n)).copied();
    let verts = ply.payload.get("vertex").map(|v| &v[..]).unwrap_or(&[]);
    if verts.len() != def.count {
        return Err(Error::format(
            path,
            format!("header declares {} vertices, file holds {}: truncated", def.count, verts.len()),
        ));
    }
    let dims = if extra.is_some() { 4 } else { 3 };
    let mut data = Vec::with_capacity(verts.len() * dims);
    for (i, v) in verts.iter().enumerate() {
        for name in ["x", "y", "z"].iter().copied().chain(extra) {
            let val = v
                .get(name)
                .and_then(scalar)
                .ok_or_else(|| Error::format(path, format!("vertex {i}: `{name}` is missing or not a scalar")))?;
            if !val.is_finite() {
                return Err(Error::format(path, format!("vertex {i}: `{name}` is NaN or infinite")));
            }
            data.push(val as f32);
        }
    }
    PointCloud::new(data, dims).map_err(|e| e.in_file(path))
}

/// Write points as a PLY `vertex` element with f32 properties `x, y, z` then `extra` names for
/// the remaining columns; `binary` selects binary little-endian, else ascii.
pub fn write_ply(path: &Path, cloud: &PointCloud, extra: &[&str], binary: bool) -> Result<()> {
    if extra.len() + 3 != cloud.dims {
        return Err(Error::invalid(
            "write PLY",
            format!("{} columns but {} property names", cloud.dims, extra.len() + 3),
        ));
    }
    let names: Vec<&str> = ["x", "y", "z"].iter().copied().chain(extra.iter().copied()).collect();
    let mut ply = Ply::<DefaultElement>::new();
    ply.header.encoding = if binary { Encoding::BinaryLittleEndian } else { Encoding::Ascii };
    let mut el = ElementDef::new("vertex".to_string());
    for n in &names {
        el.properties.add(PropertyDef::new(n.to_string(), PropertyType::Scalar(ScalarType::Float)));
    }
    ply.header.elements.add(el);
    let verts: Vec<DefaultElement> = (0..cloud.len())
        .map(|i| {
            let mut e = DefaultElement::new();
            for (n, &v) in names.iter().zip(cloud.point(i)) {
                e.insert(n.to_string(), Property::Float(v));
            }
            e
        })
        .collect();
    ply.payload.insert("vertex".to_string(), verts);
    let mut buf = Vec::new();
    Writer::new().write_ply(&mut buf, &mut ply).map_err(|e| Error::format(path, format!("cannot encode PLY: {e}")))?;
    std::fs::write(path, buf).map_err(|e| Error::io(path, e))
}
