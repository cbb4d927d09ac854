//! `parity_mlx_rs`: the mlx-rs port of the audited MLX training step, as a Python extension.
//!
//! The contract is docs/training-step.md. The modules mirror the reference (`reference/*.py`) file for
//! file: config, model, weights, data, loss, schedule, optimizer, precision, settings, checkpoint,
//! trainer; the deliberate porting bugs of the self-test live in `inject` alone.
//!
//! Import `mlx.core` before this module: both then use the one `libmlx.so` of the installed `mlx[cpu]`
//! wheel (the extension also carries an rpath to it, see build.rs). Every Rust error becomes a Python
//! exception carrying its message (ValueError for bad inputs, settings, configs and checkpoints; OSError
//! for files; RuntimeError for MLX failures).
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod distributed;
pub mod error;
pub mod inject;
pub mod loss;
pub mod model;
pub mod optimizer;
pub mod precision;
pub mod schedule;
pub mod settings;
pub mod trainer;
pub mod weights;

#[cfg(feature = "python")]
mod python;
#[cfg(test)]
mod testing;

pub use trainer::Trainer;
