//! Training building blocks: backward passes of the layers the models use, and the loss.
//! (The sparse-conv backward lives with its forward in `cpu::conv` and `Engine::conv_backward`.)

pub mod data;
pub mod net;
pub mod ops;
pub mod optim;
pub mod trainer;
