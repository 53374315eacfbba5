//! # sparseconv
//!
//! A point-cloud sparse convolution engine: voxelize LiDAR scans, build kernel maps by
//! coordinate hashing or by PointAcc-style merge-sort, and run weight-stationary sparse
//! convolutions (gather → GEMM → scatter) with TorchSparse-style adaptive offset grouping.
//! Results are bit-identical for any thread count and any grouping.
//!
//! Main types:
//! - [`SparseTensor`] / [`CoordSet`]: coordinates `(batch, x, y, z)` and `[N, C]` features.
//! - [`voxel::voxelize`]: points → voxels (floor semantics, mean features, inverse map).
//! - [`KernelMap`]: the `(input, output)` pairs per kernel offset, in TorchSparse offset order.
//! - [`Engine`]: runs convs on a [`Device`], caching maps per coordinate set and tuned plans.
//!   `Device::Gpu` (wgpu: Vulkan, Metal, DX12) builds maps and runs convs in WGSL and keeps
//!   features on the GPU between layers; [`SparseTensor::feats`] copies them back on demand.
//! - [`Error`]: the one error type.
//!
//! ```
//! use sparseconv::{ConvWeight, Engine, KernelSpec, SparseTensor};
//! use sparseconv::voxel::{voxelize, PointCloud};
//!
//! # fn main() -> sparseconv::Result<()> {
//! // Three points (x, y, z, remission); two fall into the same 5 cm voxel.
//! let cloud = PointCloud::new(vec![
//!     0.01, 0.02, -0.03, 0.5,
//!     0.02, 0.01, -0.01, 0.7,
//!     -0.06, 0.0, 0.0, 0.1,
//! ], 4)?;
//! let vox = voxelize(&cloud, 0.05)?;
//! assert_eq!(vox.tensor.len(), 2);
//!
//! // A 3x3x3 submanifold conv, 4 -> 8 channels.
//! let spec = KernelSpec::new(3, 1, 1)?;
//! let w = ConvWeight::new(vec![0.1; 27 * 4 * 8], 27, 4, 8, None)?;
//! let engine = Engine::default();
//! let y: SparseTensor = engine.conv(&vox.tensor, &w, spec)?;
//! assert_eq!((y.len(), y.channels()), (2, 8));
//!
//! // The same conv on a GPU, where one exists (no CUDA needed; lavapipe works without a GPU).
//! if let Ok(gpu) = sparseconv::Device::gpu() {
//!     let g = Engine::new(gpu, sparseconv::MapBuilder::Hash, sparseconv::Grouping::Auto);
//!     let yg = g.conv(&vox.tensor, &w, spec)?;
//!     assert!(yg.feats().iter().zip(y.feats()).all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + b.abs())));
//! }
//! # Ok(())
//! # }
//! ```

// Backend internals and test/benchmark helpers: public so that the benchmarks, the tests and
// the command reach them, but not a stable API (their items may change in any release).
/// Timing statistics, FLOP counts, seeded pseudo-random data (benchmark helpers; unstable).
pub mod bench;
pub mod coords;
/// CPU backend internals: map builders and conv kernels (unstable; use [`Engine`]).
pub mod cpu;
pub mod device;
pub mod error;
/// GPU backend internals: wgpu context, WGSL kernels, device buffers (unstable; use [`Engine`]
/// with [`Device::Gpu`]).
pub mod gpu;
pub mod io;
pub mod kmap;
pub mod metrics;
pub mod nn;
pub mod pipeline;
pub mod plan;
pub mod prune;
/// Naive references the kernels are tested against (slow by design; unstable).
pub mod reference;
pub mod sparse_weights;
pub mod tensor;
pub mod train;
pub mod viz;
pub mod voxel;
pub mod voxel_prune;

pub use device::{ConvWeight, Device, Engine, SparseMode};
pub use error::{Error, Result};
pub use kmap::{KernelMap, KernelSpec, MapBuilder, MapKind};
pub use plan::{Grouping, GroupingParams, Plan};
pub use tensor::{CoordSet, SparseTensor};
// Types most users need, reachable from the root.
pub use gpu::conv::Precision;
pub use pipeline::Model;
pub use voxel::PointCloud;
