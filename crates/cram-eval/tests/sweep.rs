//! Sweeps on a small random model: config errors, the cells' results, and
//! resuming after the process died mid-cell.

use std::path::{Path, PathBuf};

use cram::random;
use cram_eval::sweep::{read_results, run_sweep, SweepConfig, SweepEvent};
use cram_eval::EvalError;

/// A random model directory and a transcript in its word vocabulary.
fn fixture(dir: &Path) -> (PathBuf, PathBuf) {
    let model_dir = dir.join("model");
    std::fs::create_dir_all(&model_dir).unwrap();
    let config = random::tiny_config();
    random::write_model_dir(&model_dir, &config, &random::named_weights(&config, 3, &candle_core::Device::Cpu).unwrap()).unwrap();
    let transcript = dir.join("tiny.json");
    let span: Vec<String> = (20..44).map(|i| format!("t{i}")).collect();
    std::fs::write(&transcript, serde_json::json!({
        "id": "tiny",
        "messages": [
            {"role": "system", "content": "t1 t2 t3"},
            {"role": "user", "content": span.join(" ")},
            {"role": "user", "content": "t4 t5"}
        ],
        "questions": [{"id": "q", "question": "t6 t7?", "facts": [{"id": "f", "expect_any": ["t31"]}]}]
    }).to_string()).unwrap();
    (model_dir, transcript)
}

fn write_config(dir: &Path, model: &Path, cases: &Path, extra: &str) -> PathBuf {
    let path = dir.join("sweep.toml");
    let text = format!(
        "model = {model:?}\nmethods = [\"surprisal\", \"uniform\"]\nbaselines = [\"full\", \"none\", \"raw\"]\nratios = [2.0, 4.0]\n{extra}\n\
         [[cases]]\nfile = {cases:?}\n\n[optimizer]\nlr = 0.01\nsteps = 5\n\n[ask]\nrendering = \"chatml\"\nper_fact = true\nmax_new_tokens = 4\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_sweep_runs_every_cell_once_and_resumes_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (model, cases) = fixture(dir.path());
    let config_path = write_config(dir.path(), &model, &cases, "seeds = [0]");
    let config = SweepConfig::load(&config_path).unwrap();
    let out = dir.path().join("out");

    // The process "dies" as the fifth cell starts: four lines are on disk.
    let mut started = 0;
    let crash = run_sweep(&config, &config_path, &out, &mut |event| {
        if let SweepEvent::CellStarted { .. } = event {
            started += 1;
            if started == 5 {
                return Err(EvalError::Fetch("killed".into()));
            }
        }
        Ok(())
    });
    assert!(crash.is_err());
    assert_eq!(read_results(&out.join("results.jsonl")).unwrap().len(), 4);

    // A crash while writing leaves a cut line; it is dropped, not fatal.
    let results_path = out.join("results.jsonl");
    let mut text = std::fs::read_to_string(&results_path).unwrap();
    text.push_str("{\"case\": \"tiny\", \"meth");
    std::fs::write(&results_path, text).unwrap();

    let mut reran = Vec::new();
    let outcome = run_sweep(&config, &config_path, &out, &mut |event| {
        if let SweepEvent::CellStarted { cell, .. } = event {
            reran.push(format!("{} {:?}", cell.method, cell.ratio));
        }
        Ok(())
    })
    .unwrap();
    assert_eq!((outcome.total, outcome.skipped, outcome.ran), (7, 4, 3));
    assert_eq!(reran, ["surprisal Some(4.0)", "uniform Some(2.0)", "uniform Some(4.0)"], "only unfinished cells rerun");

    let results = read_results(&results_path).unwrap();
    assert_eq!(results.len(), 7);
    let surprisal_2x = results.iter().find(|r| r.cell.method == "surprisal" && r.cell.ratio == Some(2.0)).unwrap();
    let n_tokens = surprisal_2x.n_tokens;
    assert!(n_tokens >= 24, "the span's 24 words and its chat markers");
    assert_eq!(surprisal_2x.n_virtual, (n_tokens as f64 / 2.0).round_ties_even() as usize);
    assert_eq!(surprisal_2x.steps, 5);
    assert_eq!(surprisal_2x.loss_curve.len(), 6);
    let full = results.iter().find(|r| r.cell.method == "full").unwrap();
    assert_eq!((full.n_virtual, full.n_tokens, full.facts_total), (n_tokens, n_tokens, 1));
    let none = results.iter().find(|r| r.cell.method == "none").unwrap();
    assert_eq!(none.n_virtual, 0);
    assert!(out.join("summary.csv").exists() && out.join("facts_vs_ratio.svg").exists() && out.join("loss_curves.svg").exists());

    // Nothing left to do: a third run runs nothing.
    let again = run_sweep(&config, &config_path, &out, &mut |_| Ok(())).unwrap();
    assert_eq!(again.ran, 0);
}

fn config_error(extra: &str, cases_file: Option<&str>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (model, cases) = fixture(dir.path());
    let cases = cases_file.map_or(cases, |name| dir.path().join(name));
    let path = write_config(dir.path(), &model, &cases, extra);
    let config = match SweepConfig::load(&path) {
        Ok(config) => config,
        Err(e) => return e.to_string(),
    };
    match config.load_cases(&path) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_configs_are_clear_errors() {
    assert!(config_error("ratioz = [3.0]", None).contains("unknown field `ratioz`"));
    let not_compressing = config_error("", None).is_empty();
    assert!(not_compressing, "the fixture config itself is valid");
    let dir = tempfile::tempdir().unwrap();
    let (model, cases) = fixture(dir.path());
    let path = dir.path().join("ratio.toml");
    std::fs::write(&path, format!("model = {model:?}\nmethods = [\"surprisal\"]\nratios = [3.2, 1.0]\n[[cases]]\nfile = {cases:?}\n")).unwrap();
    let err = SweepConfig::load(&path).unwrap_err().to_string();
    assert!(err.contains("ratio 1 is not > 1") && err.contains("virtual tokens"), "{err}");
    assert!(config_error("", Some("missing.json")).contains("case file"));
    let err = config_error("", Some("missing.json"));
    assert!(err.contains("not found"), "{err}");

    // A case that leaks its answer into the kept suffix.
    let leaky = dir.path().join("leaky.json");
    std::fs::write(&leaky, serde_json::json!({
        "id": "leaky",
        "messages": [{"role": "system", "content": "t1"}, {"role": "user", "content": "t31 t32"}, {"role": "user", "content": "t31"}],
        "questions": [{"id": "q", "question": "t6?", "facts": [{"id": "f", "expect_any": ["t31"]}]}]
    }).to_string()).unwrap();
    let path = write_config(dir.path(), &model, &leaky, "");
    let err = SweepConfig::load(&path).unwrap().load_cases(&path).unwrap_err().to_string();
    assert!(err.contains("leaks fact `f`"), "{err}");
}
