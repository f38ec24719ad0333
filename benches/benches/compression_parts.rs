//! The parts of one compression besides the step (see `optimization_step`)
//! on the real Qwen2.5-Coder-0.5B-Instruct, CPU, f32: the span's target
//! forward (V and surprisal), one step (and the closing forward that reads
//! the result) of five ratios of that span optimized together against one
//! ratio alone, and greedy answer generation.
//!
//! cargo bench -p cram-benches --bench compression_parts

use criterion::{BenchmarkId, Criterion};
use cram::recipe::objective::Objective;
use cram::recipe::optimize::optimize_together;
use cram::{generate, OptimizerConfig, Recipe, SpanTargets};
use cram_benches::{load_default_model, BearingSpan, CountingAllocator};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const PREFIX_TOKENS: usize = 140;
const SPAN_TOKENS: usize = 208;
const RATIOS: [f64; 5] = [1.6, 2.4, 3.2, 4.8, 6.4];
const ANSWER_TOKENS: usize = 32;

fn main() -> anyhow::Result<()> {
    // The allocator's purge policy of the `cram` binary, so the timings match it.
    cram_eval::memory::keep_freed_memory();
    let model = load_default_model()?;
    let qwen = &model.qwen2;
    let BearingSpan { prefix, ids: span_ids, positions: span_positions } = BearingSpan::new(&model, PREFIX_TOKENS, SPAN_TOKENS)?;
    let span = SpanTargets::compute(qwen, &prefix, &span_ids, &span_positions)?;

    let mut criterion = Criterion::default().sample_size(10).warm_up_time(std::time::Duration::from_secs(1)).configure_from_args();
    criterion.bench_function("target_forward_208_tokens", |b| {
        b.iter(|| SpanTargets::compute(qwen, &prefix, &span_ids, &span_positions).expect("targets"))
    });

    let starts: Vec<_> = RATIOS.iter().map(|&ratio| Recipe::published(ratio).virtual_start(&model, &prefix, &span)).collect::<cram::Result<_>>()?;
    let mut group = criterion.benchmark_group("one_step_and_final_forward");
    for (label, chosen) in [("3.2x alone", &starts[2..3]), ("5 ratios together", &starts[..])] {
        let objectives: Vec<Objective> =
            chosen.iter().map(|s| s.objective(&prefix)).collect();
        let inits: Vec<_> = chosen.iter().map(|s| s.init.clone()).collect();
        group.bench_with_input(BenchmarkId::from_parameter(label), &objectives, |b, objectives| {
            b.iter(|| optimize_together(qwen, objectives, &inits, &OptimizerConfig::default(), 1, &mut |_, _| {}).expect("step"))
        });
    }
    group.finish();

    criterion.bench_function("answer_32_tokens", |b| {
        b.iter(|| {
            let mut cache = prefix.clone();
            generate::greedy(qwen, &mut cache, &span_ids[..8], PREFIX_TOKENS as f32, ANSWER_TOKENS, &[]).expect("answer")
        })
    });
    criterion.final_summary();
    Ok(())
}
