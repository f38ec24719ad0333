//! Sweeps on a small random model: config errors, the cells' results, and
//! resuming after the process died mid-cell.

use std::path::{Path, PathBuf};

mod common;

use common::write_tiny_case;
use cram::synthetic as random;
use cram_eval::results::{merge_results, read_results};
use cram_eval::sweep::{run_shard, run_sweep, CaseSource, Shard, SweepConfig, SweepEvent};
use cram_eval::render::Rendering;
use cram_eval::EvalError;

/// A random model directory and a transcript in its word vocabulary.
fn fixture(dir: &Path) -> (PathBuf, PathBuf) {
    let model_dir = dir.join("model");
    std::fs::create_dir_all(&model_dir).unwrap();
    let config = random::tiny_config();
    random::write_model_dir(&model_dir, &config, &random::named_weights(&config, 3, &candle_core::Device::Cpu).unwrap()).unwrap();
    let transcript = write_tiny_case(dir, "tiny", 20..44);
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
        if let SweepEvent::UnitStarted { .. } = event {
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
        if let SweepEvent::UnitStarted { cells, .. } = event {
            reran.extend(cells.iter().map(|cell| format!("{} {:?}", cell.method, cell.ratio)));
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
    assert!(full.optimize_seconds == 0.0 && full.optimize_seconds.is_sign_positive(), "no optimization: 0 seconds, not -0");
    let none = results.iter().find(|r| r.cell.method == "none").unwrap();
    assert_eq!(none.n_virtual, 0);
    let threads = candle_core::utils::get_num_threads();
    assert!(results.iter().all(|r| r.threads == Some(threads)), "each line records the CPU threads it ran on");
    assert!(cram_eval::BUILD.starts_with(env!("CARGO_PKG_VERSION")));
    assert!(results.iter().all(|r| r.build.as_deref() == Some(cram_eval::BUILD)), "each line records the build that wrote it");
    assert!(out.join("facts_vs_ratio.svg").exists() && out.join("loss_curves.svg").exists());
    let summary = std::fs::read_to_string(out.join("summary.csv")).unwrap();
    let cell_rows = summary.lines().skip(1).take_while(|line| !line.is_empty());
    let stamp = format!(",{threads},{}", cram_eval::BUILD);
    assert_eq!(cell_rows.filter(|row| row.ends_with(&stamp)).count(), 7, "every cell row ends with its threads and build");
    assert_eq!(outcome.report.builds, [cram_eval::BUILD]);
    assert_eq!(outcome.report.mixed_builds_warning(), None);

    // A line from another build and one from before the stamp (no `build`),
    // as another seed's cells, are named in a warning.
    let mut lines = read_results(&results_path).unwrap();
    lines[0].build = Some("0.0.1+0123456789ab".into());
    lines[1].build = None;
    let mut mixed = std::fs::read_to_string(&results_path).unwrap();
    for line in &mut lines[..2] {
        line.cell.seed += 1;
        mixed.push_str(&format!("{}\n", serde_json::to_string(line).unwrap()));
    }
    std::fs::write(&results_path, mixed).unwrap();
    let report = cram_eval::plot::write_report(&out).unwrap();
    assert_eq!(report.builds, ["0.0.1+0123456789ab", cram_eval::BUILD, cram_eval::plot::UNRECORDED_BUILD]);
    let warning = report.mixed_builds_warning().expect("three builds: a warning");
    assert!(report.builds.iter().all(|build| warning.contains(build.as_str())), "{warning}");

    // Nothing left to do: a third run runs nothing.
    let again = run_sweep(&config, &config_path, &out, &mut |_| Ok(())).unwrap();
    assert_eq!(again.ran, 0);
}

#[test]
fn a_cell_killed_mid_optimization_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (model, cases) = fixture(dir.path());
    let config_path = write_config(dir.path(), &model, &cases, "seeds = [0]\ncheckpoint_seconds = 0");
    // Two cells: surprisal and uniform at 2x.
    let text = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(&config_path, text.replace("[\"full\", \"none\", \"raw\"]", "[]").replace("[2.0, 4.0]", "[2.0]")).unwrap();
    let config = SweepConfig::load(&config_path).unwrap();
    let (killed_out, calm_out) = (dir.path().join("killed"), dir.path().join("calm"));

    // The process dies (a panic, not an error the sweep handles) after the first cell's third step.
    let killed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_sweep(&config, &config_path, &killed_out, &mut |event| {
            if let SweepEvent::Step { step: 2, .. } = event {
                panic!("killed");
            }
            Ok(())
        })
    }));
    assert!(killed.is_err());
    assert!(read_results(&killed_out.join("results.jsonl")).unwrap().is_empty());
    assert_eq!(std::fs::read_dir(killed_out.join("checkpoints")).unwrap().count(), 1);

    run_sweep(&config, &config_path, &killed_out, &mut |_| Ok(())).unwrap();
    run_sweep(&config, &config_path, &calm_out, &mut |_| Ok(())).unwrap();
    let resumed = read_results(&killed_out.join("results.jsonl")).unwrap();
    let calm = read_results(&calm_out.join("results.jsonl")).unwrap();
    assert_eq!(resumed.iter().map(|r| r.resumed_steps).collect::<Vec<_>>(), [3, 0], "the killed cell resumed, the next started afresh");
    for (resumed, calm) in resumed.iter().zip(&calm) {
        assert_eq!((&resumed.cell, &resumed.loss_curve, &resumed.answer), (&calm.cell, &calm.loss_curve, &calm.answer));
    }
    assert!(!killed_out.join("checkpoints").exists(), "a finished cell's checkpoints are removed");
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
    assert!(config_error("batch_virtual_tokens = 0", None).contains("batch_virtual_tokens must be >= 1"));
    let err = config_error("checkpoint_seconds = 1e20", None);
    assert!(err.contains("checkpoint_seconds") && err.contains("must be a number of seconds >= 0"), "{err}");
    for (from, to, expected) in [
        ("lr = 0.01", "lr = nan", "lr NaN must be a finite number >= 0"),
        ("steps = 5", "steps = 5\nbeta1 = 1.0", "beta1 1 must be in [0, 1)"),
        ("steps = 5", "steps = 0", "steps must be >= 1"),
    ] {
        let path = write_config(dir.path(), &model, &cases, "");
        std::fs::write(&path, std::fs::read_to_string(&path).unwrap().replace(from, to)).unwrap();
        let err = SweepConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains(expected), "{err}");
    }
    let twice = dir.path().join("twice.toml");
    std::fs::write(&twice, format!("model = {model:?}\nmethods = [\"surprisal\"]\nratios = [2.0]\n[[cases]]\nfile = {cases:?}\n[[cases]]\nfile = {cases:?}\n")).unwrap();
    let err = SweepConfig::load(&twice).unwrap().load_cases(&twice).unwrap_err().to_string();
    assert!(err.contains("case id `tiny` is named twice"), "{err}");
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

