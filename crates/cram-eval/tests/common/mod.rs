//! Fixtures shared by the evaluation tests.

use std::path::{Path, PathBuf};

/// Writes `dir/{id}.json`: a single-turn case in a random model's word
/// vocabulary, a system prompt then the span `t{i}` for `i` in
/// `span_words`, a closing turn, and one question whose fact is `t31`.
pub fn write_tiny_case(dir: &Path, id: &str, span_words: std::ops::Range<usize>) -> PathBuf {
    let path = dir.join(format!("{id}.json"));
    let span: Vec<String> = span_words.map(|i| format!("t{i}")).collect();
    std::fs::write(&path, serde_json::json!({
        "id": id,
        "messages": [
            {"role": "system", "content": "t1 t2 t3"},
            {"role": "user", "content": span.join(" ")},
            {"role": "user", "content": "t4 t5"}
        ],
        "questions": [{"id": "q", "question": "t6 t7?", "facts": [{"id": "f", "expect_any": ["t31"]}]}]
    }).to_string()).unwrap();
    path
}
