//! The library's error type. Every message names the thing that is wrong, the limit or
//! expectation, and the value found, so a user can act on it without reading code.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The cause is in the message and deliberately not a `#[source]`: printing the
    // chain (`{:#}`, as the CLI does) would repeat it.
    #[error("cannot read {path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error("{path} is not a valid config: {message}")]
    Config { path: PathBuf, message: String },

    #[error("no weights in {dir}: expected one of {expected}")]
    NoWeights { dir: PathBuf, expected: String },

    #[error("{path} is not a readable safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },

    #[error("tensor `{name}` is missing from {file}")]
    MissingTensor { name: String, file: PathBuf },

    #[error("tensor `{name}` in {file} is not used by this model (unexpected extra tensor; wrong config or wrong folder?)")]
    UnexpectedTensor { name: String, file: PathBuf },

    #[error("tensor `{name}` in {file} has shape {found:?}, the config expects {expected:?}")]
    ShapeMismatch {
        name: String,
        file: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("tensor `{name}` in {file} has dtype {dtype}, expected a float dtype")]
    NotFloat {
        name: String,
        file: PathBuf,
        dtype: String,
    },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// A generation parameter out of range: names the field, the limit and the value.
    #[error("{0}")]
    InvalidParameter(String),

    /// Fetching a hub repository (the `hub` feature) failed.
    #[error("{repo} from {endpoint}: {message}")]
    Download {
        repo: String,
        endpoint: String,
        message: String,
    },

    #[error("canceled")]
    Canceled,

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause,
        }
    }
}
