//! Timing the parts of one compression on a real model: the target
//! forward, one optimization step, the whole optimization (projected from
//! the step), several spans optimized together, and answer generation; with
//! the FLOPs each step does, the rate achieved, and peak memory.
//!
//! The tokens are the published transcript's (cycled when a size needs more),
//! so timings do not depend on a case's length.

use std::path::Path;
use std::time::Instant;

use candle_core::Tensor;
use cram::recipe::objective::Objective;
use cram::recipe::optimize::optimize_together;
use cram::recipe::settings::default_steps;
use cram::{generate, KvCache, Logits, Model, Qwen2, Qwen2Config, Recipe, SpanTargets, VirtualStart};
use serde::Serialize;

use crate::cases::load_case_file;
use crate::memory::{peak_rss_bytes, reset_peak_rss};
use crate::render::Rendering;
use crate::{EvalError, Result};

/// What one benchmark measures.
#[derive(Debug, Clone)]
pub struct BenchSettings {
    /// Tokens of the verbatim prefix the virtual tokens follow.
    pub prefix_tokens: usize,
    /// Span tokens per virtual token.
    pub ratio: f64,
    /// Optimization steps run; the first half is a warm-up and not counted.
    pub steps: usize,
    /// Tokens generated in the answer timing.
    pub answer_tokens: usize,
    /// Ratios optimized together in the batched timing (empty: skipped).
    pub together_ratios: Vec<f64>,
}

impl Default for BenchSettings {
    fn default() -> Self {
        Self { prefix_tokens: 140, ratio: 3.2, steps: 8, answer_tokens: 32, together_ratios: vec![1.6, 2.4, 3.2, 4.8, 6.4] }
    }
}

impl BenchSettings {
    /// Refuses sizes and settings a bench cannot run, before any model loads.
    pub fn check(&self, sizes: &[usize]) -> Result<()> {
        let invalid = |reason: String| Err(EvalError::Model(cram::Error::Invalid(format!("bench: {reason}"))));
        if sizes.is_empty() || sizes.contains(&0) {
            return invalid(format!("virtual token counts must be at least 1, got {sizes:?}"));
        }
        if self.prefix_tokens == 0 {
            return invalid("the prefix needs at least one token".into());
        }
        if let Some(ratio) = std::iter::once(&self.ratio).chain(&self.together_ratios).find(|ratio| !(ratio.is_finite() && **ratio > 1.0)) {
            return invalid(format!("ratios must be finite and above 1, got {ratio}"));
        }
        Ok(())
    }
}

/// The figures for one size.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRecord {
    pub model: String,
    pub device: String,
    pub threads: usize,
    /// The build measured ([`crate::BUILD`]).
    pub build: &'static str,
    pub prefix_tokens: usize,
    pub span_tokens: usize,
    pub n_virtual: usize,
    /// The span's forward with logits (V targets and surprisal), seconds.
    pub target_forward_seconds: f64,
    pub target_tokens_per_second: f64,
    /// Median over the second half of the steps.
    pub step_seconds: f64,
    /// Matmul FLOPs of one step ([`step_flops`]) over its time.
    pub step_flops: f64,
    pub step_gflops_per_second: f64,
    /// Peak resident memory while stepping, MiB (CPU; the process's RSS).
    pub step_peak_rss_mib: Option<f64>,
    /// The recipe's default step budget for this span.
    pub default_steps: usize,
    /// default_steps × step_seconds: projected, not measured.
    pub projected_optimization_seconds: f64,
    /// The ratios of `together_seconds`, all of this span.
    pub together_ratios: Vec<f64>,
    /// Median step time of those ratios optimized together.
    pub together_step_seconds: Option<f64>,
    /// together_step_seconds / step_seconds.
    pub together_over_single: Option<f64>,
    pub answer_tokens: usize,
    pub answer_tokens_per_second: f64,
}

