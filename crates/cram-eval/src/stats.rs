//! The statistics a report puts on its figures: a Wilson interval on a
//! share of facts recalled, and an exact McNemar test of two methods
//! asked the same facts. With tens of facts, one fact moves a share by
//! several points: a difference means something only beside these.

use std::collections::BTreeMap;

use crate::results::CellResult;

/// The normal quantile of a two-sided 95% interval.
pub const Z_95: f64 = 1.959964;

/// The Wilson score interval of a proportion, `z` the normal quantile of
/// the confidence asked ([`Z_95`]). Unlike the normal approximation it stays
/// inside [0, 1] and is not empty at 0 or `trials` successes, which small
/// fact counts often give. No trials say nothing: (0, 1).
pub fn wilson_interval(successes: usize, trials: usize, z: f64) -> (f64, f64) {
    debug_assert!(successes <= trials, "{successes} successes of {trials} trials");
    if trials == 0 {
        return (0.0, 1.0);
    }
    wilson_share_interval(successes as f64 / trials as f64, trials as f64, z)
}

/// [`wilson_interval`] of `recalled` of `asked` verdicts pooled over
/// `seeds` seeds that ask the same facts again: a seed is not a new draw
/// of facts, so only the `asked / seeds` facts count as independent
/// trials, at the pooled share. Conservative (as if seeds always agreed),
/// where counting every verdict would narrow the interval by up to
/// sqrt(seeds) with no new fact.
pub fn pooled_wilson_interval(recalled: usize, asked: usize, seeds: usize, z: f64) -> (f64, f64) {
    debug_assert!(recalled <= asked, "{recalled} recalled of {asked} asked");
    if asked == 0 || seeds == 0 {
        return (0.0, 1.0);
    }
    wilson_share_interval(recalled as f64 / asked as f64, asked as f64 / seeds as f64, z)
}

/// The Wilson interval of a share observed over `n` trials (n > 0).
fn wilson_share_interval(share: f64, n: f64, z: f64) -> (f64, f64) {
    let z2 = z * z;
    let denominator = 1.0 + z2 / n;
    let centre = (share + z2 / (2.0 * n)) / denominator;
    let half_width = z * (share * (1.0 - share) / n + z2 / (4.0 * n * n)).sqrt() / denominator;
    ((centre - half_width).max(0.0), (centre + half_width).min(1.0))
}

/// The two-sided exact McNemar p-value of two methods asked the same
/// facts: under "neither is better", each fact only one of them recalls
/// goes to either with probability 1/2, so the smaller count is binomial
/// (only_a + only_b, 1/2); p = min(1, 2 P(X <= smaller)). Facts both or
/// neither recall say nothing about the difference. Summed in log space,
/// so that thousands of discordant facts do not underflow.
pub fn mcnemar_exact(only_a: usize, only_b: usize) -> f64 {
    let discordant = only_a + only_b;
    let smaller = only_a.min(only_b);
    let ln_half_power = -(discordant as f64) * std::f64::consts::LN_2;
    let mut ln_choose = 0.0; // ln C(discordant, k), from k = 0
    let mut tail = 0.0;
    for k in 0..=smaller {
        tail += (ln_choose + ln_half_power).exp();
        ln_choose += ((discordant - k) as f64).ln() - ((k + 1) as f64).ln();
    }
    (2.0 * tail).min(1.0)
}

/// Where one fact was asked: one verdict of one cell.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FactKey {
    pub case: String,
    /// The ratio's bits; None for baselines.
    pub ratio: Option<u64>,
    pub seed: u64,
    /// The question that asked it (two questions may share a fact id).
    pub question: String,
    pub fact: String,
}

/// One method's verdicts: recalled or not, per fact asked.
pub type Verdicts = BTreeMap<FactKey, bool>;

/// Every fact verdict of `results`.
pub fn verdicts<'a>(results: impl IntoIterator<Item = &'a CellResult>) -> Verdicts {
    let mut verdicts = Verdicts::new();
    for result in results {
        for answered in &result.answers {
            for (fact, recalled) in &answered.facts {
                let key = FactKey {
                    case: result.cell.case.clone(),
                    ratio: result.cell.ratio.map(f64::to_bits),
                    seed: result.cell.seed,
                    question: answered.question_id.clone(),
                    fact: fact.clone(),
                };
                verdicts.insert(key, *recalled);
            }
        }
    }
    verdicts
}

/// Two methods on the facts both were asked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Paired {
    /// Facts both were asked.
    pub facts: usize,
    pub both: usize,
    pub only_a: usize,
    pub only_b: usize,
    pub neither: usize,
    /// [`mcnemar_exact`] on `only_a` and `only_b`.
    pub p_value: f64,
}

