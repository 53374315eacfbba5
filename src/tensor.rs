//! `SparseTensor`: voxel coordinates `(batch, x, y, z)` shared between layers, plus row-major features.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::coords;
use crate::error::{Error, Result};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A validated set of unique coordinates at one tensor stride.
///
/// Layers that keep the coordinates (submanifold convs, BatchNorm, ReLU) share the
/// same `Arc<CoordSet>`; its `id` keys the kernel-map cache, so a network builds
/// each map once per coordinate set.
#[derive(Debug)]
pub struct CoordSet {
    id: u64,
    coords: Vec<[i32; 4]>,
    stride: i32,
}

impl CoordSet {
    /// Validate coordinates: each in the packable range, a multiple of `stride`, and no duplicates.
    pub fn new(coords: Vec<[i32; 4]>, stride: i32) -> Result<Self> {
        if stride < 1 {
            return Err(Error::tensor("coords", format!("tensor stride must be >= 1, got {stride}")));
        }
        for (i, &c) in coords.iter().enumerate() {
            coords::check(c).map_err(|e| match e {
                Error::CoordRange { coord, msg } => Error::tensor("coords", format!("row {i}: {coord:?}: {msg}")),
                other => other,
            })?;
            if c[1..].iter().any(|v| v % stride != 0) {
                return Err(Error::tensor(
                    "coords",
                    format!("row {i}: {c:?} is not a multiple of the tensor stride {stride}"),
                ));
            }
        }
        let mut keys: Vec<u64> = coords.iter().map(|&c| coords::pack(c)).collect();
        radsort::sort(&mut keys);
        if let Some(w) = keys.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::tensor("coords", format!("duplicate coordinate {:?}", coords::unpack(w[0]))));
        }
        Ok(Self::new_unchecked(coords, stride))
    }

    /// Coordinates produced by this crate's own builders, which are unique and in range by construction.
    pub(crate) fn new_unchecked(coords: Vec<[i32; 4]>, stride: i32) -> Self {
        Self { id: NEXT_ID.fetch_add(1, Ordering::Relaxed), coords, stride }
    }

    /// Unique identity of this coordinate set (for caches).
    pub fn id(&self) -> u64 {
        self.id
    }
    /// The coordinates, one row per voxel.
    pub fn coords(&self) -> &[[i32; 4]] {
        &self.coords
    }
    /// Tensor stride: coordinates are multiples of it (input-grid units).
    pub fn stride(&self) -> i32 {
        self.stride
    }
    /// Number of voxels.
    pub fn len(&self) -> usize {
        self.coords.len()
    }
    /// True when there are no voxels.
    pub fn is_empty(&self) -> bool {
        self.coords.is_empty()
    }
}

/// Sparse voxel features: `coords[i]` owns row `i` of `feats` (`[N, C]`, row-major f32).
/// Features live in host memory, or on a GPU when a GPU engine produced them: there they stay
/// for the next GPU op, and [`SparseTensor::feats`] copies them back on first use.
#[derive(Debug, Clone)]
pub struct SparseTensor {
    coords: Arc<CoordSet>,
    feats: Storage,
    channels: usize,
}

#[derive(Debug, Clone)]
enum Storage {
    Host(Vec<f32>),
    Device(Arc<DeviceStore>),
}

/// Features held by a backend outside host memory (a GPU buffer). The tensor keeps them
/// opaque (this module knows no backend) and asks for a host copy only when one is needed.
pub trait DeviceFeatures: std::fmt::Debug + Send + Sync {
    /// Values held (`[N, C]`).
    fn len(&self) -> usize;
    /// Whether no values are held.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copy the values to host memory.
    fn to_host(&self) -> Result<Vec<f32>>;
    /// For the backend to recognise its own storage.
    fn as_any(&self) -> &dyn std::any::Any;
}

#[derive(Debug)]
struct DeviceStore {
    dev: Box<dyn DeviceFeatures>,
    host: OnceLock<Vec<f32>>,
}

impl DeviceStore {
    fn try_host(&self) -> Result<&[f32]> {
        if let Some(v) = self.host.get() {
            return Ok(v);
        }
        let v = self.dev.to_host()?;
        Ok(self.host.get_or_init(|| v))
    }

    fn host(&self) -> &[f32] {
        self.host.get_or_init(|| {
            // A failed copy means the device was lost: nothing sensible can continue.
            self.dev.to_host().unwrap_or_else(|e| panic!("copying features back from the device: {e}"))
        })
    }
}