#[test]
fn a_config_without_a_rendering_asks_as_the_case_file_says() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = fixture(dir.path());
    let case_file = dir.path().join("cases.json");
    std::fs::write(&case_file, serde_json::json!({
        "transcript": "tiny.json",
        "render": "turn-markers",
        "cases": [{
            "id": "c", "prefix": [0], "compress": [1], "suffix": [2],
            "questions": [{"id": "q", "question": "t6 t7?", "facts": [{"id": "f", "expect_any": ["t31"]}]}]
        }]
    }).to_string()).unwrap();
    let path = dir.path().join("ask.toml");
    let asked_with = |ask: &str| {
        std::fs::write(&path, format!("model = {model:?}\nmethods = [\"surprisal\"]\nratios = [2.0]\n[[cases]]\nfile = {case_file:?}\n{ask}")).unwrap();
        let config = SweepConfig::load(&path).unwrap();
        let cases = config.load_cases(&path).unwrap();
        config.ask.for_case(&cases[0]).rendering
    };
    assert_eq!(asked_with(""), Rendering::TurnMarkers);
    assert_eq!(asked_with("[ask]\nmax_new_tokens = 8"), Rendering::TurnMarkers);
    assert_eq!(asked_with("[ask]\nrendering = \"chatml\""), Rendering::Chatml);
}

