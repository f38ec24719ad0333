//! Slices of a sweep for machines that run parts of it at once (`cram
//! sweep --shard I/N`, one Slurm array task each). Every shard plans the
//! whole sweep and keeps its slice by a fixed rule, so the N shards of one
//! config (and one set of overrides) partition its cells wherever and
//! whenever they run; their results merge back into one report
//! ([`crate::results::merge_results`]).

use std::collections::hash_map::{Entry, HashMap};
use std::fmt;
use std::str::FromStr;

use super::config::SweepConfig;
use super::plan::{batchable_recipe, CellKind};
use crate::cases::Case;
use crate::results::Cell;
use crate::Result;

/// The `index`-th of `count` slices, counted from 1 as a Slurm array's
/// task ids (`--array=1-N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    index: usize,
    count: usize,
}

impl Shard {
    /// The whole sweep as one slice.
    pub const WHOLE: Shard = Shard { index: 1, count: 1 };

    pub fn new(index: usize, count: usize) -> std::result::Result<Self, String> {
        if count == 0 {
            return Err("a sweep splits into 1 shard or more, not 0".into());
        }
        if !(1..=count).contains(&index) {
            return Err(format!("shard {index}/{count}: I runs from 1 to {count} (a Slurm array from 1: --array=1-{count})"));
        }
        Ok(Self { index, count })
    }

    /// This shard's cells of the sweep's `cells` (all of them, as planned
    /// for `cases`), in their order.
    pub fn select(&self, config: &SweepConfig, cases: &[Case], cells: Vec<(Cell, CellKind)>) -> Result<Vec<(Cell, CellKind)>> {
        let shard_of = assign(&groups(config, cases, &cells)?, cells.len(), self.count);
        Ok(cells.into_iter().zip(shard_of).filter(|(_, shard)| *shard == self.index - 1).map(|(cell, _)| cell).collect())
    }
}

impl FromStr for Shard {
    type Err = String;

    /// `I/N`, as `$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`.
    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let parse = |part: &str| part.trim().parse::<usize>().ok();
        match text.split_once('/').map(|(index, count)| (parse(index), parse(count))) {
            Some((Some(index), Some(count))) => Shard::new(index, count),
            _ => Err(format!("`{text}`: a shard is I/N, two whole numbers such as 2/8")),
        }
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// The cells that must run in one shard, as indices into `cells`, in the
/// order of each group's first cell: when the config optimises recipe
/// cells together (`batch_virtual_tokens`), a case's batchable cells, so
/// that sharding loses no batch; every other cell alone.
fn groups(config: &SweepConfig, cases: &[Case], cells: &[(Cell, CellKind)]) -> Result<Vec<Vec<usize>>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut group_of_case: HashMap<&str, usize> = HashMap::new();
    for (index, (cell, kind)) in cells.iter().enumerate() {
        let case = cases.iter().find(|case| case.id == cell.case);
        let batched = match case {
            Some(case) if config.batch_virtual_tokens.is_some() => batchable_recipe(config, *kind, case)?.is_some(),
            _ => false,
        };
        if !batched {
            groups.push(vec![index]);
            continue;
        }
        match group_of_case.entry(&cell.case) {
            Entry::Occupied(group) => groups[*group.get()].push(index),
            Entry::Vacant(slot) => {
                slot.insert(groups.len());
                groups.push(vec![index]);
            }
        }
    }
    Ok(groups)
}

/// The shard (from 0) of each cell: each group in turn goes to the shard
/// with the fewest cells so far (the first of equals). Cells alone are
/// thus dealt round the shards, so that every method's ratios spread over
/// them, and two shards never differ by more than the largest group.
fn assign(groups: &[Vec<usize>], n_cells: usize, count: usize) -> Vec<usize> {
    let mut sizes = vec![0usize; count];
    let mut shard_of = vec![0; n_cells];
    for group in groups {
        let emptiest = (0..count).min_by_key(|&shard| (sizes[shard], shard)).unwrap_or(0);
        sizes[emptiest] += group.len();
        for &cell in group {
            shard_of[cell] = emptiest;
        }
    }
    shard_of
}
