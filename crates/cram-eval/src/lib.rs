//! Evaluating cram: transcripts and their rendering, questions and keyword
//! fact scoring, and the real models the evaluation runs on.

pub mod bench;
pub mod budget_profile;
pub mod breakdown;
pub mod bundled;
pub mod calibration;
pub mod cases;
pub mod evaluate;
pub mod generator;
pub mod memory;
pub mod models;
pub mod plot;
pub mod questions;
pub mod render;
pub mod results;
pub mod self_test;
pub mod stats;
pub mod sweep;
pub mod transcript;

use std::path::PathBuf;

/// The build that runs: the package version, and where it was built from a
/// git checkout, `+` its commit (`-dirty` when the compiled sources differ
/// from it). Results lines record it.
pub const BUILD: &str = env!("CRAM_BUILD");

/// Errors of the evaluation side.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Model(#[from] cram::Error),
    #[error("{path}: {reason}")]
    Transcript { path: PathBuf, reason: String },
    #[error("unknown model `{name}` (known: {known})")]
    UnknownModel { name: String, known: String },
    #[error("unknown device `{0}` (cpu, cuda, cuda:N)")]
    Device(String),
    #[error("fetching the model failed: {0}")]
    Fetch(String),
    #[error("{name}: sha256 mismatch: expected {expected}, found {found}")]
    Checksum { name: String, expected: String, found: String },
    #[error("case `{case}` leaks fact `{fact}`: its answer `{answer}` appears in {place}")]
    Leak { case: String, fact: String, answer: String, place: String },
    #[error("sweep config {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

impl EvalError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EvalError::Io { path: path.into(), source }
    }
}

impl From<candle_core::Error> for EvalError {
    fn from(e: candle_core::Error) -> Self {
        EvalError::Model(cram::Error::Candle(e))
    }
}

pub type Result<T> = std::result::Result<T, EvalError>;