/// A case file whose one case compresses three turns one after the other;
/// the answer sits at the end of the suffix, past its first
/// `suffix_max_tokens` tokens.
fn sequential_fixture(dir: &Path, suffix_max_tokens: usize) -> PathBuf {
    let turn = |from: usize| (from..from + 10).map(|i| format!("t{i}")).collect::<Vec<_>>().join(" ");
    std::fs::write(dir.join("turns.json"), serde_json::json!({
        "id": "turns",
        "messages": [
            {"role": "system", "content": "t1 t2 t3"},
            {"role": "user", "content": turn(20)},
            {"role": "assistant", "content": turn(30)},
            {"role": "user", "content": turn(40)},
            {"role": "user", "content": "t4 t5 t6 t7 t8 t9 t10 t11 t31"}
        ],
        "questions": []
    }).to_string()).unwrap();
    let case_file = dir.join("cases.json");
    std::fs::write(&case_file, serde_json::json!({
        "transcript": "turns.json",
        "cases": [{
            "id": "seq", "kind": "sequential", "prefix": [0], "compress": [1, 2, 3], "suffix": [4],
            "suffix_max_tokens": suffix_max_tokens,
            "questions": [{"id": "q", "question": "t6 t7?", "facts": [{"id": "f", "expect_any": ["t31"]}]}]
        }]
    }).to_string()).unwrap();
    case_file
}

#[test]
fn a_sequential_case_compresses_turn_by_turn_with_every_method() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = fixture(dir.path());
    let cases = sequential_fixture(dir.path(), 4);
    let path = dir.path().join("seq.toml");
    std::fs::write(&path, format!(
        "model = {model:?}\nratios = [2.0]\nbaselines = [\"full\", \"truncated\"]\n\
         methods = [\"surprisal\", {{ method = \"hybrid\", ratios = [2.0] }}, {{ method = \"compress-evict\", ratios = [4.0], window = 4 }}]\n\
         [[cases]]\nfile = {cases:?}\n[optimizer]\nsteps = 2\n[ask]\nrendering = \"chatml\"\nper_fact = true\nmax_new_tokens = 3\n"
    )).unwrap();
    let config = SweepConfig::load(&path).unwrap();
    let out = dir.path().join("out");
    let outcome = run_sweep(&config, &path, &out, &mut |_| Ok(())).unwrap();
    assert_eq!(outcome.total, 5);

    let results = read_results(&out.join("results.jsonl")).unwrap();
    let result = |method: &str| results.iter().find(|r| r.cell.method == method).unwrap();
    let full = result("full");
    // Three turns, each its 10 words inside chat markers.
    let n_tokens = full.n_tokens;
    assert!(n_tokens > 30 && full.n_virtual == n_tokens);
    assert_eq!(result("truncated").n_virtual, 0);

    let surprisal = result("surprisal");
    assert_eq!(surprisal.turn_losses.len(), 3, "one optimization per turn");
    assert_eq!(surprisal.steps, 6);
    assert_eq!(surprisal.loss_curve.len(), 9);
    let per_turn = n_tokens / 3; // the three turns render to the same length
    assert_eq!(surprisal.n_virtual, 3 * (per_turn as f64 / 2.0).round_ties_even() as usize);
    assert_eq!(result("hybrid").n_virtual, surprisal.n_virtual, "the hybrid meets the same ratio");
    assert_eq!(result("compress-evict").n_virtual, 3 * (per_turn as f64 / 4.0).round_ties_even() as usize);
    assert!(results.iter().all(|r| r.peak_rss_mib.is_some_and(|mib| mib > 1.0)));

    // Uncut, the suffix gives the answer away: refused when it is fed.
    sequential_fixture(dir.path(), 100);
    let err = run_sweep(&config, &path, &dir.path().join("out-uncut"), &mut |_| Ok(())).unwrap_err().to_string();
    assert!(err.contains("leaks fact `f`"), "{err}");
}

