//! What a sweep runs: every cell (case x method x ratio x seed), and the
//! units they run in. A unit is the cells of one case that share one
//! compression: a cell alone, or plain recipe cells optimised together
//! (`batch_virtual_tokens`).

use std::collections::HashSet;

use cram::{Compressor, Model, RawSpan, Recipe, Truncate};

use super::config::{Baseline, SweepConfig};
use crate::cases::Case;
use crate::evaluate::Condition;
use crate::results::Cell;
use crate::Result;

/// What a cell runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CellKind {
    Baseline(Baseline),
    /// `methods[entry]` at `ratio`, with `seed`.
    Compressed { entry: usize, ratio: f64, seed: u64 },
}

/// Cells of one case run by one compression.
pub struct WorkUnit<'a> {
    pub case: &'a Case,
    pub cells: Vec<&'a (Cell, CellKind)>,
}

/// What a unit's compression is, built from the config.
pub enum Compression {
    /// The span verbatim, or nothing.
    Reference(Baseline),
    /// One compressor.
    Alone(Box<dyn Compressor>),
    /// Plain recipes of one span, optimised together.
    Together(Vec<Recipe>),
}

impl Compression {
    /// The condition the case runs under.
    pub fn condition(&self) -> Condition<'_> {
        match self {
            Compression::Reference(Baseline::None) => Condition::NoContext,
            Compression::Reference(_) => Condition::Full,
            Compression::Alone(compressor) => Condition::Compressed(compressor.as_ref()),
            Compression::Together(recipes) => Condition::Together(recipes),
        }
    }

    /// Whether it optimises (and so reports steps).
    pub fn optimizes(&self, config: &SweepConfig, unit: &WorkUnit) -> bool {
        match self {
            Compression::Together(_) => true,
            _ => unit.cells.iter().any(|(_, kind)| {
                matches!(kind, CellKind::Compressed { entry, .. } if config.methods[*entry].registered().is_ok_and(|m| m.optimizes()))
            }),
        }
    }
}

/// Every cell of the sweep, baselines first.
pub fn cells(config: &SweepConfig, cases: &[Case]) -> Result<Vec<(Cell, CellKind)>> {
    let labels: Vec<String> =
        config.methods.iter().map(|entry| config.label(entry)).collect::<std::result::Result<_, _>>().map_err(cram::Error::Invalid)?;
    let mut cells = Vec::new();
    for case in cases {
        for &baseline in &config.baselines {
            let cell = Cell { case: case.id.clone(), method: baseline.name().into(), ratio: None, seed: 0 };
            cells.push((cell, CellKind::Baseline(baseline)));
        }
        for (entry_index, (entry, label)) in config.methods.iter().zip(&labels).enumerate() {
            let seeds = if entry.seeded() { &config.seeds[..] } else { &config.seeds[..1] };
            for &ratio in entry.ratios(&config.ratios) {
                for &seed in seeds {
                    let cell = Cell { case: case.id.clone(), method: label.clone(), ratio: Some(ratio), seed };
                    cells.push((cell, CellKind::Compressed { entry: entry_index, ratio, seed }));
                }
            }
        }
    }
    Ok(cells)
}

/// The compression of a unit's cells.
pub fn compression(config: &SweepConfig, unit: &WorkUnit) -> Result<Compression> {
    if let [(_, kind)] = unit.cells.as_slice() {
        return Ok(match *kind {
            CellKind::Baseline(Baseline::Raw) => Compression::Alone(Box::new(RawSpan)),
            CellKind::Baseline(Baseline::Truncated) => Compression::Alone(Box::new(Truncate)),
            CellKind::Baseline(reference) => Compression::Reference(reference),
            CellKind::Compressed { entry, ratio, seed } => Compression::Alone(config.compressor(&config.methods[entry], ratio, seed)?),
        });
    }
    let recipes = unit.cells.iter().map(|(_, kind)| batchable_recipe(config, *kind, unit.case)?.ok_or_else(|| {
        cram::Error::Invalid("only plain recipe cells of a single-turn case are optimised together".into()).into()
    }));
    Ok(Compression::Together(recipes.collect::<Result<_>>()?))
}

