//! The parts of one attention-matching compaction of a 250-token span
//! (after a 140-token prefix) on the real Qwen2.5-Coder-0.5B-Instruct,
//! CPU, f32: the span's targets (its K/V, no logits), the repeat pass that
//! yields the reference queries, the per-head fits of all 48 (layer, KV
//! head) pairs at 3.2x with uniform and spread budgets, and whole
//! compactions by attention matching (uniform and spread budgets, repeat
//! or the span's own queries, on-policy with the heads weighed by an
//! ordinary repeat pass or by a fixed profile) and by KVzip, targets excluded
//! (in a session the span's K/V, and its own queries if asked for, come
//! from the forward that reads it anyway). Issue 26's goal
//! is the repeat pass plus the fit under 2 s.
//!
//! cargo bench -p cram-benches --bench attention_matching

use criterion::Criterion;
use cram::matching::budgets::{BudgetWeights, Budgets};
use cram::methods::attention_matching::head_weights;
use cram::matching::queries::{reference_queries, QuerySource};
use cram::{budget, AttentionMatching, Compressor, KvZip, KvZipSettings, MatchingSettings, SpanTargets};
use cram_benches::{load_default_model, BearingSpan, CountingAllocator};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const PREFIX_TOKENS: usize = 140;
const SPAN_TOKENS: usize = 250;
const RATIO: f64 = 3.2;

fn main() -> anyhow::Result<()> {
    // The allocator's purge policy of the `cram` binary, so the timings match it.
    cram_eval::memory::keep_freed_memory();
    let model = load_default_model()?;
    let qwen = &model.qwen2;
    let BearingSpan { prefix, ids, positions } = BearingSpan::new(&model, PREFIX_TOKENS, SPAN_TOKENS)?;
    let (span_ids, span_positions) = (ids.as_slice(), positions.as_slice());
    let span = SpanTargets::compute_without_surprisal(qwen, &prefix, span_ids, span_positions)?;
    let t = budget(span.len(), RATIO)?;

    let mut criterion = Criterion::default().sample_size(10).warm_up_time(std::time::Duration::from_secs(1)).configure_from_args();
    criterion.bench_function("targets_250_tokens", |b| {
        b.iter(|| SpanTargets::compute_without_surprisal(qwen, &prefix, span_ids, span_positions).expect("targets"))
    });
    // What keeping the span's own queries adds to that forward.
    criterion.bench_function("targets_250_tokens_with_queries", |b| {
        b.iter(|| SpanTargets::compute_for(qwen, &prefix, span_ids, span_positions, false, true).expect("targets"))
    });
    let defaults = MatchingSettings::default();
    criterion.bench_function("repeat_queries_250_tokens", |b| {
        b.iter(|| reference_queries(&model, &prefix, &span, QuerySource::Repeat, defaults.query_cap, defaults.seed).expect("queries"))
    });
    let mut group = criterion.benchmark_group("compaction_250_tokens_3.2x");
    for budgets in [Budgets::Uniform, Budgets::Spread] {
        let matching = AttentionMatching { settings: MatchingSettings { budgets, ..defaults.clone() }, ratio: RATIO };
        let queries = reference_queries(&model, &prefix, &span, QuerySource::Repeat, defaults.query_cap, defaults.seed)?;
        group.bench_function(format!("fits_only_{budgets:?}"), |b| b.iter(|| matching.fit_heads(&model, &span, &queries, t).expect("fits")));
        group.bench_function(format!("{}", matching.name()), |b| {
            b.iter(|| matching.compress(&model, &prefix, &span, &mut |_, _| {}).expect("compaction"))
        });
    }
    // The span's own queries, kept by the targets' forward: no repeat pass.
    let span_with_queries = SpanTargets::compute_for(qwen, &prefix, span_ids, span_positions, false, true)?;
    let context = AttentionMatching { settings: MatchingSettings { budgets: Budgets::Spread, queries: QuerySource::Context, ..defaults.clone() }, ratio: RATIO };
    group.bench_function(context.name(), |b| b.iter(|| context.compress(&model, &prefix, &span_with_queries, &mut |_, _| {}).expect("compaction")));
    let on_policy = AttentionMatching { settings: MatchingSettings { on_policy: true, ..defaults.clone() }, ratio: RATIO };
    group.bench_function(on_policy.name(), |b| b.iter(|| on_policy.compress(&model, &prefix, &span, &mut |_, _| {}).expect("compaction")));
    // On-policy with its heads weighed by a fixed profile (here the span's
    // own weights, so the same budgets): one repeat pass, not two.
    let profile = head_weights(&model, &span, &reference_queries(&model, &prefix, &span, QuerySource::Repeat, defaults.query_cap, defaults.seed)?)?;
    let by_profile = AttentionMatching { settings: MatchingSettings { on_policy: true, budget_weights: Some(BudgetWeights::Profile(profile)), ..defaults.clone() }, ratio: RATIO };
    group.bench_function(by_profile.name(), |b| b.iter(|| by_profile.compress(&model, &prefix, &span, &mut |_, _| {}).expect("compaction")));
    let kvzip = KvZip { settings: KvZipSettings::default(), ratio: RATIO };
    group.bench_function("kvzip", |b| b.iter(|| kvzip.compress(&model, &prefix, &span, &mut |_, _| {}).expect("kvzip")));
    group.finish();
    criterion.final_summary();
    Ok(())
}