#[test]
fn method_settings_that_cannot_work_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (model, cases) = fixture(dir.path());
    let path = dir.path().join("evict.toml");
    let write = |methods: &str| {
        std::fs::write(&path, format!("model = {model:?}\nratios = [3.0]\nmethods = [{methods}]\n[[cases]]\nfile = {cases:?}\n")).unwrap();
        SweepConfig::load(&path).map(|_| ()).unwrap_err().to_string()
    };
    let err = write("{ method = \"compress-evict\", ratios = [1.5] }");
    assert!(err.contains("method compress-evict") && err.contains("compresses at 2x first") && err.contains("final 1.5x"), "{err}");
    let err = write("{ method = \"compress-evict\", ratios = [4.0], first_ratio = 4.0 }");
    assert!(err.contains("compresses at 4x first"), "{err}");
    let err = write("{ method = \"snapkv\", windw = 8 }");
    assert!(err.contains("method snapkv") && err.contains("unknown field `windw`"), "{err}");
    let err = write("{ method = \"hybrid\", verbatim_share = 1.5 }");
    assert!(err.contains("method hybrid") && err.contains("verbatim_share 1.5"), "{err}");
    let err = write("{ method = \"hybrid\", ratios = [] }");
    assert!(err.contains("method hybrid has no ratios"), "{err}");
    let err = write("\"hybird\"");
    assert!(err.contains("unknown method `hybird`"), "{err}");
    let err = write("{ method = \"surprisal\", keyweight = 1.0 }");
    assert!(err.contains("method surprisal") && err.contains("unknown field `keyweight`"), "{err}");
    let err = write("3");
    assert!(err.contains("a method entry is a name or a table, not integer"), "{err}");

    // Without top-level ratios, every entry must name its own.
    let without_ratios = |methods: &str| {
        std::fs::write(&path, format!("model = {model:?}\nmethods = [{methods}]\n[[cases]]\nfile = {cases:?}\n")).unwrap();
        SweepConfig::load(&path).map(|_| ())
    };
    without_ratios("{ method = \"hybrid\", ratios = [2.0] }").unwrap();
    let err = without_ratios("{ method = \"hybrid\", ratios = [2.0] }, \"surprisal\"").unwrap_err().to_string();
    assert!(err.contains("method surprisal has no ratios"), "{err}");
}

/// Every config the project ships loads, validates and finds its cases
/// (leak checks included), so a change to the validation cannot silently
/// break a config that is only run by hand.
#[test]
fn every_shipped_config_loads_with_its_cases() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut checked = 0;
    // The configs a user runs, and those kept beside the experiments that ran them.
    let mut dirs = vec![root.join("configs")];
    for experiment in std::fs::read_dir(root.join("experiments")).unwrap() {
        dirs.push(experiment.unwrap().path().join("configs"));
    }
    let files = dirs.iter().filter(|dir| dir.is_dir()).flat_map(|dir| std::fs::read_dir(dir).unwrap()).map(|entry| entry.unwrap().path());
    for path in files {
        if path.extension().is_none_or(|ext| ext != "toml") {
            continue;
        }
        let mut config = SweepConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
        // Case files named beside the config stay; the rest are the repository's.
        let beside = path.parent().unwrap().to_path_buf();
        for source in &mut config.cases {
            if let CaseSource::File { file, .. } = source {
                if !beside.join(&*file).exists() {
                    *file = root.join(&*file);
                }
            }
        }
        let cases = config.load_cases(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(!cram_eval::sweep::plan::cells(&config, &cases).unwrap().is_empty(), "{}", path.display());
        checked += 1;
    }
    assert!(checked >= 18, "only {checked} configs found");
}

