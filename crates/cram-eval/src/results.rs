//! A sweep's results: one JSON line per finished cell in `results.jsonl`,
//! appended the moment the cell finishes, read back by reruns (to skip
//! finished cells) and by the report.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::evaluate::Answered;
use crate::{EvalError, Result};

/// One unit of work and its identity in `results.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    pub case: String,
    pub method: String,
    /// None for baselines.
    pub ratio: Option<f64>,
    pub seed: u64,
}

impl Cell {
    /// The cell's identity: case, method, ratio and seed.
    pub fn key(&self) -> String {
        format!("{}|{}|{}|{}", self.case, self.method, self.ratio.map_or("-".into(), |r| r.to_string()), self.seed)
    }
}

/// One line of `results.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CellResult {
    #[serde(flatten)]
    pub cell: Cell,
    pub model: String,
    pub n_tokens: usize,
    /// Cache entries standing for the span (virtual tokens for the recipe).
    pub n_virtual: usize,
    pub facts_correct: usize,
    pub facts_total: usize,
    /// The final loss, averaged over compressed turns.
    pub loss_final: Option<f32>,
    /// Optimization steps, summed over compressed turns.
    pub steps: usize,
    /// Wall time of the whole cell (compression and answers), time before
    /// a resume included.
    pub seconds: f64,
    /// Seconds spent optimizing.
    pub optimize_seconds: f64,
    /// Seconds compressing (the span's forward, scoring, fitting or
    /// optimizing), summed over compressed turns; 0 in a batch, whose
    /// optimization is `optimize_seconds`.
    #[serde(default)]
    pub compress_seconds: f64,
    /// Every answer, joined (the full records are in `answers`).
    pub answer: String,
    pub answers: Vec<Answered>,
    /// The loss curves of every compressed turn, one after the other.
    pub loss_curve: Vec<f32>,
    /// Each compressed turn's final loss (one entry for a single-turn case).
    #[serde(default)]
    pub turn_losses: Vec<f32>,
    /// For fitted methods (attention matching), the relative error of the
    /// compacted attention output on the reference queries, averaged over
    /// compressed turns, layers and heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fit_error: Option<f64>,
    /// Peak resident memory of the process during the cell (Linux), MiB.
    #[serde(default)]
    pub peak_rss_mib: Option<f64>,
    /// The text that replaced each compressed turn, for text-level methods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replacement_text: Vec<String>,
    /// Cells optimized together in this cell's batch, itself included (1:
    /// alone). In a batch, `optimize_seconds` and `peak_rss_mib` are the
    /// batch's, and `seconds` is the batch's compression plus this cell's answers.
    #[serde(default = "one")]
    pub batch_cells: usize,
    /// Optimization steps restored from a checkpoint (summed over turns):
    /// the process that wrote this line resumed after a crash.
    #[serde(default)]
    pub resumed_steps: usize,
    /// Threads of the CPU kernels: the cell's seconds depend on them, its
    /// numbers do not (one and two threads give T8's loss curve to the bit).
    #[serde(default)]
    pub threads: Option<usize>,
    /// The build that wrote the line ([`crate::BUILD`]): builds may differ in
    /// the last bits of a loss curve. Absent in lines older than the field.
    #[serde(default)]
    pub build: Option<String>,
}

fn one() -> usize {
    1
}

/// The finished cells of a results file. A last line cut short by a crash
/// is dropped (and removed, so the next append starts on a fresh line).
pub fn read_results(path: &Path) -> Result<Vec<CellResult>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(EvalError::io(path, e)),
    };
    let complete = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    if complete.len() != text.len() {
        std::fs::write(path, complete).map_err(|e| EvalError::io(path, e))?;
    }
    complete
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(number, line)| {
            serde_json::from_str(line).map_err(|e| EvalError::Transcript {
                path: path.to_path_buf(),
                reason: format!("line {}: {e}", number + 1),
            })
        })
        .collect()
}

/// Appends one line and syncs it to disk.
pub fn append_result(path: &Path, result: &CellResult) -> Result<()> {
    let mut line = serde_json::to_string(result).map_err(|e| EvalError::io(path, e.into()))?;
    line.push('\n');
    let mut file = OpenOptions::new().create(true).append(true).open(path).map_err(|e| EvalError::io(path, e))?;
    file.write_all(line.as_bytes()).and_then(|_| file.sync_data()).map_err(|e| EvalError::io(path, e))
}