/// The recipe of a cell that may be optimised together with others of
/// its case: a plain recipe (any pooling, start or key weight) without
/// early stopping, on a single-turn case.
pub(super) fn batchable_recipe(config: &SweepConfig, kind: CellKind, case: &Case) -> Result<Option<Recipe>> {
    let CellKind::Compressed { entry, ratio, seed } = kind else { return Ok(None) };
    let recipe = config.plain_recipe(&config.methods[entry], ratio, seed)?;
    Ok(recipe.filter(|recipe| recipe.optimizer.early_stop.is_none() && case.turns().len() == 1))
}

/// The pending cells in order as units: batchable cells of a case
/// gathered (at the place of their case's first) into batches of at
/// most `batch_virtual_tokens` virtual tokens; every other cell alone,
/// and every cell alone when that is unset.
pub fn work_units<'a>(config: &SweepConfig, model: &Model, cases: &'a [Case], pending: &[&'a (Cell, CellKind)]) -> Result<Vec<WorkUnit<'a>>> {
    let mut units = Vec::new();
    let mut batched_cases = HashSet::new();
    for &cell_and_kind in pending {
        let (cell, kind) = cell_and_kind;
        let Some(case) = cases.iter().find(|c| c.id == cell.case) else { continue };
        let batchable = config.batch_virtual_tokens.is_some() && batchable_recipe(config, *kind, case)?.is_some();
        if !batchable {
            units.push(WorkUnit { case, cells: vec![cell_and_kind] });
        } else if batched_cases.insert(&case.id) {
            let mut of_case = Vec::new();
            for &other in pending.iter().filter(|(c, _)| c.case == case.id) {
                if let Some(recipe) = batchable_recipe(config, other.1, case)? {
                    of_case.push((other, recipe.ratio));
                }
            }
            let n_tokens = span_tokens(config, model, case)?;
            for cells in fill_batches(of_case, n_tokens, config.batch_virtual_tokens.unwrap_or(usize::MAX))? {
                units.push(WorkUnit { case, cells });
            }
        }
    }
    Ok(units)
}

/// Optimisation steps of a compressed cell, over all its turns (for progress bars).
pub fn total_steps(config: &SweepConfig, model: &Model, case: &Case) -> usize {
    turn_tokens(config, model, case).map(|n_tokens| config.optimizer.steps_for(n_tokens.unwrap_or(0))).sum()
}

/// Tokens of a single-turn case's span as rendered.
fn span_tokens(config: &SweepConfig, model: &Model, case: &Case) -> Result<usize> {
    Ok(turn_tokens(config, model, case).sum::<cram::Result<usize>>()?)
}

/// Tokens of each compressed turn of a case, as rendered.
fn turn_tokens<'a>(config: &'a SweepConfig, model: &'a Model, case: &'a Case) -> impl Iterator<Item = cram::Result<usize>> + 'a {
    case.turns().into_iter().map(move |turn| {
        let text = config.ask.for_case(case).rendering.messages(&case.transcript.messages, &turn);
        model.tokenizer.encode(&text).map(|ids| ids.len())
    })
}

/// Consecutive batches of at most `max_virtual` virtual tokens (a cell
/// larger than that is a batch of its own).
fn fill_batches<'a>(cells: Vec<(&'a (Cell, CellKind), f64)>, n_tokens: usize, max_virtual: usize) -> Result<Vec<Vec<&'a (Cell, CellKind)>>> {
    let mut batches: Vec<Vec<&(Cell, CellKind)>> = Vec::new();
    let mut filled = 0;
    for (cell, ratio) in cells {
        let n_virtual = cram::budget(n_tokens, ratio)?;
        match batches.last_mut() {
            Some(batch) if filled + n_virtual <= max_virtual => batch.push(cell),
            _ => {
                batches.push(vec![cell]);
                filled = 0;
            }
        }
        filled += n_virtual;
    }
    Ok(batches)
}
