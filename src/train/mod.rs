//! Training building blocks: backward passes of the layers the models use, the loss, and small
//! dense networks (`mlp`) for the pruning agents.
//! (The sparse-conv backward lives with its forward in `cpu::conv` and `Engine::conv_backward`.)

pub mod data;
pub mod mlp;
pub mod net;
pub mod ops;
pub mod optim;
pub mod trainer;
