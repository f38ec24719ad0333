//! Keeping the best-scored entries, written once for every method that
//! selects (eviction, the hybrid's verbatim tokens, compress-then-evict):
//! a scorer says how much each entry is worth, this says which survive.

/// Indices of the `count` highest `scores`, in ascending (cache) order.
/// Ties go to the earlier entry, so a selection is deterministic.
pub fn keep_top(scores: &[f32], count: usize) -> Vec<usize> {
    let mut ranked: Vec<usize> = (0..scores.len()).collect();
    ranked.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    ranked.truncate(count);
    ranked.sort_unstable();
    ranked
}

/// Each score replaced by the largest within `kernel / 2` places of it, so
/// that kept entries come in runs (a name is several tokens).
pub fn max_pool(scores: &[f32], kernel: usize) -> Vec<f32> {
    let reach = kernel / 2;
    (0..scores.len())
        .map(|i| scores[i.saturating_sub(reach)..(i + reach + 1).min(scores.len())].iter().copied().fold(f32::MIN, f32::max))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against an independent count: an entry is kept iff fewer than
    /// `count` entries beat it (higher score, or equal and earlier).
    #[test]
    fn keeps_exactly_the_entries_fewer_than_count_beat() {
        let scores = [0.5f32, 2.0, -1.0, 2.0, 0.5, 3.0, 0.0, 0.5];
        for count in 0..=scores.len() {
            let kept = keep_top(&scores, count);
            let expected: Vec<usize> = (0..scores.len())
                .filter(|&i| (0..scores.len()).filter(|&j| scores[j] > scores[i] || (scores[j] == scores[i] && j < i)).count() < count)
                .collect();
            assert_eq!(kept, expected, "count {count}");
        }
    }

    #[test]
    fn max_pool_takes_the_neighbourhood_maximum() {
        assert_eq!(max_pool(&[1.0, 5.0, 2.0, 0.0, 0.0, 3.0], 3), vec![5.0, 5.0, 5.0, 2.0, 3.0, 3.0]);
        assert_eq!(max_pool(&[1.0, 5.0, 2.0], 1), vec![1.0, 5.0, 2.0]);
    }
}