/// The published transcript rendered with the chat template, as token ids.
pub fn transcript_ids(model: &Model, case_file: &Path) -> Result<Vec<u32>> {
    let cases = load_case_file(case_file)?;
    let case = cases.first().ok_or_else(|| EvalError::Transcript { path: case_file.into(), reason: "no cases".into() })?;
    let messages = &case.transcript.messages;
    let indices: Vec<usize> = (0..messages.len()).collect();
    Ok(model.tokenizer.encode(&Rendering::Chatml.messages(messages, &indices))?)
}

/// Matmul FLOPs of one optimization step of `n_virtual` tokens over
/// `cached` entries: the forward to the last layer's V projection, and the
/// backward to the embeddings only (a linear layer's input gradient costs
/// its forward again; attention's backward, four products against the
/// forward's two, twice its forward). Masked scores are counted: they are
/// computed. Norms, softmax and the elementwise rest are left out.
pub fn step_flops(config: &Qwen2Config, n_virtual: usize, cached: usize) -> f64 {
    let hidden = config.hidden_size as f64;
    let q_dim = (config.num_attention_heads * config.head_dim()) as f64;
    let kv_dim = (config.num_key_value_heads * config.head_dim()) as f64;
    let n = n_virtual as f64;
    let qkv = hidden * (q_dim + 2.0 * kv_dim);
    let per_layer_linear = qkv + q_dim * hidden + 3.0 * hidden * config.intermediate_size as f64;
    let attention = 2.0 * n * (cached as f64 + n) * q_dim; // QK^T and PV, multiply-adds
    let full_layers = config.num_hidden_layers.saturating_sub(1) as f64;
    let linear_forward = 2.0 * n * (full_layers * per_layer_linear + qkv);
    let attention_forward = 2.0 * full_layers * attention;
    2.0 * linear_forward + 3.0 * attention_forward
}

/// Times every part for `n_virtual` virtual tokens, on tokens drawn from `ids`.
pub fn measure(model: &Model, ids: &[u32], n_virtual: usize, settings: &BenchSettings) -> Result<BenchRecord> {
    settings.check(&[n_virtual])?;
    if ids.is_empty() {
        return Err(EvalError::Model(cram::Error::Invalid("bench: the transcript has no tokens".into())));
    }
    let qwen = &model.qwen2;
    let span_tokens = (n_virtual as f64 * settings.ratio).round() as usize;
    let tokens: Vec<u32> = ids.iter().copied().cycle().take(settings.prefix_tokens + span_tokens).collect();
    let positions: Vec<f32> = (0..tokens.len()).map(|p| p as f32).collect();
    let (prefix_ids, span_ids) = tokens.split_at(settings.prefix_tokens);
    let prefix = prefix_cache(qwen, prefix_ids, &positions[..settings.prefix_tokens])?;

    let started = Instant::now();
    let span = SpanTargets::compute(qwen, &prefix, span_ids, &positions[settings.prefix_tokens..])?;
    let target_forward_seconds = started.elapsed().as_secs_f64();

    let single = Recipe::published(settings.ratio).virtual_start_sized(qwen, &prefix, &span, n_virtual)?;
    reset_peak_rss();
    let (step_seconds, compressed) = time_steps(qwen, &prefix, std::slice::from_ref(&single), settings.steps)?;
    let step_peak_rss_mib = peak_rss_bytes().map(|bytes| bytes as f64 / (1024.0 * 1024.0));

    let together_step_seconds = if settings.together_ratios.is_empty() {
        None
    } else {
        let starts = settings
            .together_ratios
            .iter()
            .map(|&ratio| Recipe::published(ratio).virtual_start(qwen, &prefix, &span))
            .collect::<cram::Result<Vec<_>>>()?;
        Some(time_steps(qwen, &prefix, &starts, settings.steps)?.0)
    };

    let (answer_seconds, answer_tokens) = time_answer(qwen, compressed, &tokens[..8.min(tokens.len())], settings.answer_tokens)?;
    let flops = step_flops(qwen.config(), n_virtual, prefix.len());
    Ok(BenchRecord {
        model: model.name.clone(),
        device: format!("{:?}", qwen.device()),
        threads: candle_core::utils::get_num_threads(),
        build: crate::BUILD,
        prefix_tokens: settings.prefix_tokens,
        span_tokens,
        n_virtual,
        target_forward_seconds,
        target_tokens_per_second: span_tokens as f64 / target_forward_seconds,
        step_seconds,
        step_flops: flops,
        step_gflops_per_second: flops / step_seconds / 1e9,
        step_peak_rss_mib,
        default_steps: default_steps(span_tokens),
        projected_optimization_seconds: default_steps(span_tokens) as f64 * step_seconds,
        together_ratios: settings.together_ratios.clone(),
        together_step_seconds,
        together_over_single: together_step_seconds.map(|together| together / step_seconds),
        answer_tokens,
        answer_tokens_per_second: answer_tokens as f64 / answer_seconds,
    })
}

