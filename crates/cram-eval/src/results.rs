//! A sweep's results: one JSON line per finished cell in `results.jsonl`,
//! appended the moment the cell finishes, read back by reruns (to skip
//! finished cells) and by the report, and merged from a sharded sweep's
//! folders into one.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

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
    /// a resume included. A case's cells share its first turn's forward
    /// (one per set of needs, cells optimised together aside): only the
    /// first cell that needed it ran it ([`CellResult::seconds_alone`]
    /// counts it in every cell).
    pub seconds: f64,
    /// Seconds spent optimizing.
    pub optimize_seconds: f64,
    /// Seconds compressing (the span's forward, scoring, fitting or
    /// optimizing), summed over compressed turns; 0 in a batch, whose
    /// optimization is `optimize_seconds`. A forward shared by the cells of
    /// a case counts in each: this is what the compaction costs alone.
    #[serde(default)]
    pub compress_seconds: f64,
    /// Seconds on the suffix and the answers (absent from lines written
    /// before it was recorded: there `seconds - compress_seconds` was it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_seconds: Option<f64>,
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
    let Some(text) = read_if_present(path)? else { return Ok(Vec::new()) };
    let complete = complete_lines(&text);
    if complete.len() != text.len() {
        std::fs::write(path, complete).map_err(|e| EvalError::io(path, e))?;
    }
    parse_lines(complete, path)
}

/// The text of `path`; None when there is no such file.
fn read_if_present(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(EvalError::io(path, e)),
    }
}

/// The text up to its last newline: what was written whole.
fn complete_lines(text: &str) -> &str {
    match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    }
}

fn parse_lines(text: &str, path: &Path) -> Result<Vec<CellResult>> {
    text.lines()
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

/// What [`merge_results`] gathered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    /// Cells in the merged `results.jsonl`.
    pub cells: usize,
    /// Lines met again, the same (a folder given twice, or a merge rerun).
    pub duplicates: usize,
    /// Whether the shards' `config.toml` differ: shards of different
    /// configs or overrides slice the cells differently, so some may be
    /// missing. When they agree, the merged folder gets a copy.
    pub configs_differ: bool,
    /// Case files copied from the shards' `cases/` into the merged one.
    pub case_files: usize,
}

/// Writes `out_dir/results.jsonl` as the union of its own lines (if any)
/// and every shard folder's, in the order first met. A cell in two places
/// must be the same line in both: two different lines of one cell are an
/// error naming both places. The shards' files are only read (a shard may
/// still be running): a last line cut short is left out, not removed.
/// The shards' case files go to `out_dir/cases/` too, where the report
/// reads each fact's kind and placement ([`merge_cases`]).
pub fn merge_results(out_dir: &Path, shard_dirs: &[PathBuf]) -> Result<Merged> {
    let cases = merge_cases(out_dir, shard_dirs)?;
    let out_path = out_dir.join("results.jsonl");
    let mut merged: Vec<(CellResult, serde_json::Value, PathBuf)> = Vec::new();
    let mut index_of: HashMap<String, usize> = HashMap::new();
    let mut duplicates = 0;
    let mut sources = vec![out_path.clone()];
    sources.extend(shard_dirs.iter().map(|dir| dir.join("results.jsonl")));
    for (source_index, path) in sources.iter().enumerate() {
        let text = match read_if_present(path)? {
            Some(text) => text,
            None if source_index == 0 => continue, // a fresh merged folder
            None => return Err(EvalError::Transcript { path: path.clone(), reason: "no such file: not a sweep's output folder".into() }),
        };
        for result in parse_lines(complete_lines(&text), path)? {
            let line = serde_json::to_value(&result).map_err(|e| EvalError::io(path, e.into()))?;
            match index_of.get(&result.cell.key()) {
                Some(&first) if merged[first].1 == line => duplicates += 1,
                Some(&first) => {
                    let reason = format!("cell {} differs from its line in {}", result.cell.key(), merged[first].2.display());
                    return Err(EvalError::Transcript { path: path.clone(), reason });
                }
                None => {
                    index_of.insert(result.cell.key(), merged.len());
                    merged.push((result, line, path.clone()));
                }
            }
        }
    }
    std::fs::create_dir_all(out_dir).map_err(|e| EvalError::io(out_dir, e))?;
    let results: Vec<CellResult> = merged.into_iter().map(|(result, _, _)| result).collect();
    write_results(&out_path, &results)?;
    let configs_differ = !copy_common_config(out_dir, shard_dirs)?;
    let cases_dir = out_dir.join("cases");
    if !cases.is_empty() {
        std::fs::create_dir_all(&cases_dir).map_err(|e| EvalError::io(&cases_dir, e))?;
    }
    for (name, (text, _)) in &cases {
        let path = cases_dir.join(name);
        std::fs::write(&path, text).map_err(|e| EvalError::io(&path, e))?;
    }
    Ok(Merged { cells: results.len(), duplicates, configs_differ, case_files: cases.len() })
}

