//! Transcripts, renderings, fact scoring and the leak check.

use std::path::{Path, PathBuf};

use cram_eval::cases::load_case_file;
use cram_eval::questions::Fact;
use cram_eval::render::Rendering;
use cram_eval::transcript::Transcript;
use cram_eval::EvalError;

fn bearing() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../eval/bearing")
}

fn fact(json: &str) -> Fact {
    serde_json::from_str(json).unwrap()
}

#[test]
fn facts_need_every_group_and_no_rejected_word() {
    let statuses = fact(r#"{"id": "s", "expect": [["pending"], ["in_progress", "in progress"], ["done"]]}"#);
    assert!(statuses.is_recalled("Tasks are Pending, In Progress or done."));
    assert!(!statuses.is_recalled("Tasks are pending or done."));
    let runner = fact(r#"{"id": "r", "expect_any": ["node:test"], "reject_any": ["jest"]}"#);
    assert!(runner.is_recalled("It uses node:test."));
    assert!(!runner.is_recalled("It uses node:test, not Jest."));
    let empty = fact(r#"{"id": "e"}"#);
    assert!(!empty.is_recalled("anything"), "a fact with nothing expected is never recalled");
}

#[test]
fn the_published_cases_load_and_t8_splits_into_one_question_per_fact() {
    let cases = load_case_file(&bearing().join("bearing-questions.json")).unwrap();
    let ids: Vec<&str> = cases.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["t8-claude-md", "t18-auth-middleware", "t24-reports", "seq-turns-2-11"]);
    assert_eq!(cases[0].transcript.messages.len(), 57);
    assert_eq!(cases[0].rendering, Rendering::TurnMarkers);
    let per_fact = cases[0].questions[0].per_fact();
    assert_eq!(per_fact.len(), 3);
    assert_eq!(per_fact[1].question, "What is its Node.js test runner?");
    assert_eq!(per_fact[1].facts[0].id, "test-runner");
}

#[test]
fn the_published_single_turn_cases_do_not_leak_when_asked_per_fact() {
    let cases = load_case_file(&bearing().join("bearing-questions.json")).unwrap();
    for case in &cases[..3] {
        for rendering in [Rendering::Chatml, Rendering::TurnMarkers] {
            case.check_leaks(rendering, true).unwrap_or_else(|e| panic!("{}: {e}", case.id));
        }
    }
    // T8 names "regex" only as an option ("a library or regex?"): allowed.
    cases[0].check_leaks(Rendering::TurnMarkers, false).unwrap();
    // T24's combined question says "the weekly report", the answer of its
    // title fact: asked whole, it gives that answer away.
    let err = cases[2].check_leaks(Rendering::TurnMarkers, false).unwrap_err();
    assert!(err.to_string().contains("`title`") && err.to_string().contains("the question"), "{err}");
}

#[test]
fn renderings_match_the_format_doc() {
    let transcript = Transcript::load(&bearing().join("bearing-transcript.jsonl")).unwrap();
    let messages = &transcript.messages;
    let markers = Rendering::TurnMarkers.message(4, &messages[4]);
    assert!(markers.starts_with("=== TURN 5 (assistant) ===\n[tool_use read_file] {\"path\": \"package.json\"}"), "{markers}");
    let result = Rendering::TurnMarkers.message(7, &messages[7]);
    assert!(result.starts_with("=== TURN 8 (user) ===\n[tool_result toolu_01VMj1aSHDC3pujsh62EfrGV] \"# Task Management API\\n"), "{result}");
    assert!(result.contains("\\u2014"), "non-ASCII escaped as Python's json.dumps does");

    let chatml = Rendering::Chatml.message(7, &messages[7]);
    assert!(chatml.starts_with("<|im_start|>user\n<tool_response>\n# Task Management API\n"), "{chatml}");
    assert!(chatml.ends_with("</tool_response><|im_end|>\n"));
    let call = Rendering::Chatml.message(4, &messages[4]);
    assert_eq!(call, "<|im_start|>assistant\n<tool_call>\n{\"name\": \"read_file\", \"arguments\": {\"path\": \"package.json\"}}\n</tool_call><|im_end|>\n");
    assert_eq!(Rendering::Chatml.question("Why?"), "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n");
    assert_eq!(Rendering::TurnMarkers.question("Why?"), "\n\nQuestion: Why?\nAnswer:");
}

fn write(dir: &Path, name: &str, json: serde_json::Value) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, json.to_string()).unwrap();
    path
}

