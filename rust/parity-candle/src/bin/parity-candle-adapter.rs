//! The candle port behind the mlx-parity protocol, on the parity-adapter kit:
//!
//!     parity-candle-adapter [--inject BUG] REQUEST_DIR RESPONSE_DIR
//!
//! `--inject` switches on one of the port's porting bugs (src/inject.rs), for the self-test.

use std::process::ExitCode;

use parity_candle::port::CandlePort;

fn main() -> ExitCode {
    parity_adapter::serve::<CandlePort>(std::env::args().skip(1))
}
