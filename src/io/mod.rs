//! File formats: LiDAR scans (SemanticKITTI, nuScenes, PLY, NumPy), labels and learning maps,
//! and safetensors tensor files. Readers validate everything and never panic on file content.

pub mod kitti;
pub mod las;
pub mod npy;
pub mod ply;
pub mod tensors;

use std::path::Path;

use crate::error::{Error, Result};
use crate::voxel::PointCloud;

/// A point-cloud file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointFormat {
    /// SemanticKITTI / KITTI velodyne `.bin`: f32 x, y, z, remission.
    Kitti,
    /// nuScenes `.pcd.bin`: f32 x, y, z, intensity, ring.
    NuScenes,
    /// PLY (ascii or binary little-endian) with a `vertex` element.
    Ply,
    /// NumPy `.npy`, float array `[N, D]` with D >= 3.
    Npy,
    /// ASPRS `.las` / `.laz`: x, y, z re-centred, intensity in [0, 1] ([`las::read_las`]).
    Las,
}

impl std::str::FromStr for PointFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "kitti" | "bin" => Ok(PointFormat::Kitti),
            "nuscenes" | "pcd.bin" => Ok(PointFormat::NuScenes),
            "ply" => Ok(PointFormat::Ply),
            "npy" => Ok(PointFormat::Npy),
            "las" | "laz" => Ok(PointFormat::Las),
            _ => Err(Error::invalid(
                "--format",
                format!("unknown point format `{s}` (expected kitti, nuscenes, ply, npy or las)"),
            )),
        }
    }
}

impl PointFormat {
    /// Choose the format from the file name. `.pcd.bin` is checked before `.bin`: a nuScenes
    /// file's size is also a multiple of 16 bytes, so the size can never decide.
    pub fn detect(path: &Path) -> Result<Self> {
        let name = path.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
        if name.ends_with(".pcd.bin") {
            Ok(PointFormat::NuScenes)
        } else if name.ends_with(".bin") {
            Ok(PointFormat::Kitti)
        } else if name.ends_with(".ply") {
            Ok(PointFormat::Ply)
        } else if name.ends_with(".npy") {
            Ok(PointFormat::Npy)
        } else if name.ends_with(".las") || name.ends_with(".laz") {
            Ok(PointFormat::Las)
        } else {
            Err(Error::format(
                path,
                "cannot tell the point format from the file name (expected .bin, .pcd.bin, .ply, .npy, .las or .laz; or pass --format)",
            ))
        }
    }
}

/// Read a point cloud with the file's own columns (x, y, z first).
pub fn read_points(path: &Path, format: Option<PointFormat>) -> Result<PointCloud> {
    let format = match format {
        Some(f) => f,
        None => PointFormat::detect(path)?,
    };
    match format {
        PointFormat::Kitti => kitti::read_bin(path),
        PointFormat::NuScenes => kitti::read_f32_rows(path, 5, "nuScenes .pcd.bin"),
        PointFormat::Ply => ply::read_ply(path),
        PointFormat::Npy => npy::read_points(path),
        PointFormat::Las => Ok(las::read_las(path)?.cloud),
    }
}

pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Little-endian f32 values of `bytes` (length a multiple of 4).
pub(crate) fn le_f32(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}
