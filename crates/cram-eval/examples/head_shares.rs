//! Prints each case's head shares (what `cram budget-profile` averages),
//! one JSON line a case: how much a (layer, KV head)'s share of spread
//! budgets moves from span to span (experiments/benchmark/budget-stability/).
//!
//! cargo run --release -p cram-eval --example head_shares -- CASE_FILE... > shares.jsonl

use std::path::PathBuf;

use anyhow::Result;
use cram::{MatchingSettings, Model, Session};
use cram_eval::cases::load_case_file;
use cram_eval::models;
use cram_eval::render::Rendering;

fn main() -> Result<()> {
    let model = Model::load(&models::resolve(models::DEFAULT_MODEL)?, &candle_core::Device::Cpu)?;
    let settings = MatchingSettings::default();
    for file in std::env::args().skip(1) {
        for case in load_case_file(&PathBuf::from(&file))? {
            let messages = &case.transcript.messages;
            let session = Session::new(&model, &Rendering::Chatml.messages(messages, &case.split.prefix))?;
            let first_turn = case.turns().into_iter().next().unwrap_or_default();
            let targets = session.turn_targets(&Rendering::Chatml.messages(messages, &first_turn), false, false)?;
            let shares = settings.head_shares(&model, session.cache(), targets.span())?;
            println!("{}", serde_json::json!({"case": case.id, "n": targets.span().len(), "shares": shares}));
        }
    }
    Ok(())
}
