//! Prints each case's head shares (what `cram budget-profile` averages),
//! one JSON line a case: how much a (layer, KV head)'s share of spread
//! budgets moves from span to span (experiments/benchmark/budget-stability/).
//!
//! cargo run --release -p cram-eval --example head_shares -- CASE_FILE... > shares.jsonl

use std::path::PathBuf;

use anyhow::Result;
use cram::{MatchingSettings, Model};
use cram_eval::budget_profile::BudgetProfile;
use cram_eval::cases::load_case_file;
use cram_eval::models;
use cram_eval::render::Rendering;

fn main() -> Result<()> {
    let model = Model::load(&models::resolve(models::DEFAULT_MODEL)?, &candle_core::Device::Cpu)?;
    let settings = MatchingSettings::default();
    for file in std::env::args().skip(1) {
        for case in load_case_file(&PathBuf::from(&file))? {
            let shares = BudgetProfile::case_shares(&model, &case, Rendering::Chatml, &settings)?;
            let n_tokens = model.tokenizer.encode(&Rendering::Chatml.messages(&case.transcript.messages, &case.turns()[0]))?.len();
            println!("{}", serde_json::json!({"case": case.id, "n": n_tokens, "shares": shares}));
        }
    }
    Ok(())
}