/// The case files (`cases/*.json`) of the merged folder and of every shard,
/// by file name, each with where it was first met; checked before anything
/// is written. Shards of one sweep write the same cases, so a name met
/// twice must hold the same text: two texts under one name are an error
/// naming both places.
fn merge_cases(out_dir: &Path, shard_dirs: &[PathBuf]) -> Result<std::collections::BTreeMap<String, (String, PathBuf)>> {
    let mut cases: std::collections::BTreeMap<String, (String, PathBuf)> = std::collections::BTreeMap::new();
    for dir in std::iter::once(out_dir).chain(shard_dirs.iter().map(PathBuf::as_path)) {
        let cases_dir = dir.join("cases");
        if !cases_dir.is_dir() {
            continue;
        }
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&cases_dir)
            .map_err(|e| EvalError::io(&cases_dir, e))?
            .map(|entry| entry.map(|entry| entry.path()).map_err(|e| EvalError::io(&cases_dir, e)))
            .collect::<Result<_>>()?;
        paths.retain(|path| path.extension().is_some_and(|ext| ext == "json"));
        paths.sort();
        for path in paths {
            let name = path.file_name().expect("a listed file has a name").to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&path).map_err(|e| EvalError::io(&path, e))?;
            match cases.get(&name) {
                Some((first, _)) if *first == text => {}
                Some((_, first_path)) => {
                    let reason = format!("case file {name} differs from {}", first_path.display());
                    return Err(EvalError::Transcript { path, reason });
                }
                None => {
                    cases.insert(name, (text, path));
                }
            }
        }
    }
    Ok(cases)
}

/// Copies the shards' `config.toml` into `out_dir` when they are all the
/// same; whether they were.
fn copy_common_config(out_dir: &Path, shard_dirs: &[PathBuf]) -> Result<bool> {
    let configs: Vec<Option<String>> = shard_dirs.iter().map(|dir| read_if_present(&dir.join("config.toml"))).collect::<Result<_>>()?;
    let Some(Some(first)) = configs.first() else { return Ok(false) };
    if configs.iter().any(|config| config.as_ref() != Some(first)) {
        return Ok(false);
    }
    let path = out_dir.join("config.toml");
    std::fs::write(&path, first).map_err(|e| EvalError::io(&path, e))?;
    Ok(true)
}

/// Replaces `path` with these lines, whole or not at all: written beside
/// it, then renamed over it.
fn write_results(path: &Path, results: &[CellResult]) -> Result<()> {
    let mut text = String::new();
    for result in results {
        text.push_str(&serde_json::to_string(result).map_err(|e| EvalError::io(path, e.into()))?);
        text.push('\n');
    }
    let partial = path.with_extension("jsonl.partial");
    std::fs::write(&partial, text).map_err(|e| EvalError::io(&partial, e))?;
    std::fs::rename(&partial, path).map_err(|e| EvalError::io(path, e))
}

/// Appends one line and syncs it to disk.
pub fn append_result(path: &Path, result: &CellResult) -> Result<()> {
    let mut line = serde_json::to_string(result).map_err(|e| EvalError::io(path, e.into()))?;
    line.push('\n');
    let mut file = OpenOptions::new().create(true).append(true).open(path).map_err(|e| EvalError::io(path, e))?;
    file.write_all(line.as_bytes()).and_then(|_| file.sync_data()).map_err(|e| EvalError::io(path, e))
}

