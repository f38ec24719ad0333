//! Calibration: a fact counts only if the model answers it with the whole
//! span in context (`full`) and misses it without (`none`). A fact the
//! model cannot recall from the span, or knows without it, measures nothing
//! about compression; left in, it dilutes every method alike.
//!
//! A sweep asks for it with `calibrate = true`; its report then scores
//! every cell on the calibrated facts and writes `calibration.csv`, one row
//! per fact with why it was kept or dropped.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::results::CellResult;
use crate::{EvalError, Result};

/// A fact of a case: (case, question id, fact id).
pub type CaseFact = (String, String, String);

/// The verdicts of the two baselines on every fact they were both asked.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    /// (full recalled it, none recalled it)
    baselines: BTreeMap<CaseFact, (bool, bool)>,
}

impl Calibration {
    /// From a sweep's results, which must hold the `full` and `none` baselines.
    pub fn of(results: &[CellResult]) -> Result<Self> {
        let verdicts = |method: &str| -> BTreeMap<CaseFact, bool> {
            results
                .iter()
                .filter(|result| result.cell.method == method && result.cell.ratio.is_none())
                .flat_map(|result| {
                    result.answers.iter().flat_map(move |answered| {
                        answered.facts.iter().map(move |(fact, recalled)| ((result.cell.case.clone(), answered.question_id.clone(), fact.clone()), *recalled))
                    })
                })
                .collect()
        };
        let (full, none) = (verdicts("full"), verdicts("none"));
        if full.is_empty() || none.is_empty() {
            return Err(EvalError::Model(cram::Error::Invalid("calibrate: the sweep needs the `full` and `none` baselines".into())));
        }
        let baselines = full.into_iter().filter_map(|(fact, with)| none.get(&fact).map(|&without| (fact, (with, without)))).collect();
        Ok(Self { baselines })
    }

    /// Whether `fact` is scored: recalled with the span, missed without it.
    pub fn keeps(&self, fact: &CaseFact) -> bool {
        self.baselines.get(fact) == Some(&(true, false))
    }

    /// (kept, missed with the full context, recalled with no context)
    pub fn counts(&self) -> (usize, usize, usize) {
        let kept = self.baselines.values().filter(|&&verdict| verdict == (true, false)).count();
        let missed = self.baselines.values().filter(|(with, _)| !with).count();
        let known = self.baselines.values().filter(|(with, without)| *with && *without).count();
        (kept, missed, known)
    }

    /// `results` scored on the calibrated facts only: each cell's answers
    /// keep only those facts, and its counts follow.
    pub fn apply(&self, results: &[CellResult]) -> Vec<CellResult> {
        results
            .iter()
            .map(|result| {
                let mut result = result.clone();
                for answered in &mut result.answers {
                    let question = answered.question_id.clone();
                    answered.facts.retain(|(fact, _)| self.keeps(&(result.cell.case.clone(), question.clone(), fact.clone())));
                }
                result.answers.retain(|answered| !answered.facts.is_empty());
                result.facts_total = result.answers.iter().map(|answered| answered.facts.len()).sum();
                result.facts_correct = result.answers.iter().flat_map(|answered| &answered.facts).filter(|(_, recalled)| *recalled).count();
                result
            })
            .collect()
    }

    /// One row per fact: the baselines' verdicts and whether it is kept, and why not.
    pub fn csv(&self) -> String {
        let mut out = String::from("case,question,fact,full,none,kept,reason\n");
        for ((case, question, fact), (with, without)) in &self.baselines {
            let reason = match (with, without) {
                (true, false) => "",
                (false, _) => "missed with the full context",
                (true, true) => "recalled with no context",
            };
            let kept = *with && !*without;
            writeln!(out, "{case},{question},{fact},{with},{without},{kept},{reason}").expect("writing to a String");
        }
        out
    }

    /// "kept 140 of 160 facts (12 missed with the full context, 8 recalled with no context)".
    pub fn summary(&self) -> String {
        let (kept, missed, known) = self.counts();
        format!("kept {kept} of {} facts ({missed} missed with the full context, {known} recalled with no context; calibration.csv)", self.baselines.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::test_line;

    fn line(method: &str, ratio: Option<f64>, verdicts: &[(&str, bool)]) -> CellResult {
        test_line("c", method, ratio, 10, verdicts)
    }

    #[test]
    fn only_facts_recalled_with_the_span_and_missed_without_it_are_scored() -> Result<()> {
        let results = vec![
            line("full", None, &[("a", true), ("b", true), ("c", false), ("d", true)]),
            line("none", None, &[("a", false), ("b", true), ("c", false), ("d", false)]),
            line("snapkv", Some(2.0), &[("a", true), ("b", true), ("c", true), ("d", false)]),
        ];
        let calibration = Calibration::of(&results)?;
        assert_eq!(calibration.counts(), (2, 1, 1)); // a and d kept; c missed; b known
        let scored = calibration.apply(&results);
        let snapkv = &scored[2];
        assert_eq!((snapkv.facts_correct, snapkv.facts_total), (1, 2)); // a yes, d no
        assert_eq!((scored[0].facts_correct, scored[0].facts_total), (2, 2));
        assert_eq!((scored[1].facts_correct, scored[1].facts_total), (0, 2));
        assert!(calibration.csv().contains("c,b,b,true,true,false,recalled with no context"));
        // Without the baselines there is nothing to calibrate against.
        assert!(Calibration::of(&results[2..]).is_err());
        Ok(())
    }
}
