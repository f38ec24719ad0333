//! How many entries each (layer, KV head) keeps. Uniform gives every head
//! `n / ratio`; non-uniform spreads the same total by how many of the
//! span's keys a head's reference queries actually attend to, since a head
//! that looks at one key loses nothing with one entry while a head that
//! spreads its attention needs many. The attention-matching paper found
//! non-uniform budgets the part of the method that matters most (its
//! budgets are precomputed per model; cram derives them from the span's own
//! reference queries, which needs no calibration run).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::matching::queries::QuerySource;

/// How a compaction's entries are spread over layers and KV heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Budgets {
    /// `n / ratio` entries per head.
    Uniform,
    /// The same total, shared in proportion to each head's effective
    /// number of attended keys ([`effective_keys`]), at least one each.
    Spread,
}

/// What weighs the heads for spread budgets, when not the fit's own
/// reference queries: another query set, or a profile fixed in advance.
/// On 250-token spans each head's share of the total hardly changes from
/// span to span (3.7% relative spread, median over heads; a profile from
/// 48 other spans moves 1.5% of the entries), as the attention-matching
/// paper's precomputed budgets assume; a profile saves on-policy fitting
/// its first, ordinary repeat pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged, expecting = "\"repeat\", \"context\", \"both\" or a list of weights, one per layer and KV head")]
pub enum BudgetWeights {
    /// The heads' attention to these queries (`"repeat"`, `"context"`, `"both"`).
    Queries(QuerySource),
    /// One weight per (layer, KV head), layer-major, as `cram
    /// budget-profile` writes them.
    Profile(Vec<f64>),
}

/// The effective number of keys a head attends to: `exp` of the entropy
/// of its reference queries' mean attention over the span (n, summing to
/// 1). 1 for a head whose every query looks at one key; `n` for attention
/// spread evenly.
pub fn effective_keys(mean_attention: &[f64]) -> f64 {
    let entropy: f64 = mean_attention.iter().filter(|&&p| p > 0.0).map(|&p| -p * p.ln()).sum();
    entropy.exp()
}

/// `total` entries shared among heads in proportion to `weights`, each
/// between 1 and `cap`: the D'Hondt apportionment (each next entry goes to
/// the head of largest `weight / (entries + 1)` that has room; ties to the
/// earlier head), which stays proportional within one entry a head.
pub fn allocate(total: usize, weights: &[f64], cap: usize) -> Result<Vec<usize>> {
    let heads = weights.len();
    if heads == 0 || total < heads || total > heads * cap {
        return Err(Error::Invalid(format!("cannot share {total} entries among {heads} heads of 1 to {cap} entries each")));
    }
    if let Some(bad) = weights.iter().find(|w| !(w.is_finite() && **w >= 0.0)) {
        return Err(Error::Invalid(format!("a head's budget weight must be finite and >= 0, got {bad}")));
    }
    let mut entries = vec![1usize; heads];
    for _ in heads..total {
        let next = (0..heads)
            .filter(|&head| entries[head] < cap)
            .max_by(|&a, &b| {
                let quotient = |head: usize| weights[head] / (entries[head] + 1) as f64;
                quotient(a).total_cmp(&quotient(b)).then(b.cmp(&a))
            })
            .expect("total <= heads * cap leaves a head with room");
        entries[next] += 1;
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_keys_count_the_keys_attention_spreads_over() {
        assert!((effective_keys(&[0.0, 1.0, 0.0, 0.0]) - 1.0).abs() < 1e-12);
        assert!((effective_keys(&[0.25; 4]) - 4.0).abs() < 1e-12);
        // Two queries on two different keys: the mean attends two keys evenly.
        assert!((effective_keys(&[0.5, 0.0, 0.5, 0.0]) - 2.0).abs() < 1e-12);
    }

    /// Against the closed form where the proportional shares are whole
    /// numbers, and against the bounds and the total everywhere.
    #[test]
    fn allocation_is_proportional_within_bounds_and_sums_to_the_total() {
        assert_eq!(allocate(8, &[1.0, 3.0], 10).unwrap(), vec![2, 6]);
        assert_eq!(allocate(12, &[1.0, 2.0, 3.0], 10).unwrap(), vec![2, 4, 6]);
        assert_eq!(allocate(9, &[1.0, 1.0, 1.0], 5).unwrap(), vec![3, 3, 3]);
        // A head at its cap gives the rest to the others; a zero weight keeps its one entry.
        assert_eq!(allocate(12, &[0.0, 100.0, 1.0], 6).unwrap(), vec![1, 6, 5]);
        let weights = [0.3, 7.0, 1.2, 0.0, 2.5, 2.5];
        for total in 6..=6 * 9 {
            let entries = allocate(total, &weights, 9).unwrap();
            assert_eq!(entries.iter().sum::<usize>(), total);
            assert!(entries.iter().all(|&e| (1..=9).contains(&e)), "{entries:?}");
        }
        assert!(allocate(2, &[1.0, 1.0, 1.0], 5).is_err(), "fewer entries than heads");
        assert!(allocate(16, &[1.0, 1.0, 1.0], 5).is_err(), "more than the heads hold");
        assert!(allocate(4, &[1.0, f64::NAN], 5).is_err());
    }
}