#[test]
fn a_side_by_side_sweep_runs_every_method_and_seeds_only_what_is_seeded() {
    let dir = tempfile::tempdir().unwrap();
    let (model, cases) = fixture(dir.path());
    let path = dir.path().join("side.toml");
    std::fs::write(&path, format!(
        "model = {model:?}\nratios = [2.0, 4.0]\nseeds = [0, 1]\nbaselines = []\n\
         methods = [\"snapkv\", \"key-norm\", \"streaming\", \"summary\", {{ method = \"surprisal\", key_weight = 1.0, ratios = [4.0] }},\n\
         {{ method = \"surprisal\", init = \"random\", ratios = [4.0] }}, {{ method = \"surprisal\", early_stop = false, ratios = [4.0] }}]\n\
         [[cases]]\nfile = {cases:?}\n\n[optimizer]\nlr = 0.01\nsteps = 40\nearly_stop = {{ patience = 2, min_improvement = 0.5 }}\n\n\
         [ask]\nrendering = \"chatml\"\nper_fact = true\nmax_new_tokens = 2\n"
    )).unwrap();
    let config = SweepConfig::load(&path).unwrap();
    let out = dir.path().join("out");
    run_sweep(&config, &path, &out, &mut |_| Ok(())).unwrap();
    let results = read_results(&out.join("results.jsonl")).unwrap();
    let cells: Vec<String> = results.iter().map(|r| format!("{} {} {}", r.cell.method, r.cell.ratio.unwrap(), r.cell.seed)).collect();
    assert_eq!(cells, [
        "snapkv 2 0", "snapkv 4 0", "key-norm 2 0", "key-norm 4 0", "streaming 2 0", "streaming 4 0", "summary 2 0", "summary 4 0",
        "surprisal-kv 4 0", "surprisal+random-init 4 0", "surprisal+random-init 4 1", "surprisal-full-budget 4 0",
    ]);
    let n_tokens = results[0].n_tokens;
    for result in &results {
        let budget = (n_tokens as f64 / result.cell.ratio.unwrap()).round_ties_even() as usize;
        match result.cell.method.as_str() {
            "summary" => assert!(result.n_virtual >= 1 && result.n_virtual <= budget),
            _ => assert_eq!(result.n_virtual, budget, "{}", result.cell.method),
        }
    }
    // Early stopping (a 50% improvement every 2 steps) cuts the optimizing
    // cells short, except the one that turns it off.
    let steps = |method: &str| results.iter().find(|r| r.cell.method == method).unwrap().steps;
    assert!(steps("surprisal-kv") < 40, "{}", steps("surprisal-kv"));
    assert_eq!(steps("surprisal-full-budget"), 40);
    assert_eq!(steps("snapkv"), 0);
    // Different seeds of a random start are different runs.
    let random: Vec<_> = results.iter().filter(|r| r.cell.method == "surprisal+random-init").collect();
    assert_ne!(random[0].loss_curve[0], random[1].loss_curve[0]);
}