#[test]
fn our_json_format_is_one_case_with_the_default_split() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "own.json", serde_json::json!({
        "id": "own",
        "messages": [
            {"role": "system", "content": "You are a coding agent."},
            {"role": "user", "content": "Use port 6390."},
            {"role": "assistant", "content": "Done."},
            {"role": "tool", "content": "ok"},
            {"role": "user", "content": "Next task."},
            {"role": "assistant", "content": "Sure."}
        ],
        "questions": [{"id": "port", "question": "Which port?", "facts": [{"id": "port", "expect_any": ["6390"]}]}]
    }));
    let cases = load_case_file(&path).unwrap();
    assert_eq!(cases.len(), 1);
    assert_eq!((cases[0].split.prefix.clone(), cases[0].split.compress.clone(), cases[0].split.suffix.clone()), (vec![0], vec![1, 2, 3], vec![4, 5]));
    cases[0].check_leaks(Rendering::Chatml, true).unwrap();
    let tool = Rendering::Chatml.message(3, &cases[0].transcript.messages[3]);
    assert_eq!(tool, "<|im_start|>user\n<tool_response>\nok\n</tool_response><|im_end|>\n");
}

#[test]
fn a_case_whose_answer_is_outside_the_span_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let messages = serde_json::json!([
        {"role": "system", "content": "You are a coding agent."},
        {"role": "user", "content": "Use port 6390."},
        {"role": "user", "content": "The port is 6390, remember."}
    ]);
    let in_suffix = write(dir.path(), "suffix.json", serde_json::json!({
        "id": "leaky", "messages": messages,
        "questions": [{"id": "q", "question": "Which port?", "facts": [{"id": "port", "expect_any": ["6390"]}]}]
    }));
    let err = load_case_file(&in_suffix).unwrap()[0].check_leaks(Rendering::Chatml, true).unwrap_err();
    assert!(matches!(&err, EvalError::Leak { fact, .. } if fact == "port"), "{err}");

    let in_question = write(dir.path(), "question.json", serde_json::json!({
        "id": "leaky-q", "messages": messages.as_array().unwrap()[..2].iter().chain([&serde_json::json!({"role": "user", "content": "Next."})]).collect::<Vec<_>>(),
        "questions": [{"id": "q", "question": "Is it 6390?", "facts": [{"id": "port", "expect_any": ["6390"]}]}]
    }));
    let err = load_case_file(&in_question).unwrap()[0].check_leaks(Rendering::Chatml, true).unwrap_err();
    assert!(err.to_string().contains("the question"), "{err}");

    let no_span = write(dir.path(), "empty.json", serde_json::json!({
        "id": "nothing", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
        "questions": [{"id": "q", "question": "?", "facts": []}]
    }));
    let err = load_case_file(&no_span).unwrap_err();
    assert!(err.to_string().contains("no turn left to compress"), "{err}");
}

#[test]
fn a_question_may_carry_its_one_fact_inline() {
    let question = |json: serde_json::Value| serde_json::from_value::<cram_eval::questions::Question>(json);
    let inline = question(serde_json::json!({
        "id": "lib", "question": "Which hashing library?", "expect_any": ["bcryptjs"], "reject_any": ["bcrypt "]
    }))
    .unwrap();
    let written_out = question(serde_json::json!({
        "id": "lib", "question": "Which hashing library?",
        "facts": [{"id": "lib", "expect_any": ["bcryptjs"], "reject_any": ["bcrypt "]}]
    }))
    .unwrap();
    assert_eq!(inline, written_out, "the shorthand is the one-fact question");
    assert!(inline.facts[0].is_recalled("We use bcryptjs.") && !inline.facts[0].is_recalled("bcrypt to hash"));

    let both = question(serde_json::json!({"id": "q", "question": "?", "expect_any": ["a"], "facts": []})).unwrap_err();
    assert!(both.to_string().contains("both `facts` and an inline fact"), "{both}");
    let neither = question(serde_json::json!({"id": "q", "question": "?"})).unwrap_err();
    assert!(neither.to_string().contains("has no facts"), "{neither}");
    let stray = question(serde_json::json!({"id": "q", "question": "?", "facts": [], "reject_any": ["x"]})).unwrap_err();
    assert!(stray.to_string().contains("need an inline `expect`"), "{stray}");
}

/// A sweep's own copy of a case file that names its transcript loads the
/// same cases from the run folder.
#[test]
fn a_sweeps_copy_of_a_case_file_brings_its_transcript() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("sweep.toml");
    let text = format!("model = \"qwen2.5-coder-0.5b-instruct\"\nmethods = [\"snapkv\"]\nratios = [2.0]\n[[cases]]\nfile = {:?}\nids = [\"t8-claude-md\"]\n", bearing().join("bearing-questions.json"));
    std::fs::write(&config_path, text).unwrap();
    let config = cram_eval::sweep::SweepConfig::load(&config_path).unwrap();
    let run_cases = dir.path().join("run").join("cases");
    config.write_cases(&config_path, &run_cases).unwrap();
    let copied = load_case_file(&run_cases.join("bearing-questions.json")).unwrap();
    let original = load_case_file(&bearing().join("bearing-questions.json")).unwrap();
    assert_eq!(copied.len(), original.len());
    for (a, b) in copied.iter().zip(&original) {
        assert_eq!((&a.id, &a.questions, &a.split), (&b.id, &b.questions, &b.split));
        assert_eq!(a.transcript.messages.len(), b.transcript.messages.len());
    }
}
