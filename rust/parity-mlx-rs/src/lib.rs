//! `parity_mlx_rs`: the mlx-rs port of the audited MLX training step, as a Python extension.
//!
//! The contract is docs/training-step.md. Import `mlx.core` before this module: both then use the one
//! `libmlx.so` of the installed `mlx[cpu]` wheel (the extension also carries an rpath to it, see
//! build.rs). Every Rust error becomes a Python exception carrying its message (ValueError for bad
//! inputs, settings, configs and checkpoints; OSError for files; RuntimeError for MLX failures).
pub mod config;
pub mod error;
pub mod model;
pub mod settings;
pub mod trainer;
pub mod weights;

#[cfg(feature = "python")]
mod python;

pub use trainer::Trainer;
