//! Running one unit of a sweep: its cells' compression (one, or recipes
//! optimised together: a cell alone is a batch of one), the questions over
//! each result, and each cell's line of `results.jsonl`.

use std::time::Instant;

use cram::compressor::OptimizationReport;
use cram::Model;

use super::config::SweepConfig;
use super::plan::{self, WorkUnit};
use crate::evaluate::{facts_score, run_case_sharing, CaseRun, FirstTurnTargets};
use crate::memory;
use crate::results::{Cell, CellResult};
use crate::{EvalError, Result};

/// What a sweep reports while it runs.
pub enum SweepEvent<'a> {
    /// Cells in all, and how many `results.jsonl` already held.
    Planned { total: usize, done: usize },
    /// Cells start, one or several optimised together; `steps` is their
    /// optimisation budget, if they optimise.
    UnitStarted { cells: Vec<&'a Cell>, steps: Option<usize> },
    /// An optimization step finished.
    Step { step: usize, loss: f32 },
    CellFinished { result: &'a CellResult },
}

/// Compresses a unit's case once for all its cells, answers each cell's
/// questions, and returns their lines in the unit's order. The case's
/// first turn's targets come from `first_turn` when an earlier unit of the
/// same case computed them.
pub fn run_unit(
    model: &Model,
    config: &SweepConfig,
    unit: &WorkUnit,
    first_turn: &mut FirstTurnTargets,
    on_event: &mut dyn FnMut(&SweepEvent) -> Result<()>,
) -> Result<Vec<CellResult>> {
    let started = Instant::now();
    memory::reset_peak_rss();
    let compression = plan::compression(config, unit)?;
    let steps = compression.optimizes(config, unit).then(|| plan::total_steps(config, model, unit.case));
    on_event(&SweepEvent::UnitStarted { cells: unit.cells.iter().map(|(cell, _)| cell).collect(), steps })?;
    let mut step_error = None;
    let mut on_step = step_reporter(on_event, &mut step_error);
    let runs = run_case_sharing(model, unit.case, &config.ask.for_case(unit.case), compression.condition(), first_turn, &mut on_step)?;
    drop(on_step);
    if let Some(error) = step_error {
        return Err(error);
    }
    // The runs answered one after another once the span was compressed
    // (with the first turn's targets, when an earlier unit had them).
    let compression_seconds = started.elapsed().as_secs_f64() - runs.iter().map(|run| run.answer_seconds).sum::<f64>();
    let batch_cells = unit.cells.len();
    Ok(unit
        .cells
        .iter()
        .zip(runs)
        .map(|((cell, _), run)| {
            let seconds = compression_seconds + run.answer_seconds;
            CellResult { batch_cells, ..cell_result(model, cell, run, seconds) }
        })
        .collect())
}

/// The mean of `values`, if there are any.
fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, count) = values.fold((0.0, 0usize), |(sum, count), x| (sum + x, count + 1));
    (count > 0).then(|| sum / count as f64)
}

/// An optimizer callback that passes each step on as a [`SweepEvent::Step`];
/// the first error the handler returns is kept in `step_error` (the
/// optimizer cannot be stopped mid-run, so the caller returns it after).
fn step_reporter<'a>(
    on_event: &'a mut dyn FnMut(&SweepEvent) -> Result<()>,
    step_error: &'a mut Option<EvalError>,
) -> impl FnMut(usize, f32) + 'a {
    let mut steps_done = 0;
    move |_: usize, loss: f32| {
        if step_error.is_none() {
            *step_error = on_event(&SweepEvent::Step { step: steps_done, loss }).err();
        }
        steps_done += 1;
    }
}

/// A cell's line of `results.jsonl`, from its run.
fn cell_result(model: &Model, cell: &Cell, run: CaseRun, seconds: f64) -> CellResult {
    let (facts_correct, facts_total) = facts_score(&run.answers);
    let optimizations: Vec<&OptimizationReport> = run.compressions.iter().filter_map(|c| c.optimization.as_ref()).collect();
    let turn_losses: Vec<f32> = optimizations.iter().filter_map(|o| o.final_loss()).collect();
    let answer = run.answers.iter().map(|a| a.answer.trim()).collect::<Vec<_>>().join(" | ");
    CellResult {
        cell: cell.clone(),
        model: model.name.clone(),
        n_tokens: run.n_tokens,
        n_virtual: run.n_kept,
        facts_correct,
        facts_total,
        loss_final: (!turn_losses.is_empty()).then(|| turn_losses.iter().sum::<f32>() / turn_losses.len() as f32),
        steps: optimizations.iter().map(|o| o.steps).sum(),
        seconds: seconds + optimizations.iter().map(|o| o.resumed_seconds).sum::<f64>(),
        // A fold from 0.0, not `sum`: an empty f64 sum is -0.0, which the
        // lines of cells that do not optimize would then print.
        optimize_seconds: optimizations.iter().fold(0.0, |total, o| total + o.seconds),
        compress_seconds: run.compressions.iter().fold(0.0, |total, c| total + c.seconds),
        answer_seconds: Some(run.answer_seconds),
        answer,
        loss_curve: optimizations.iter().flat_map(|o| o.loss_curve.iter().copied()).collect(),
        turn_losses,
        fit_error: mean(run.compressions.iter().filter_map(|c| c.fit_error)),
        peak_rss_mib: memory::peak_rss_bytes().map(|b| b as f64 / (1024.0 * 1024.0)),
        replacement_text: run.compressions.iter().filter_map(|c| c.text.clone()).collect(),
        answers: run.answers,
        batch_cells: 1,
        resumed_steps: optimizations.iter().map(|o| o.resumed_steps).sum(),
        threads: Some(candle_core::utils::get_num_threads()),
        build: Some(crate::BUILD.to_string()),
    }
}