/// Pairs the verdicts of `a` and `b` by fact; facts only one was asked are
/// left out.
pub fn compare(a: &Verdicts, b: &Verdicts) -> Paired {
    let mut counts = [[0usize; 2]; 2]; // [a recalled][b recalled]
    for (key, &a_recalled) in a {
        if let Some(&b_recalled) = b.get(key) {
            counts[usize::from(a_recalled)][usize::from(b_recalled)] += 1;
        }
    }
    let (both, only_a, only_b, neither) = (counts[1][1], counts[1][0], counts[0][1], counts[0][0]);
    Paired { facts: both + only_a + only_b + neither, both, only_a, only_b, neither, p_value: mcnemar_exact(only_a, only_b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(actual: (f64, f64), expected: (f64, f64), tolerance: f64) -> bool {
        (actual.0 - expected.0).abs() <= tolerance && (actual.1 - expected.1).abs() <= tolerance
    }

    /// Seeds that repeat the same verdicts add no width: the pooled
    /// interval of S identical seeds is one seed's interval.
    #[test]
    fn pooled_seeds_count_the_facts_once() {
        for seeds in 1..5 {
            assert_eq!(pooled_wilson_interval(7 * seeds, 20 * seeds, seeds, Z_95), wilson_interval(7, 20, Z_95));
        }
        // Seeds that disagree: the pooled share over the facts of one seed.
        let (low, high) = pooled_wilson_interval(15, 40, 2, Z_95);
        let (one_low, one_high) = wilson_interval(15, 40, Z_95);
        assert!(low < one_low && high > one_high, "wider than counting every verdict");
        assert_eq!(pooled_wilson_interval(0, 0, 3, Z_95), (0.0, 1.0));
    }

    #[test]
    fn wilson_matches_published_intervals() {
        // Newcombe (1998), "Two-sided confidence intervals for the single
        // proportion", Table II, the Wilson score method; and the commonly
        // quoted 0/10 and 5/10.
        let published = [
            ((81, 263), (0.2553, 0.3662)),
            ((15, 148), (0.0624, 0.1605)),
            ((0, 20), (0.0, 0.1611)),
            ((1, 29), (0.0061, 0.1718)),
            ((0, 10), (0.0, 0.2775)),
            ((5, 10), (0.2366, 0.7634)),
        ];
        for ((successes, trials), expected) in published {
            let interval = wilson_interval(successes, trials, Z_95);
            assert!(close(interval, expected, 6e-5), "{successes}/{trials}: {interval:?}, published {expected:?}");
        }
    }

    /// The Wilson bounds are the shares p at which the observed share lies
    /// exactly z standard errors (at p) away: (share - p)^2 = z^2 p (1 - p) / n.
    #[test]
    fn wilson_bounds_solve_the_score_equation() {
        for (successes, trials) in [(1, 3), (7, 9), (40, 41), (123, 500), (2, 1000)] {
            let (low, high) = wilson_interval(successes, trials, Z_95);
            let share = successes as f64 / trials as f64;
            for bound in [low, high] {
                let score_gap = (share - bound).powi(2) - Z_95 * Z_95 * bound * (1.0 - bound) / trials as f64;
                assert!(score_gap.abs() < 1e-12, "{successes}/{trials}: bound {bound}, gap {score_gap}");
            }
            assert!(low < share && share < high);
        }
        assert_eq!(wilson_interval(0, 0, Z_95), (0.0, 1.0), "no trials: nothing known");
        let (_, high) = wilson_interval(10, 10, Z_95);
        assert!(high <= 1.0);
    }

    #[test]
    fn mcnemar_matches_known_values() {
        // n = 10 discordant, 1 against 9: 2 (1 + 10) / 2^10.
        assert!((mcnemar_exact(1, 9) - 0.0215).abs() < 5e-5);
        assert_eq!(mcnemar_exact(9, 1), mcnemar_exact(1, 9));
        assert_eq!(mcnemar_exact(0, 0), 1.0, "no discordant facts: no evidence");
        assert_eq!(mcnemar_exact(5, 5), 1.0);
        assert!((mcnemar_exact(0, 10) - 2.0 / 1024.0).abs() < 1e-15);
    }

    /// Against the binomial tail summed in exact integers.
    #[test]
    fn mcnemar_matches_the_exact_binomial_tail() {
        fn choose(n: u128, k: u128) -> u128 {
            (0..k).fold(1, |c, i| c * (n - i) / (i + 1))
        }
        for (only_a, only_b) in [(3, 12), (17, 30), (40, 41), (0, 100), (55, 60)] {
            let n = (only_a + only_b) as u128;
            let tail: u128 = (0..=only_a.min(only_b) as u128).map(|k| choose(n, k)).sum();
            let exact = (2.0 * tail as f64 / 2f64.powi(n as i32)).min(1.0);
            let p = mcnemar_exact(only_a, only_b);
            assert!((p - exact).abs() <= 1e-10 * exact, "{only_a} vs {only_b}: {p} vs {exact}");
        }
        let many = mcnemar_exact(1500, 1700);
        assert!(many.is_finite() && many > 0.0 && many < 0.02, "{many}");
    }

    #[test]
    fn compare_pairs_facts_both_were_asked() {
        let key = |case: &str, fact: &str| FactKey { case: case.into(), ratio: Some(2f64.to_bits()), seed: 0, question: "q".into(), fact: fact.into() };
        let a: Verdicts = [(key("c", "f1"), true), (key("c", "f2"), true), (key("c", "f3"), false), (key("c", "f4"), false), (key("d", "f1"), true)].into();
        let b: Verdicts = [(key("c", "f1"), true), (key("c", "f2"), false), (key("c", "f3"), true), (key("c", "f4"), false), (key("e", "f1"), true)].into();
        let paired = compare(&a, &b);
        assert_eq!((paired.facts, paired.both, paired.only_a, paired.only_b, paired.neither), (4, 1, 1, 1, 1));
        assert_eq!(paired.p_value, mcnemar_exact(1, 1));
    }
}
