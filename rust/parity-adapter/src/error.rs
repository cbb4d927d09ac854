//! A stage either answers, fails with a message (its finding), or is not implemented (not checked).

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// The port does not implement this request: written as `<stage>.unsupported`, reported as
    /// "not checked" for an isolated request and as a failure for one of the eight stages.
    Unsupported(String),
    /// Anything else: written as `<stage>.error`, that stage's failure.
    Failed(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn failed(what: impl fmt::Display) -> Self {
        Error::Failed(what.to_string())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Unsupported(why) => write!(f, "not implemented: {why}"),
            Error::Failed(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::failed(e)
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::failed(e)
    }
}

impl From<safetensors::SafeTensorError> for Error {
    fn from(e: safetensors::SafeTensorError) -> Self {
        Error::failed(e)
    }
}
