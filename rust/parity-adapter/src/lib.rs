//! The mlx-parity protocol (`docs/protocol.md`) for a Rust port.
//!
//! A port implements [`Port`]: load a checkpoint, report parameters, run the forward pass, the loss,
//! the gradients and one optimizer step, save and resume. [`serve`] answers the harness's requests
//! with it: the stage orchestration (parameter deltas, N-update trajectories, the checkpoint sequence
//! with its uninterrupted rerun, the isolated requests) is the kit's, so a port cannot get it wrong.
//!
//! ```no_run
//! use parity_adapter::{serve, Port};
//! # struct MyPort;
//! # impl Port for MyPort {
//! #   fn load(_: &parity_adapter::RequestFolder) -> parity_adapter::Result<Self> { unimplemented!() }
//! #   fn resume(_: &parity_adapter::RequestFolder, _: &std::path::Path) -> parity_adapter::Result<Self> { unimplemented!() }
//! #   fn load_report(&self) -> parity_adapter::LoadReport { unimplemented!() }
//! #   fn parameters(&self) -> parity_adapter::Result<parity_adapter::Tensors> { unimplemented!() }
//! #   fn trainable_names(&self) -> Vec<String> { unimplemented!() }
//! #   fn forward(&mut self, _: &parity_adapter::Tensor) -> parity_adapter::Result<(parity_adapter::Tensor, Vec<parity_adapter::Tensor>)> { unimplemented!() }
//! #   fn shifted(&mut self, _: &parity_adapter::Tensor, _: &parity_adapter::Tensor) -> parity_adapter::Result<(parity_adapter::Tensor, parity_adapter::Tensor)> { unimplemented!() }
//! #   fn loss(&mut self, _: &parity_adapter::Batch) -> parity_adapter::Result<parity_adapter::Loss> { unimplemented!() }
//! #   fn gradients(&mut self, _: &parity_adapter::Batch) -> parity_adapter::Result<(parity_adapter::Loss, parity_adapter::Tensors)> { unimplemented!() }
//! #   fn step(&mut self, _: &parity_adapter::Batch) -> parity_adapter::Result<parity_adapter::Loss> { unimplemented!() }
//! #   fn optimizer_state(&self) -> parity_adapter::Result<parity_adapter::OptimizerState> { unimplemented!() }
//! #   fn save(&self, _: &std::path::Path) -> parity_adapter::Result<()> { unimplemented!() }
//! # }
//! fn main() -> std::process::ExitCode {
//!     serve::<MyPort>(std::env::args().skip(1))
//! }
//! ```

mod error;
mod port;
mod request;
mod serve;
mod stages;
mod tensor;

pub use error::{Error, Result};
pub use port::{LoadReport, Loss, OptimizerState, Port};
pub use request::{Batch, Request, RequestFolder, PROTOCOL};
pub use serve::{answer, answer_with, parse_args, serve};
pub use stages::{run_stage, Output, ISOLATED_STAGES, STAGES};
pub use tensor::{read_tensors, write_tensors, Data, Tensor, Tensors};