#[test]
fn side_by_side_settings_that_cannot_work_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (model, cases) = fixture(dir.path());
    let path = dir.path().join("bad.toml");
    let write = |methods: &str, extra: &str| {
        std::fs::write(&path, format!("model = {model:?}\nratios = [3.0]\nmethods = [{methods}]\n{extra}\n[[cases]]\nfile = {cases:?}\n")).unwrap();
        SweepConfig::load(&path).map(|_| ()).unwrap_err().to_string()
    };
    let err = write("{ method = \"snapkv\", init = \"random\" }", "");
    assert!(err.contains("snapkv does not optimize"), "{err}");
    let err = write("\"surprisal\", { method = \"surprisal\", ratios = [2.0] }", "");
    assert!(err.contains("two method entries run as `surprisal`"), "{err}");
    let err = write("{ method = \"surprisal\", key_weight = -1.0 }", "");
    assert!(err.contains("key_weight -1 must be >= 0"), "{err}");
    let err = write("{ method = \"snapkv\", kernel = 4 }", "");
    assert!(err.contains("method snapkv: kernel 4 must be odd"), "{err}");
    let err = write("\"snapkv\"", "[evict]\nkernel = 3");
    assert!(err.contains("unknown field `evict`"), "the old shared section is refused: {err}");
    let err = write("{ method = \"surprisal\", init = \"summary\" }", "");
    assert!(err.contains("init `summary`"), "{err}");
}

/// Runs a sweep of recipes (two poolings, a random start at two seeds, an
/// early-stopping entry and an eviction method) into `out`, with `batching`
/// added to the config; returns its results by cell and the sizes of the
/// units the batchable cells ran in.
fn batching_sweep(dir: &Path, out: &str, batching: &str) -> (Vec<cram_eval::results::CellResult>, Vec<usize>) {
    let (model, cases) = fixture(dir);
    let path = dir.join(format!("{out}.toml"));
    std::fs::write(&path, format!(
        "model = {model:?}\nratios = [2.0, 4.0]\nseeds = [0, 1]\nbaselines = [\"full\"]\n{batching}\n\
         methods = [\"surprisal\", \"uniform\", {{ method = \"surprisal\", init = \"random\", ratios = [3.0] }},\n\
         {{ method = \"uniform\", early_stop = true, ratios = [3.0] }}, \"streaming\"]\n\
         [[cases]]\nfile = {cases:?}\n\n[optimizer]\nlr = 0.01\nsteps = 6\n\n\
         [ask]\nrendering = \"chatml\"\nper_fact = true\nmax_new_tokens = 3\n"
    )).unwrap();
    let config = SweepConfig::load(&path).unwrap();
    let mut batches = Vec::new();
    run_sweep(&config, &path, &dir.join(out), &mut |event| {
        // The units of the cells that may be batched: plain recipes without early stopping.
        if let SweepEvent::UnitStarted { cells, .. } = event {
            if ["surprisal", "uniform", "surprisal+random-init"].contains(&cells[0].method.as_str()) {
                batches.push(cells.len());
            }
        }
        Ok(())
    })
    .unwrap();
    let mut results = read_results(&dir.join(out).join("results.jsonl")).unwrap();
    results.sort_by_key(|r| format!("{} {:?} {}", r.cell.method, r.cell.ratio, r.cell.seed));
    (results, batches)
}

#[test]
fn cells_optimized_together_get_what_each_gets_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (alone, no_batches) = batching_sweep(dir.path(), "alone", "");
    let (together, batches) = batching_sweep(dir.path(), "together", "batch_virtual_tokens = 1000");
    assert_eq!(no_batches, [1; 6], "without batch_virtual_tokens every cell runs alone");
    // Surprisal and uniform at 2x and 4x, and the random start's two seeds:
    // one batch. Early stopping, eviction and the baseline run alone.
    assert_eq!(batches, [6]);
    assert_eq!(alone.len(), together.len());
    for (one, batched) in alone.iter().zip(&together) {
        assert_eq!(one.cell, batched.cell);
        let in_batch = !matches!(one.cell.method.as_str(), "full" | "streaming" | "uniform-early");
        assert_eq!(batched.batch_cells, if in_batch { 6 } else { 1 }, "{:?}", batched.cell);
        assert_eq!((one.n_virtual, one.steps, one.batch_cells), (batched.n_virtual, batched.steps, 1));
        assert_eq!(one.loss_curve.len(), batched.loss_curve.len());
        for (a, b) in one.loss_curve.iter().zip(&batched.loss_curve) {
            assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "{:?}: {a} vs {b}", one.cell);
        }
        assert_eq!(one.answer, batched.answer, "{:?}", one.cell);
    }

    // A cap on virtual tokens splits the batch (the span at 2x alone has more than 8).
    let (capped, capped_batches) = batching_sweep(dir.path(), "capped", "batch_virtual_tokens = 16");
    assert!(alone.iter().any(|r| r.cell.ratio == Some(2.0) && r.n_virtual > 8));
    assert!(capped_batches.len() > 1 && capped_batches.iter().sum::<usize>() == 6, "{capped_batches:?}");
    assert_eq!(capped.len(), alone.len());
}

