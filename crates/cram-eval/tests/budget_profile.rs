//! Budget profiles on a small random model: the mean of each span's head
//! shares, and a config line that reads back as the same weights.

mod common;

use common::write_tiny_case;

use cram::matching::budgets::BudgetWeights;
use cram::synthetic as random;
use cram::{MatchingSettings, Model, Session};
use cram_eval::budget_profile::BudgetProfile;
use cram_eval::cases::{load_case_file, Case};
use cram_eval::render::Rendering;

/// One case's head shares as the library counts them for one span
/// (`MatchingSettings::head_shares`, checked against each head's own f64
/// attention in cram's tests).
fn shares_of(model: &Model, case: &Case) -> Vec<f64> {
    let messages = &case.transcript.messages;
    let session = Session::new(model, &Rendering::Chatml.messages(messages, &case.split.prefix)).unwrap();
    let targets = session.turn_targets(&Rendering::Chatml.messages(messages, &case.split.compress), false, false).unwrap();
    MatchingSettings::default().head_shares(model, session.cache(), targets.span()).unwrap()
}

#[test]
fn a_profile_is_the_mean_of_each_spans_head_shares_and_reads_back_as_an_option() {
    let dir = tempfile::tempdir().unwrap();
    let model = random::full_model(&random::tiny_config(), 3, &candle_core::Device::Cpu).unwrap();
    let cases: Vec<Case> = [write_tiny_case(dir.path(), "a", 20..44), write_tiny_case(dir.path(), "b", 50..62)]
        .iter()
        .flat_map(|file| load_case_file(file).unwrap())
        .collect();
    let mut seen = Vec::new();
    let profile = BudgetProfile::measure(&model, &cases, Rendering::Chatml, &MatchingSettings::default(), &mut |index| seen.push(index)).unwrap();
    assert_eq!((profile.spans, seen), (2, vec![0, 1]));
    let (a, b) = (shares_of(&model, &cases[0]), shares_of(&model, &cases[1]));
    assert_eq!(profile.weights.len(), a.len());
    for (head, weight) in profile.weights.iter().enumerate() {
        let expected = (a[head] + b[head]) / 2.0;
        assert!((weight - expected).abs() < 1e-6 * expected, "head {head}: {weight} against {expected}");
    }
    assert!((profile.weights.iter().sum::<f64>() - 1.0).abs() < 1e-9);

    let settings: MatchingSettings = toml::from_str(&profile.to_toml()).unwrap();
    let Some(BudgetWeights::Profile(read)) = settings.budget_weights else { panic!("budget_weights should read back as a profile") };
    for (read, weight) in read.iter().zip(&profile.weights) {
        assert!((read - weight).abs() <= 1e-6 * weight);
    }
    assert!(BudgetProfile::measure(&model, &[], Rendering::Chatml, &MatchingSettings::default(), &mut |_| {}).is_err());
}
