//! A second Rust port of the training step (docs/training-step.md), on candle's CPU tensors and autograd,
//! written from the contract and the protocol: the model (model.rs), the loss (loss.rs), AdamW with
//! clipping and the schedules (optimizer.rs), the checkpoint and its LoRA adapters (weights.rs), and a
//! handful of porting bugs to inject (inject.rs). `parity-candle-adapter` answers the harness through
//! rust/parity-adapter (port.rs).

pub mod config;
pub mod inject;
pub mod loss;
pub mod model;
pub mod optimizer;
pub mod port;
pub mod settings;
pub mod weights;

pub use parity_adapter::Result;

pub(crate) fn fail(what: impl std::fmt::Display) -> parity_adapter::Error {
    parity_adapter::Error::failed(what)
}

pub(crate) fn unsupported(what: impl std::fmt::Display) -> parity_adapter::Error {
    parity_adapter::Error::Unsupported(what.to_string())
}