impl CellResult {
    /// What the cell costs run alone: its compaction, a shared forward
    /// included, and its answers. A cell that compressed nothing, or was
    /// optimised in a batch, or was written before `answer_seconds` was
    /// recorded: its wall time.
    pub fn seconds_alone(&self) -> f64 {
        match self.answer_seconds {
            Some(answering) if self.compress_seconds > 0.0 => self.compress_seconds + answering,
            _ => self.seconds,
        }
    }
}

/// A minimal results line for tests: `case`, `method` at `ratio` (seed 0)
/// over a span of `n_tokens`, one question per fact with its verdict.
#[cfg(test)]
pub(crate) fn test_line(case: &str, method: &str, ratio: Option<f64>, n_tokens: usize, verdicts: &[(&str, bool)]) -> CellResult {
    let answers: Vec<serde_json::Value> = verdicts
        .iter()
        .map(|(fact, recalled)| serde_json::json!({ "question_id": fact, "question": "", "answer": "", "facts": [[fact, recalled]] }))
        .collect();
    serde_json::from_value(serde_json::json!({
        "case": case, "method": method, "ratio": ratio, "seed": 0, "model": "m", "n_tokens": n_tokens, "n_virtual": 5,
        "facts_correct": verdicts.iter().filter(|(_, recalled)| *recalled).count(), "facts_total": verdicts.len(),
        "loss_final": null, "steps": 0, "seconds": 0.0, "optimize_seconds": 0.0, "answer": "", "answers": answers, "loss_curve": [],
    }))
    .expect("a minimal results line")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cell that used a shared forward costs, alone, its compaction
    /// (forward counted) and its answers; other cells their wall time.
    #[test]
    fn a_cell_alone_costs_its_compaction_and_answers_or_its_wall_time() {
        let shared = CellResult { seconds: 20.0, compress_seconds: 17.0, answer_seconds: Some(11.0), ..test_line("c", "snapkv", Some(2.0), 10, &[]) };
        assert_eq!(shared.seconds_alone(), 28.0);
        let older = CellResult { answer_seconds: None, ..shared.clone() };
        assert_eq!(older.seconds_alone(), 20.0);
        let baseline = CellResult { compress_seconds: 0.0, ..shared };
        assert_eq!(baseline.seconds_alone(), 20.0);
    }

    fn shard(dir: &Path, lines: &[CellResult], cases: &[(&str, &str)]) -> PathBuf {
        std::fs::create_dir_all(dir.join("cases")).unwrap();
        write_results(&dir.join("results.jsonl"), lines).unwrap();
        for (name, text) in cases {
            std::fs::write(dir.join("cases").join(name), text).unwrap();
        }
        dir.to_path_buf()
    }

    /// The merged folder gets every shard's case files, each once; a file
    /// that two shards hold with different texts is refused before
    /// anything is written.
    #[test]
    fn merged_shards_bring_their_case_files() {
        let dir = tempfile::tempdir().unwrap();
        let line = |case: &str| test_line(case, "full", None, 10, &[("f", true)]);
        let first = shard(&dir.path().join("a"), &[line("c1")], &[("c1.json", "{\"id\": 1}"), ("shared.json", "same")]);
        let second = shard(&dir.path().join("b"), &[line("c2")], &[("c2.json", "{\"id\": 2}"), ("shared.json", "same"), ("notes.txt", "not a case")]);
        let merged_dir = dir.path().join("merged");
        let merged = merge_results(&merged_dir, &[first.clone(), second]).unwrap();
        assert_eq!((merged.cells, merged.case_files), (2, 3));
        let mut names: Vec<String> = std::fs::read_dir(merged_dir.join("cases")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        assert_eq!(names, ["c1.json", "c2.json", "shared.json"]);
        assert_eq!(std::fs::read_to_string(merged_dir.join("cases/c2.json")).unwrap(), "{\"id\": 2}");

        let clash = shard(&dir.path().join("c"), &[line("c3")], &[("shared.json", "other")]);
        let before = std::fs::read_to_string(merged_dir.join("results.jsonl")).unwrap();
        let err = merge_results(&merged_dir, &[first, clash]).unwrap_err().to_string();
        assert!(err.contains("shared.json") && err.contains("differs"), "{err}");
        assert_eq!(std::fs::read_to_string(merged_dir.join("results.jsonl")).unwrap(), before);
        assert!(!merged_dir.join("cases/c3.json").exists());
    }
}
