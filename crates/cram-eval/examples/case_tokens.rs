//! Writes a case's token ids as JSON (prefix, span, suffix, and each
//! question as asked), so that another implementation can be run on exactly
//! the tokens cram sees (the PyTorch side-by-side under `experiments/`).
//!
//! cargo run --release -p cram-eval --example case_tokens -- \
//!     eval/bearing/bearing-questions.json t8-claude-md chatml > t8-tokens.json

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use cram::Model;
use cram_eval::cases::load_case_file;
use cram_eval::questions::Question;
use cram_eval::models;
use cram_eval::render::Rendering;
use serde_json::json;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [case_file, case_id, rendering] = args.as_slice() else {
        bail!("usage: case_tokens CASE_FILE CASE_ID chatml|turn-markers");
    };
    let rendering: Rendering = serde_json::from_value(json!(rendering)).context("rendering")?;
    let case = load_case_file(&PathBuf::from(case_file))?
        .into_iter()
        .find(|case| &case.id == case_id)
        .with_context(|| format!("no case {case_id} in {case_file}"))?;
    let model = Model::load(&models::resolve(models::DEFAULT_MODEL)?, &candle_core::Device::Cpu)?;
    let messages = &case.transcript.messages;
    let encode = |indices: &[usize]| model.tokenizer.encode(&rendering.messages(messages, indices));
    let questions = case
        .questions
        .iter()
        .flat_map(Question::per_fact)
        .map(|question| -> Result<_> {
            let facts: Vec<_> = question
                .facts
                .iter()
                .map(|fact| json!({"id": fact.id, "expect": fact.groups(), "reject_any": fact.reject_any}))
                .collect();
            let ids = model.tokenizer.encode(&rendering.question(&question.question))?;
            Ok(json!({"id": question.id, "ids": ids, "facts": facts}))
        })
        .collect::<Result<Vec<_>>>()?;
    let tokens = json!({
        "case": case.id,
        "rendering": rendering,
        "prefix": encode(&case.split.prefix)?,
        "span": encode(&case.split.compress)?,
        "suffix": encode(&case.split.suffix)?,
        "questions": questions,
        "stop": model.tokenizer.stop_ids(),
    });
    println!("{}", serde_json::to_string(&tokens)?);
    Ok(())
}
