//! Facts recalled broken down by what the fact is (`kind`), where it sits
//! in the span (`placement`) and how long the span is: a method that keeps
//! the recent tokens wins on late facts, one that keeps numbers on ports.
//! The kinds and placements come from the case files (generated cases
//! record them); results lines name only the fact.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use crate::cases::Case;
use crate::results::CellResult;
use crate::stats;

/// A fact's `kind` and `placement`, by (case, fact id).
pub type FactLabels = HashMap<(String, String), (Option<String>, Option<String>)>;

/// The labels of every fact of `cases`.
pub fn labels(cases: &[Case]) -> FactLabels {
    let mut labels = FactLabels::new();
    for case in cases {
        for fact in case.questions.iter().flat_map(|question| &question.facts) {
            labels.insert((case.id.clone(), fact.id.clone()), (fact.kind.clone(), fact.placement.clone()));
        }
    }
    labels
}

/// The span-length group of a span of `n_tokens`.
fn span_group(n_tokens: usize) -> &'static str {
    match n_tokens {
        0..400 => "span < 400",
        400..2000 => "span 400-2000",
        _ => "span >= 2000",
    }
}

/// `breakdown.csv`: per method, ratio and group (a kind, a placement or a
/// span length), facts recalled of facts asked, the share and its Wilson
/// 95% interval (seeds counted as one draw of facts). Facts without labels count under span length only.
pub fn csv(results: &[CellResult], labels: &FactLabels) -> String {
    // (method, ratio text, dimension, group) -> (recalled, asked, seeds)
    let mut counts: BTreeMap<(String, String, &str, String), (usize, usize, BTreeSet<u64>)> = BTreeMap::new();
    for result in results {
        let ratio = result.cell.ratio.map_or(String::new(), |ratio| ratio.to_string());
        for (fact, recalled) in result.answers.iter().flat_map(|answered| &answered.facts) {
            let (kind, placement) = labels.get(&(result.cell.case.clone(), fact.clone())).cloned().unwrap_or((None, None));
            let groups = [("kind", kind), ("placement", placement), ("span", Some(span_group(result.n_tokens).to_string()))];
            for (dimension, group) in groups {
                let Some(group) = group else { continue };
                let count = counts.entry((result.cell.method.clone(), ratio.clone(), dimension, group)).or_default();
                count.0 += usize::from(*recalled);
                count.1 += 1;
                count.2.insert(result.cell.seed);
            }
        }
    }
    let mut out = String::from("method,ratio,by,group,recalled,asked,share,share_low,share_high\n");
    for ((method, ratio, dimension, group), (recalled, asked, seeds)) in counts {
        let (low, high) = stats::pooled_wilson_interval(recalled, asked, seeds.len(), stats::Z_95);
        let share = recalled as f64 / asked as f64;
        writeln!(out, "{method},{ratio},{dimension},{group},{recalled},{asked},{share:.4},{low:.4},{high:.4}").expect("writing to a String");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::test_line;

    fn line(case: &str, n_tokens: usize, verdicts: &[(&str, bool)]) -> CellResult {
        test_line(case, "snapkv", Some(2.0), n_tokens, verdicts)
    }

    #[test]
    fn facts_are_counted_under_their_kind_placement_and_span_length() {
        let label = |kind: &str, placement: &str| (Some(kind.to_string()), Some(placement.to_string()));
        let labels: FactLabels = [
            (("a".to_string(), "p1".to_string()), label("port", "early")),
            (("a".to_string(), "p2".to_string()), label("port", "late")),
            (("b".to_string(), "v".to_string()), label("version", "late")),
        ]
        .into_iter()
        .collect();
        let results = [line("a", 250, &[("p1", true), ("p2", false)]), line("b", 3000, &[("v", true), ("unlabelled", false)])];
        let csv = csv(&results, &labels);
        let row = |by: &str, group: &str| -> String {
            csv.lines().find(|line| line.starts_with(&format!("snapkv,2,{by},{group},"))).unwrap_or_else(|| panic!("no {by} {group} in {csv}")).to_string()
        };
        assert!(row("kind", "port").contains(",1,2,0.5000,"));
        assert!(row("placement", "late").contains(",1,2,0.5000,"));
        assert!(row("placement", "early").contains(",1,1,1.0000,"));
        assert!(row("span", "span < 400").contains(",1,2,"));
        // The unlabelled fact counts under span length only.
        assert!(row("span", "span >= 2000").contains(",1,2,"));
        assert_eq!(csv.lines().filter(|line| line.contains(",kind,")).count(), 2);
    }
}
