//! `cram self-test` on the CPU, as a user runs it: every check passes or is
//! skipped (bf16, which candle's CPU matmul lacks), one JSON line each.

use std::process::Command;

#[test]
fn the_self_test_passes_on_the_cpu_with_a_json_line_per_check() {
    let dir = tempfile::tempdir().unwrap();
    let lines_file = dir.path().join("self-test.jsonl");
    let output = Command::new(env!("CARGO_BIN_EXE_cram"))
        .args(["self-test", "--device", "cpu", "--out"])
        .arg(&lines_file)
        .output()
        .expect("the cram binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "self-test failed: {stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let records: Vec<serde_json::Value> = stdout.lines().map(|line| serde_json::from_str(line).expect("each line is JSON")).collect();
    // Two models, two dtypes, thirteen checks each.
    assert_eq!(records.len(), 2 * 2 * 13, "{stdout}");
    for record in &records {
        let expected = if record["dtype"] == "bf16" { "skipped" } else { "passed" };
        assert_eq!(record["outcome"], expected, "{record}");
    }
    // The file holds the same lines.
    assert_eq!(std::fs::read_to_string(&lines_file).unwrap(), stdout);
    assert!(stderr.contains("26 passed, 0 failed, 0 errors, 26 skipped"), "{stderr}");
}
