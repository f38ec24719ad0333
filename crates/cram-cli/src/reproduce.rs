//! `cram reproduce`: the published single-turn sweep and our table beside
//! the published one (Qwen2.5-Coder-7B-Instruct, 8-bit, one consumer GPU).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use cram_eval::results::{read_results, CellResult};

/// The published facts recalled for a case, method and ratio (7B model).
fn published(case: &str, method: &str, ratio: Option<f64>) -> &'static str {
    match (method, ratio) {
        ("full", _) => "3/3",
        ("none", _) if case.starts_with("t8") => "0/3",
        ("none", _) => "2/3",
        ("surprisal", Some(r)) if r <= 3.2 + 1e-9 => "3/3",
        ("surprisal", Some(_)) if case.starts_with("t8") => "2/3",
        ("surprisal", Some(_)) => "<3/3",
        ("uniform", Some(r)) if r <= 1.6 + 1e-9 => "3/3",
        ("uniform", Some(_)) => "<3/3",
        _ => "-",
    }
}

pub fn run(full: bool, overrides: crate::Overrides, out: Option<PathBuf>) -> Result<()> {
    let name = if full { "full" } else { "quick" };
    let config_path = PathBuf::from(format!("configs/reproduce-{name}.toml"));
    let config = cram_eval::sweep::SweepConfig::load(&config_path)?;
    let model_name = overrides.model.clone().unwrap_or(config.model.clone());
    // A path names the run by its file; a model name or repo id by itself.
    let model_label = match model_name.strip_suffix(".gguf") {
        Some(stem) => Path::new(stem).file_name().map_or(stem.to_string(), |s| s.to_string_lossy().into_owned()),
        None => model_name.replace('/', "_"),
    };
    // A fresh run folder: a run computes, and never rewrites committed records.
    let out = out.unwrap_or_else(|| PathBuf::from(format!("runs/reproduce-{name}-{model_label}-{}", timestamp())));
    eprintln!("[reproduce] writing to {} (rerun with --out {0} to resume it)", out.display());
    let config = crate::sweep(&config_path, &out, cram_eval::sweep::Shard::WHOLE, overrides)?;
    let results = read_results(&out.join("results.jsonl"))?;
    let table = table(&results, &config.ratios);
    println!("\n{table}");
    let path = out.join("table.md");
    std::fs::write(&path, &table).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("[reproduce] table written to {}", path.display());
    Ok(())
}

/// Now, UTC, as `20261129-225241`: a run folder's name sorts by time.
fn timestamp() -> String {
    let rfc3339 = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    rfc3339.trim_end_matches('Z').replace('-', "").replace(':', "").replace('T', "-")
}

/// Markdown: one row per case and method, one column per ratio, each cell
/// "ours (published)".
fn table(results: &[CellResult], ratios: &[f64]) -> String {
    let mut cases: Vec<&str> = results.iter().map(|r| r.cell.case.as_str()).collect();
    cases.dedup();
    let mut out = String::from("Facts recalled, ours (published 7B). Baselines in the first column.\n\n| case | method | n tokens |");
    out.push_str(" baseline |");
    for ratio in ratios {
        let _ = write!(out, " {ratio}x |");
    }
    out.push_str("\n|---|---|---|---|");
    out.push_str(&"---|".repeat(ratios.len()));
    out.push('\n');
    for case in cases {
        let of_case: Vec<&CellResult> = results.iter().filter(|r| r.cell.case == case).collect();
        let n_tokens = of_case.first().map_or(0, |r| r.n_tokens);
        let mut methods: Vec<&str> = of_case.iter().map(|r| r.cell.method.as_str()).collect();
        methods.dedup();
        for method in methods {
            let _ = write!(out, "| {case} | {method} | {n_tokens} |");
            let cell = |ratio: Option<f64>| {
                of_case
                    .iter()
                    .find(|r| r.cell.method == method && r.cell.ratio == ratio)
                    .map_or("".to_string(), |r| format!("{}/{} ({})", r.facts_correct, r.facts_total, published(case, method, ratio)))
            };
            let _ = write!(out, " {} |", cell(None));
            for &ratio in ratios {
                let _ = write!(out, " {} |", cell(Some(ratio)));
            }
            out.push('\n');
        }
    }
    out
}