impl SparseTensor {
    /// Build from raw parts, validating that the feature matrix matches the coordinates.
    pub fn new(coords: Arc<CoordSet>, feats: Vec<f32>, channels: usize) -> Result<Self> {
        if feats.len() != coords.len() * channels {
            return Err(Error::tensor(
                "feats",
                format!(
                    "expected {} x {} = {} values for {} coordinates, got {}",
                    coords.len(),
                    channels,
                    coords.len() * channels,
                    coords.len(),
                    feats.len()
                ),
            ));
        }
        if coords.len() > u32::MAX as usize {
            return Err(Error::tensor("coords", "more than 2^32 - 1 voxels"));
        }
        Ok(Self { coords, feats: Storage::Host(feats), channels })
    }

    /// Features held by a backend (`[N, C]`).
    pub fn from_device(coords: Arc<CoordSet>, dev: Box<dyn DeviceFeatures>, channels: usize) -> Result<Self> {
        if dev.len() != coords.len() * channels {
            return Err(Error::tensor(
                "feats",
                format!("device storage of {} values for {} x {channels}", dev.len(), coords.len()),
            ));
        }
        Ok(Self { coords, feats: Storage::Device(Arc::new(DeviceStore { dev, host: OnceLock::new() })), channels })
    }

    /// The backend storage of the features, when a backend holds them.
    pub fn device_feats(&self) -> Option<&dyn DeviceFeatures> {
        match &self.feats {
            Storage::Host(_) => None,
            Storage::Device(d) => Some(d.dev.as_ref()),
        }
    }

    /// Build from coordinate rows and features at tensor stride 1.
    pub fn from_parts(coords: Vec<[i32; 4]>, feats: Vec<f32>, channels: usize) -> Result<Self> {
        Self::new(Arc::new(CoordSet::new(coords, 1)?), feats, channels)
    }

    /// Shared coordinate set.
    pub fn coord_set(&self) -> &Arc<CoordSet> {
        &self.coords
    }
    /// Coordinates, one row per voxel.
    pub fn coords(&self) -> &[[i32; 4]] {
        self.coords.coords()
    }
    /// Features, row-major `[N, C]`.
    /// (Copied back from the GPU on first use when they live there; panics if that copy fails,
    /// see [`SparseTensor::try_feats`].)
    pub fn feats(&self) -> &[f32] {
        match &self.feats {
            Storage::Host(v) => v,
            Storage::Device(d) => d.host(),
        }
    }
    /// [`SparseTensor::feats`], with a failed copy back from the GPU (a lost device) as an
    /// error instead of a panic: what every path a user reaches calls.
    pub fn try_feats(&self) -> Result<&[f32]> {
        match &self.feats {
            Storage::Host(v) => Ok(v),
            Storage::Device(d) => d.try_host(),
        }
    }
    /// Mutable features (coordinates are immutable and shared); features on a GPU move to host
    /// memory first.
    pub fn feats_mut(&mut self) -> &mut [f32] {
        if let Storage::Device(d) = &self.feats {
            self.feats = Storage::Host(d.host().to_vec());
        }
        match &mut self.feats {
            Storage::Host(v) => v,
            Storage::Device(_) => unreachable!("moved to host above"),
        }
    }
    /// Take the features out.
    pub fn into_feats(self) -> Vec<f32> {
        match self.feats {
            Storage::Host(v) => v,
            Storage::Device(d) => d.host().to_vec(),
        }
    }
    /// Feature channels `C`.
    pub fn channels(&self) -> usize {
        self.channels
    }
    /// Number of voxels `N`.
    pub fn len(&self) -> usize {
        self.coords.len()
    }
    /// True when there are no voxels.
    pub fn is_empty(&self) -> bool {
        self.coords.is_empty()
    }
    /// Tensor stride.
    pub fn stride(&self) -> i32 {
        self.coords.stride()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        assert!(SparseTensor::from_parts(vec![[0, -1, 2, 3]], vec![1.0, 2.0], 2).is_ok());
        assert!(SparseTensor::from_parts(vec![[0, -1, 2, 3]], vec![1.0], 2).is_err());
        assert!(SparseTensor::from_parts(vec![[0, 1, 2, 3], [0, 1, 2, 3]], vec![], 0).is_err());
        assert!(CoordSet::new(vec![[0, 1, 2, 4]], 2).is_err());
        assert!(CoordSet::new(vec![[0, 2, -2, 4]], 2).is_ok());
        assert!(CoordSet::new(vec![], 0).is_err());
        assert!(SparseTensor::from_parts(vec![], vec![], 7).unwrap().is_empty());
    }
}