/// summary.csv without the columns of wall time (which differ between two
/// runs of one cell), each table's rows sorted (a merge keeps the order in
/// which the shards are given, not the order the cells ran in).
fn summary_without_times(dir: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(dir.join("summary.csv")).unwrap();
    text.split("\n\n")
        .map(|table| {
            let mut lines = table.lines();
            let header: Vec<&str> = lines.next().unwrap().split(',').collect();
            let timeless = |line: &str| -> String {
                let fields = line.split(',').zip(&header).filter(|(_, column)| !column.contains("seconds"));
                fields.map(|(field, _)| field).collect::<Vec<_>>().join(",")
            };
            let mut rows: Vec<String> = lines.map(timeless).collect();
            rows.sort();
            rows.insert(0, timeless(&header.join(",")));
            rows
        })
        .collect()
}

#[test]
fn shards_merged_give_the_report_of_the_whole_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let (model, cases) = fixture(dir.path());
    let config_path = write_config(dir.path(), &model, &cases, "seeds = [0, 1]");
    let text = std::fs::read_to_string(&config_path).unwrap();
    let methods = "[\"surprisal\", { method = \"surprisal\", init = \"random\" }, \"streaming\", \"snapkv\"]";
    std::fs::write(&config_path, text.replace("[\"surprisal\", \"uniform\"]", methods).replace("\"raw\"", "\"truncated\"")).unwrap();
    let config = SweepConfig::load(&config_path).unwrap();
    let whole = dir.path().join("whole");
    let outcome = run_sweep(&config, &config_path, &whole, &mut |_| Ok(())).unwrap();
    assert_eq!(outcome.total, 3 + 2 * 4 + 2, "three baselines, four methods at two ratios, the random start's second seed");

    let shard_dirs: Vec<PathBuf> = (1..=3).map(|index| dir.path().join(format!("shard-{index}"))).collect();
    let mut shard_totals = Vec::new();
    for (index, shard_dir) in shard_dirs.iter().enumerate() {
        let shard = Shard::new(index + 1, 3).unwrap();
        shard_totals.push(run_shard(&config, &config_path, shard_dir, shard, &mut |_| Ok(())).unwrap().total);
    }
    assert_eq!(shard_totals.iter().sum::<usize>(), outcome.total);
    let merged_dir = dir.path().join("merged");
    let merged = merge_results(&merged_dir, &shard_dirs).unwrap();
    assert_eq!((merged.cells, merged.duplicates, merged.configs_differ), (outcome.total, 0, false));
    cram_eval::plot::write_report(&merged_dir).unwrap();
    assert_eq!(summary_without_times(&merged_dir), summary_without_times(&whole));
    let comparisons = |dir: &Path| std::fs::read_to_string(dir.join("comparisons.csv")).unwrap();
    assert_eq!(comparisons(&merged_dir), comparisons(&whole));
    assert!(comparisons(&whole).lines().count() > 10, "{}", comparisons(&whole));
    assert_eq!(std::fs::read(merged_dir.join("config.toml")).unwrap(), std::fs::read(whole.join("config.toml")).unwrap());

    // Merging again, or a shard twice, finds the same lines: nothing changes.
    let results_before = std::fs::read_to_string(merged_dir.join("results.jsonl")).unwrap();
    let again = merge_results(&merged_dir, &[shard_dirs.clone(), vec![shard_dirs[0].clone()]].concat()).unwrap();
    assert_eq!((again.cells, again.duplicates), (outcome.total, outcome.total + shard_totals[0]));
    assert_eq!(std::fs::read_to_string(merged_dir.join("results.jsonl")).unwrap(), results_before);

    // A cell with two different lines (here: the whole run's own timing) is refused, and nothing is written.
    let err = merge_results(&merged_dir, std::slice::from_ref(&whole)).unwrap_err().to_string();
    assert!(err.contains("differs from its line in") && err.contains("whole"), "{err}");
    assert_eq!(std::fs::read_to_string(merged_dir.join("results.jsonl")).unwrap(), results_before);
    let err = merge_results(&merged_dir, &[dir.path().join("no-such-shard")]).unwrap_err().to_string();
    assert!(err.contains("no-such-shard") && err.contains("not a sweep's output folder"), "{err}");
}

