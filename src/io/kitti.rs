//! SemanticKITTI scans (`.bin`), labels (`.label`) and the learning map of `semantic-kitti.yaml`.

use std::collections::BTreeMap;
use std::path::Path;

use yaml_rust2::{Yaml, YamlLoader};

use super::{le_f32, read_file};
use crate::error::{Error, Result};
use crate::voxel::PointCloud;

/// Number of SemanticKITTI training classes, not counting 0 (unlabeled).
pub const NUM_CLASSES: usize = 19;

/// Read a file of little-endian f32 rows of `cols` values; x, y, z must be finite.
pub fn read_f32_rows(path: &Path, cols: usize, what: &str) -> Result<PointCloud> {
    let bytes = read_file(path)?;
    let row = 4 * cols;
    if bytes.len() % row != 0 {
        return Err(Error::format(
            path,
            format!(
                "{} bytes is not a whole number of {what} points ({row} bytes each): truncated or not a {what} file",
                bytes.len()
            ),
        ));
    }
    let data = le_f32(&bytes);
    if !crate::voxel::all_finite(&data) {
        if let Some(i) = data.chunks_exact(cols).position(|p| !p[..3].iter().all(|v| v.is_finite())) {
            return Err(Error::format(path, format!("point {i} has a NaN or infinite coordinate")));
        }
        if let Some(i) = data.chunks_exact(cols).position(|p| !p[3..].iter().all(|v| v.is_finite())) {
            return Err(Error::format(path, format!("point {i} has a NaN or infinite attribute")));
        }
    }
    PointCloud::new(data, cols).map_err(|e| e.in_file(path))
}

/// Read a SemanticKITTI / KITTI velodyne scan: f32 x, y, z, remission per point.
pub fn read_bin(path: &Path) -> Result<PointCloud> {
    read_f32_rows(path, 4, "KITTI .bin")
}

/// Read a `.label` file: one u32 per point (low 16 bits class, high 16 bits instance).
/// `expected` is the point count of the matching scan.
pub fn read_label(path: &Path, expected: Option<usize>) -> Result<Vec<u32>> {
    let bytes = read_file(path)?;
    if bytes.len() % 4 != 0 {
        return Err(Error::format(
            path,
            format!("{} bytes is not a whole number of u32 labels: truncated", bytes.len()),
        ));
    }
    let labels: Vec<u32> = bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    if let Some(n) = expected {
        if labels.len() != n {
            return Err(Error::format(path, format!("{} labels for a scan of {n} points", labels.len())));
        }
    }
    Ok(labels)
}

/// Write raw labels as a SemanticKITTI `.label` file.
pub fn write_label(path: &Path, labels: &[u32]) -> Result<()> {
    let bytes: Vec<u8> = labels.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// The class tables of `semantic-kitti.yaml`.
#[derive(Debug, Clone)]
pub struct LearningMap {
    /// Raw class id → training id (0 = unlabeled/ignored, 1..=19).
    pub learning_map: BTreeMap<u32, u32>,
    /// Training id → raw class id.
    pub inverse: Vec<u32>,
    /// Raw class id → name.
    pub names: BTreeMap<u32, String>,
    /// Raw class id → colour (the yaml stores BGR; converted to RGB).
    pub colors: BTreeMap<u32, [u8; 3]>,
}

fn int_map(doc: &Yaml, key: &str, path: &Path) -> Result<BTreeMap<u32, Yaml>> {
    let h = doc[key].as_hash().ok_or_else(|| Error::format(path, format!("missing mapping `{key}`")))?;
    let mut out = BTreeMap::new();
    for (k, v) in h {
        let k = k
            .as_i64()
            .and_then(|k| u32::try_from(k).ok())
            .ok_or_else(|| Error::format(path, format!("`{key}` has a non-integer key {k:?}")))?;
        out.insert(k, v.clone());
    }
    Ok(out)
}

impl LearningMap {
    /// Parse `semantic-kitti.yaml` (labels, color_map, learning_map, learning_map_inv).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path)
    }

    /// [`LearningMap::load`] from the text of such a file; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let docs = YamlLoader::load_from_str(text).map_err(|e| Error::format(path, format!("invalid YAML: {e}")))?;
        let doc = docs.first().ok_or_else(|| Error::format(path, "empty YAML document"))?;
        let as_u32 = |v: &Yaml, what: &str| -> Result<u32> {
            v.as_i64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| Error::format(path, format!("`{what}` has a non-integer value {v:?}")))
        };
        let mut learning_map = BTreeMap::new();
        for (k, v) in int_map(doc, "learning_map", path)? {
            let t = as_u32(&v, "learning_map")?;
            if t as usize > NUM_CLASSES {
                return Err(Error::format(path, format!("learning_map sends {k} to {t} (> {NUM_CLASSES})")));
            }
            learning_map.insert(k, t);
        }
        let mut inverse = vec![0u32; NUM_CLASSES + 1];
        for (k, v) in int_map(doc, "learning_map_inv", path)? {
            if k as usize > NUM_CLASSES {
                return Err(Error::format(path, format!("learning_map_inv has training id {k} (> {NUM_CLASSES})")));
            }
            inverse[k as usize] = as_u32(&v, "learning_map_inv")?;
        }
        let mut names = BTreeMap::new();
        for (k, v) in int_map(doc, "labels", path)? {
            names.insert(k, v.as_str().unwrap_or("?").to_string());
        }
        let mut colors = BTreeMap::new();
        for (k, v) in int_map(doc, "color_map", path)? {
            let bgr = v
                .as_vec()
                .filter(|c| c.len() == 3)
                .ok_or_else(|| Error::format(path, format!("color_map entry {k} is not [b, g, r]")))?;
            let c: Vec<u8> = bgr.iter().map(|x| x.as_i64().and_then(|x| u8::try_from(x).ok()).unwrap_or(0)).collect();
            colors.insert(k, [c[2], c[1], c[0]]);
        }
        Ok(Self { learning_map, inverse, names, colors })
    }

    /// Training id (0..=19) of a raw label (instance bits ignored); unknown classes map to 0.
    pub fn to_train(&self, raw: u32) -> u32 {
        self.learning_map.get(&(raw & 0xFFFF)).copied().unwrap_or(0)
    }

    /// Training ids of raw labels, and how many raw labels have a class id the learning map
    /// does not know (mapped to 0, ignored in scoring: a caller should say so).
    pub fn to_train_counted(&self, raw: &[u32]) -> (Vec<u32>, usize) {
        let mut unknown = 0;
        let ids = raw
            .iter()
            .map(|&r| {
                self.learning_map.get(&(r & 0xFFFF)).copied().unwrap_or_else(|| {
                    unknown += 1;
                    0
                })
            })
            .collect();
        (ids, unknown)
    }

    /// Raw class id of a training id.
    pub fn to_raw(&self, train: u32) -> u32 {
        self.inverse.get(train as usize).copied().unwrap_or(0)
    }

    /// Name of a training id.
    pub fn train_name(&self, train: u32) -> &str {
        self.names.get(&self.to_raw(train)).map_or("?", |s| s.as_str())
    }
}
