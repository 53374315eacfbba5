//! CLI commands that live in their own files (the older ones are still in `main.rs`).

pub mod prune;
pub mod rounds;