/// The prefix's K/V, kept verbatim.
pub fn prefix_cache(model: &Qwen2, ids: &[u32], positions: &[f32]) -> Result<KvCache> {
    let output = model.forward(&model.embed(ids)?, positions, None, Logits::None)?;
    let mut cache = KvCache::new();
    cache.append(&output.keys, &output.values, positions)?;
    Ok(cache)
}

/// Runs `steps` optimization steps of `starts` together; returns the median
/// step time over the second half of the steps, and the prefix extended by the result.
fn time_steps(model: &Qwen2, prefix: &KvCache, starts: &[VirtualStart], steps: usize) -> Result<(f64, KvCache)> {
    let objectives: Vec<Objective> =
        starts.iter().map(|start| start.objective(prefix)).collect();
    let inits: Vec<Tensor> = starts.iter().map(|start| start.init.clone()).collect();
    let mut step_ends = vec![Instant::now()];
    let config = cram::OptimizerConfig::default();
    let optimized = optimize_together(model, &objectives, &inits, &config, steps.max(2), &mut |_, _| {
        step_ends.push(Instant::now());
    })?;
    // The first half warms up: the allocator reaches its steady state only
    // after a few steps (glibc's malloc, for one, raises its mmap threshold
    // as buffers are freed), and the first steps' times mislead.
    let warm_up = step_ends.len() / 2;
    let mut seconds: Vec<f64> = step_ends.windows(2).skip(warm_up).map(|pair| (pair[1] - pair[0]).as_secs_f64()).collect();
    seconds.sort_by(f64::total_cmp);
    let mut compressed = prefix.clone();
    let first = &optimized[0];
    compressed.append(&first.keys, &first.values, &starts[0].positions)?;
    Ok((seconds[seconds.len() / 2], compressed))
}

/// Greedy decoding of exactly `max_tokens` tokens (no stop token) after a
/// short prompt; returns seconds and tokens generated.
fn time_answer(model: &Qwen2, mut cache: KvCache, prompt: &[u32], max_tokens: usize) -> Result<(f64, usize)> {
    let first_position = cache.next_position();
    let started = Instant::now();
    let answer = generate::greedy(model, &mut cache, prompt, first_position, max_tokens, &[])?;
    Ok((started.elapsed().as_secs_f64(), answer.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impossible_bench_settings_are_refused_before_any_model_loads() {
        let settings = BenchSettings::default();
        assert!(settings.check(&[64, 128]).is_ok());
        assert!(settings.check(&[64, 0]).unwrap_err().to_string().contains("at least 1"));
        assert!(settings.check(&[]).is_err());
        let no_prefix = BenchSettings { prefix_tokens: 0, ..BenchSettings::default() };
        assert!(no_prefix.check(&[64]).unwrap_err().to_string().contains("prefix"));
        let bad_ratio = BenchSettings { ratio: 1.0, ..BenchSettings::default() };
        assert!(bad_ratio.check(&[64]).unwrap_err().to_string().contains("above 1"));
        let bad_together = BenchSettings { together_ratios: vec![2.0, f64::NAN], ..BenchSettings::default() };
        assert!(bad_together.check(&[64]).is_err());
    }
}
