//! Bad input ends the `cram` binary with a clear message and a non-zero exit
//! status, never a panic.

use std::process::{Command, Output};

fn cram(args: &[&str], home: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cram"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .env("CRAM_HOME", home)
        .env("HF_HOME", home.join("hf"))
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .expect("the cram binary runs")
}

fn assert_clean_failure(output: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "exit status was success; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    assert!(stderr.contains(expected), "stderr lacks `{expected}`: {stderr}");
}

#[test]
fn a_missing_gguf() {
    let home = tempfile::tempdir().unwrap();
    let output = cram(&["check", "--model", "/nonexistent/model.gguf"], home.path());
    assert_clean_failure(&output, "file not found");
}

#[test]
fn a_file_that_is_not_gguf() {
    let home = tempfile::tempdir().unwrap();
    let path = home.path().join("broken.gguf");
    std::fs::write(&path, b"GGUF\x03\x00\x00\x00 cut short").unwrap();
    let output = cram(&["check", "--model", path.to_str().unwrap()], home.path());
    assert_clean_failure(&output, "not a valid GGUF");
}

#[test]
fn a_cached_model_with_the_wrong_sha256() {
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(home.path().join("models")).unwrap();
    std::fs::write(home.path().join("models/qwen2.5-coder-0.5b-instruct.gguf"), b"not the model").unwrap();
    let output = cram(&["fetch-model", "0.5b", "--verify"], home.path());
    assert_clean_failure(&output, "sha256 mismatch");
}

#[test]
fn an_unknown_hub_repo_offline() {
    let home = tempfile::tempdir().unwrap();
    let output = cram(&["check", "--model", "cram-tests/no-such-model"], home.path());
    assert_clean_failure(&output, "hf-hub: cannot get `config.json` of `cram-tests/no-such-model`");
}

#[test]
fn an_unknown_model_name_and_an_unknown_case() {
    let home = tempfile::tempdir().unwrap();
    assert_clean_failure(&cram(&["fetch-model", "qwen-9000b"], home.path()), "unknown model `qwen-9000b`");
    let output = cram(&["check", "--case", "t99", "--model", "/nonexistent.gguf"], home.path());
    assert_clean_failure(&output, "no case `t99`");
}

#[test]
fn a_batch_of_zero_virtual_tokens_names_the_flag() {
    let home = tempfile::tempdir().unwrap();
    let output = cram(&["sweep", "configs/t8-sanity.toml", "--batch-virtual-tokens", "0"], home.path());
    assert_clean_failure(&output, "'--batch-virtual-tokens <BATCH_VIRTUAL_TOKENS>'");
}

#[test]
fn a_shard_outside_one_to_n_or_a_missing_shard_folder_is_refused() {
    let home = tempfile::tempdir().unwrap();
    for (shard, expected) in [("0/4", "I runs from 1 to 4"), ("5/4", "I runs from 1 to 4"), ("2", "a shard is I/N")] {
        let output = cram(&["sweep", "configs/t8-sanity.toml", "--shard", shard], home.path());
        assert_clean_failure(&output, expected);
    }
    let merged = home.path().join("merged");
    let missing = home.path().join("shard-1-of-2");
    let output = cram(&["report", merged.to_str().unwrap(), "--merge", missing.to_str().unwrap()], home.path());
    assert_clean_failure(&output, "not a sweep's output folder");
}

#[test]
fn a_negative_checkpoint_interval_is_refused() {
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("sweep.toml");
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/t8-sanity.toml")).unwrap();
    std::fs::write(&config, format!("checkpoint_seconds = -1.0\n{text}")).unwrap();
    let output = cram(&["sweep", config.to_str().unwrap()], home.path());
    assert_clean_failure(&output, "checkpoint_seconds -1 must be a number of seconds >= 0");
}

#[test]
fn an_infinite_bench_ratio_is_refused() {
    let home = tempfile::tempdir().unwrap();
    let output = cram(&["bench", "--ratio", "inf"], home.path());
    assert_clean_failure(&output, "ratios must be finite and above 1, got inf");
}

/// `bench --methods` refuses, before any model loads, a method it cannot
/// time: an unknown name, one that optimises, knobs that are not JSON.
#[test]
fn a_bench_method_it_cannot_time_is_refused() {
    let home = tempfile::tempdir().unwrap();
    assert_clean_failure(&cram(&["bench", "--methods", "no-such-method"], home.path()), "unknown method `no-such-method`");
    assert_clean_failure(&cram(&["bench", "--methods", "kvzip", "surprisal"], home.path()), "it optimises");
    assert_clean_failure(&cram(&["bench", "--methods", "kvzip:{query_cap"], home.path()), "not a JSON object");
}

/// The published cases and the reproduce configs are built into the binary:
/// outside the repository, `check` finds its case file and `reproduce` its
/// config (each then stops at the missing model, before any work).
#[test]
fn check_and_reproduce_work_outside_the_repository() {
    let home = tempfile::tempdir().unwrap();
    let elsewhere = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_cram")).args(args).current_dir(home.path()).env("CRAM_HOME", home.path()).output().unwrap()
    };
    let output = elsewhere(&["check", "--case", "no-such-case"]);
    assert_clean_failure(&output, "no case `no-such-case` in eval/bearing/bearing-questions.json (cases: t8-claude-md");
    let output = elsewhere(&["reproduce", "--model", "/nonexistent/model.gguf"]);
    assert_clean_failure(&output, "file not found: /nonexistent/model.gguf");
    let runs = home.path().join("runs");
    let run = std::fs::read_dir(&runs).unwrap().next().unwrap().unwrap().file_name().into_string().unwrap();
    assert!(run.starts_with("reproduce-quick-model-2"), "a fresh, dated run folder: {run}");
}
