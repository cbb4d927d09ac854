//! One error type; the Python layer turns `Value` kinds into ValueError and the rest into RuntimeError.
use std::fmt;

#[derive(Debug)]
pub enum Error {
    /// Bad config.json (ValueError).
    Config(String),
    /// Bad settings JSON (ValueError).
    Settings(String),
    /// Batch or loss inputs outside their domain (ValueError).
    Batch(String),
    /// Checkpoint keys do not fill the model exactly (ValueError).
    Weights(String),
    /// Files that cannot be read or written (OSError).
    Io(String),
    /// An MLX operation failed (RuntimeError).
    Mlx(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(m) | Error::Settings(m) | Error::Batch(m) | Error::Weights(m) | Error::Io(m) => {
                f.write_str(m)
            }
            Error::Mlx(m) => write!(f, "MLX error: {m}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<mlx_rs::error::Exception> for Error {
    fn from(e: mlx_rs::error::Exception) -> Self {
        Error::Mlx(e.to_string())
    }
}

impl From<mlx_rs::error::IoError> for Error {
    fn from(e: mlx_rs::error::IoError) -> Self {
        Error::Io(e.to_string())
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e.to_string())
    }
}
