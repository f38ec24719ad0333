//! One optimization step (forward to every layer's V over a 144-token prefix
//! cache, normalised V loss, backward to the virtual embeddings) on the real
//! Qwen2.5-Coder-0.5B-Instruct, CPU, f32; and its peak memory with and
//! without the frozen-weight op.
//!
//! cargo bench -p cram-benches --bench optimization_step

use criterion::{BenchmarkId, Criterion};
use cram::model::ops::WeightGrad;
use cram_benches::{bench_text, load_default_model, peak_extra_bytes, with_weight_grad, CountingAllocator, StepSetup};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const PREFIX_TOKENS: usize = 144;
const VIRTUAL_TOKENS: [usize; 3] = [64, 128, 256];

fn main() -> anyhow::Result<()> {
    // The allocator's purge policy of the `cram` binary, so the timings match it.
    cram_eval::memory::keep_freed_memory();
    let model = load_default_model()?;
    let text = bench_text()?;

    println!("peak extra heap per step (MiB), frozen-weight op vs plain matmul:");
    for n_virtual in VIRTUAL_TOKENS {
        let setup = StepSetup::new(&model, &text, PREFIX_TOKENS, n_virtual)?;
        let mut row = Vec::new();
        for weight_grad in [WeightGrad::Skip, WeightGrad::Compute] {
            let variant = with_weight_grad(&model, weight_grad);
            let (loss, bytes) = peak_extra_bytes(|| setup.step(&variant));
            loss?;
            row.push(bytes as f64 / (1024.0 * 1024.0));
        }
        println!("  n_virtual {n_virtual:>3}: skip {:>8.1} MiB, compute {:>8.1} MiB", row[0], row[1]);
    }

    let mut criterion = Criterion::default().sample_size(10).warm_up_time(std::time::Duration::from_secs(1)).configure_from_args();
    let mut group = criterion.benchmark_group("optimization_step_0.5b_cpu");
    for n_virtual in VIRTUAL_TOKENS {
        let setup = StepSetup::new(&model, &text, PREFIX_TOKENS, n_virtual)?;
        group.bench_with_input(BenchmarkId::from_parameter(n_virtual), &setup, |b, setup| {
            b.iter(|| setup.step(&model).expect("step"))
        });
    }
    group.finish();
    criterion.final_summary();
    Ok(())
}
