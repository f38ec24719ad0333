//! Ratio sweeps from config files. Every cell (case x method x ratio x seed)
//! appends one JSON line to `results.jsonl` the moment it finishes; a rerun
//! skips the cells already there. The cell in progress (or the batch of
//! cells optimized together) saves its optimization under `checkpoints/`
//! every few minutes, so a crash loses minutes of it, not hours; the files
//! go once the cell's line is written. `summary.csv` and the plots are
//! derived from the results.
//!
//! [`config`] reads the file, [`plan`] lays out the cells and the units
//! they run in, [`shard`] slices them for machines that run at once, [`run`]
//! runs a unit; the lines are [`crate::results`].

pub mod config;
pub mod plan;
pub mod run;
pub mod shard;

pub use config::{AskConfig, Baseline, CaseSource, MethodEntry, SweepConfig};
pub use plan::CellKind;
pub use run::SweepEvent;
pub use shard::Shard;

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use cram::{Checkpointing, Model};

use crate::evaluate::FirstTurnTargets;
use crate::models;
use crate::results::{append_result, read_results, Cell};
use crate::{EvalError, Result};

/// What a sweep did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweepOutcome {
    /// Cells planned: the sweep's, or its shard's.
    pub total: usize,
    pub skipped: usize,
    pub ran: usize,
    /// The report written from every line in `results.jsonl`.
    pub report: crate::plot::Report,
}

/// Runs every cell not yet in `out_dir/results.jsonl`, then writes the
/// summary and plots. `on_event` may stop the sweep by returning an error
/// (as after a crash, the next run resumes the cell in progress from its
/// last checkpoint).
pub fn run_sweep(
    config: &SweepConfig,
    config_path: &Path,
    out_dir: &Path,
    on_event: &mut dyn FnMut(&SweepEvent) -> Result<()>,
) -> Result<SweepOutcome> {
    run_shard(config, config_path, out_dir, Shard::WHOLE, on_event)
}

/// [`run_sweep`] for the cells of one shard only, `out_dir` its own.
pub fn run_shard(
    config: &SweepConfig,
    config_path: &Path,
    out_dir: &Path,
    shard: Shard,
    on_event: &mut dyn FnMut(&SweepEvent) -> Result<()>,
) -> Result<SweepOutcome> {
    let cases = config.load_cases(config_path)?;
    std::fs::create_dir_all(out_dir).map_err(|e| EvalError::io(out_dir, e))?;
    config.write_cases(config_path, &out_dir.join("cases"))?;
    // The config as run, beside its results (an unserialisable config is an error, not an empty file).
    let as_run = toml::to_string(config).map_err(|e| EvalError::io(out_dir, std::io::Error::other(e)))?;
    std::fs::write(out_dir.join("config.toml"), as_run).map_err(|e| EvalError::io(out_dir, e))?;
    let results_path = out_dir.join("results.jsonl");
    let finished: HashSet<String> = read_results(&results_path)?.iter().map(|r| r.cell.key()).collect();
    let cells = shard.select(config, &cases, plan::cells(config, &cases)?)?;
    let pending: Vec<&(Cell, CellKind)> = cells.iter().filter(|(c, _)| !finished.contains(&c.key())).collect();
    let skipped = cells.len() - pending.len();
    on_event(&SweepEvent::Planned { total: cells.len(), done: skipped })?;

    if !pending.is_empty() {
        let checkpoints = out_dir.join("checkpoints");
        let config = &config.checkpointing_to(&checkpoints);
        let model = load_model(config)?;
        // Units run case by case: a case's first turn's targets serve all its units.
        let mut first_turn = FirstTurnTargets::default();
        for unit in plan::work_units(config, &model, &cases, &pending)? {
            let results = run::run_unit(&model, config, &unit, &mut first_turn, on_event)?;
            for result in &results {
                append_result(&results_path, result)?;
                on_event(&SweepEvent::CellFinished { result })?;
            }
            remove_checkpoints(&checkpoints)?;
        }
    }
    let report = crate::plot::write_report(out_dir)?;
    Ok(SweepOutcome { total: cells.len(), skipped, ran: pending.len(), report })
}

impl SweepConfig {
    /// This config with its optimizations saving their state under `dir`.
    fn checkpointing_to(&self, dir: &Path) -> SweepConfig {
        let every = Duration::from_secs_f64(self.checkpoint_seconds);
        let mut config = self.clone();
        config.optimizer.checkpoint = Some(Checkpointing { dir: dir.to_path_buf(), every });
        config
    }
}

/// Drops the checkpoints of the work unit whose lines were just written.
fn remove_checkpoints(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(EvalError::io(dir, e)),
        _ => Ok(()),
    }
}

fn load_model(config: &SweepConfig) -> Result<Model> {
    let device = models::parse_device(&config.device)?;
    Ok(Model::load(&models::resolve(&config.model)?, &device)?)
}
