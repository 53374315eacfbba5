//! Neural-network layers and models on top of the engine: checkpoints by TorchSparse names,
//! BatchNorm folding, residual blocks, MinkUNet and SPVCNN, all built from one
//! architecture description ([`arch::NetDesc`]).

pub mod arch;
pub mod checkpoint;
pub mod layers;
pub mod minkunet;
pub mod points;
pub mod spvcnn;
