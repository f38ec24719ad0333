//! The one error type of the library: every failure a caller can act on has
//! its own variant, so a CLI can print it and exit instead of panicking.

use std::path::PathBuf;

/// Errors of loading a model, running it, or using a cache.
// The variants are documented; their fields are named for what they hold.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model or cache file that does not exist.
    #[error("file not found: {0}")]
    MissingFile(PathBuf),
    /// A file that is not a readable GGUF, or one cut short.
    #[error("{path}: not a valid GGUF file: {reason}")]
    BadGguf { path: PathBuf, reason: String },
    /// A model of an architecture this crate does not implement.
    #[error("{source_name}: architecture `{found}` is not supported (expected `qwen2`)")]
    UnsupportedArchitecture { source_name: String, found: String },
    /// A config key that is missing or has the wrong type.
    #[error("model config: {0}")]
    Config(String),
    /// A weight the architecture needs that the files do not hold.
    #[error("weight `{0}` not found in the model files")]
    MissingWeight(String),
    /// The hub could not give the files of a repository.
    #[error("hf-hub: cannot get `{file}` of `{repo}`: {reason}")]
    Hub { repo: String, file: String, reason: String },
    /// The tokenizer could not be built or failed on input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Arguments that do not fit together (shapes, positions, lengths).
    #[error("invalid input: {0}")]
    Invalid(String),
    /// The optimization's loss stopped being a finite number.
    #[error("the optimization diverged: loss {loss} at step {step} (a lower lr may help)")]
    Diverged { step: usize, loss: f32 },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A saved cache was made by another model than the one loading it.
    #[error("cache {path} was computed by another model:\n  saved:   {saved}\n  loading: {loading}")]
    WrongModel { path: PathBuf, saved: String, loading: String },
    /// A filesystem operation failed.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
