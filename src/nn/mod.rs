//! Neural-network layers and models on top of the engine: checkpoints by TorchSparse names,
//! BatchNorm folding, residual blocks, MinkUNet.

pub mod checkpoint;
pub mod layers;
pub mod minkunet;
pub mod points;
pub mod spvcnn;