/// The cells of one case share its span's forward (one per set of needs)
/// and give each what the cell gives run alone: the same answers and
/// entries; each line records its answering seconds apart.
#[test]
fn cells_sharing_a_span_forward_give_what_each_gives_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (model_dir, cases) = fixture(dir.path());
    let path = dir.path().join("sweep.toml");
    std::fs::write(&path, format!(
        "model = {model_dir:?}\nmethods = [\"streaming\", \"snapkv\", \"attention-matching\", {{ method = \"attention-matching\", queries = \"context\" }}, \"kvzip\"]\n\
         baselines = [\"truncated\"]\nratios = [2.0, 4.0]\n\
         [[cases]]\nfile = {cases:?}\n\n[ask]\nrendering = \"chatml\"\nper_fact = true\nmax_new_tokens = 4\n"
    )).unwrap();
    let config = SweepConfig::load(&path).unwrap();
    let out = dir.path().join("out");
    run_sweep(&config, &path, &out, &mut |_| Ok(())).unwrap();
    let lines = read_results(&out.join("results.jsonl")).unwrap();
    assert_eq!(lines.len(), 11, "5 methods at 2 ratios, and the truncated span");

    let model = cram::Model::load(&cram::ModelSource::safetensors_dir(&model_dir), &candle_core::Device::Cpu).unwrap();
    let case = &config.load_cases(&path).unwrap()[0];
    for line in &lines {
        let ratio = line.cell.ratio.unwrap_or(1.0);
        let compressor: Box<dyn cram::Compressor> = match line.cell.method.as_str() {
            "truncated" => Box::new(cram::Truncate),
            // The span's own queries: targets of other needs than the rest.
            "attention-matching-context-spread" => {
                let knobs = serde_json::json!({ "queries": "context" });
                cram::registry::method("attention-matching").unwrap().build(&cram::registry::MethodOptions { knobs, ..cram::registry::MethodOptions::new(ratio) }).unwrap()
            }
            "attention-matching-spread" => cram::registry::method("attention-matching").unwrap().build(&cram::registry::MethodOptions::new(ratio)).unwrap(),
            name => cram::registry::method(name).unwrap().build(&cram::registry::MethodOptions::new(ratio)).unwrap(),
        };
        let alone = cram_eval::evaluate::run_case(&model, case, &config.ask.for_case(case), cram_eval::evaluate::Condition::Compressed(compressor.as_ref()), &mut |_, _| {})
            .unwrap()
            .remove(0);
        let answers = |answered: &[cram_eval::evaluate::Answered]| answered.iter().map(|a| a.answer.clone()).collect::<Vec<_>>();
        assert_eq!((answers(&line.answers), line.n_virtual), (answers(&alone.answers), alone.n_kept), "{} at {ratio}", line.cell.method);
        assert!(line.answer_seconds.is_some_and(|seconds| seconds > 0.0));
    }
}
