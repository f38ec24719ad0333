//! Timing the parts of one compression: the target forward, one
//! optimization step, the whole optimization (projected from the step, and
//! optionally run), several spans optimized together, and answer
//! generation; with the FLOPs each step does, the rate achieved, and peak
//! memory (host, and on a GPU the driver's count). Also, when asked, the
//! compaction of the same span by methods that do not optimise (attention
//! matching, KVzip, eviction): their own work, the span's targets excluded.
//!
//! On a real model the tokens are the published transcript's (cycled when
//! a size needs more), so timings do not depend on a case's length; on a
//! random-weight model of a real shape ([`cram::synthetic`]) they are
//! [`synthetic_ids`]. Every timed part ends with a device synchronization,
//! and [`warm_up`] first runs each part once, so that loading GPU kernels
//! is not timed.

use std::path::Path;
use std::time::Instant;

use candle_core::Tensor;
use cram::recipe::objective::Objective;
use cram::recipe::optimize::optimize_together;
use cram::recipe::settings::default_steps;
use cram::registry::{self, MethodOptions};
use cram::{generate, Compressor, KvCache, Logits, Model, Qwen2, Qwen2Config, Recipe, SpanTargets, VirtualStart};
use serde::Serialize;

use crate::cases::load_case_file;
use crate::memory::{device_memory, peak_rss_bytes, reset_device_peak, reset_peak_rss, DeviceMemory};
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
    /// Answers decoded together in the second answer timing (a case's
    /// questions, [`generate::greedy_together`]); 0 skips it.
    pub answer_rows: usize,
    /// Ratios optimized together in the batched timing (empty: skipped).
    pub together_ratios: Vec<f64>,
    /// Also run a whole compression of this many steps (targets, start,
    /// optimization) and time it; `None` skips it.
    pub compression_steps: Option<usize>,
    /// Methods that do not optimise whose compaction of the span at
    /// `ratio` is timed: a registry name, or a name, `:` and a JSON object
    /// of its knobs (`attention-matching:{"budgets":"uniform"}`).
    pub methods: Vec<String>,
}

impl Default for BenchSettings {
    fn default() -> Self {
        Self {
            prefix_tokens: 140,
            ratio: 3.2,
            steps: 8,
            answer_tokens: 32,
            answer_rows: 8,
            together_ratios: vec![1.6, 2.4, 3.2, 4.8, 6.4],
            compression_steps: None,
            methods: Vec::new(),
        }
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
        for spec in &self.methods {
            self.compressor(spec)?;
        }
        Ok(())
    }

    /// The method `spec` names, built at `ratio`; one that optimises is
    /// refused (the recipe is timed by its steps).
    fn compressor(&self, spec: &str) -> Result<Box<dyn Compressor>> {
        let invalid = |reason: String| EvalError::Model(cram::Error::Invalid(format!("bench: method `{spec}`: {reason}")));
        let (name, knobs) = match spec.split_once(':') {
            Some((name, json)) => (name, serde_json::from_str(json).map_err(|e| invalid(format!("its knobs are not a JSON object: {e}")))?),
            None => (spec, serde_json::Value::Object(Default::default())),
        };
        let method = registry::method(name)?;
        if method.optimizes() {
            return Err(invalid("it optimises; the recipe is timed by its steps".into()));
        }
        Ok(method.build(&MethodOptions { knobs, ..MethodOptions::new(self.ratio) })?)
    }
}

/// Compactions timed per method: a warm-up, then the median of this many.
pub const COMPACTION_RUNS: usize = 3;

/// One method's compaction of the bench span.
#[derive(Debug, Clone, Serialize)]
pub struct CompactionTiming {
    /// The method as results name it.
    pub method: String,
    /// Median of [`COMPACTION_RUNS`] compactions after a warm-up, seconds:
    /// the method's own work (a repeat pass, fits, scores), not the span's
    /// targets, which a session computes to read the span anyway.
    pub seconds: f64,
    /// Entries kept per head.
    pub n_kept: usize,
    /// The fit's relative output error, for methods that fit.
    pub fit_error: Option<f64>,
}

/// The figures for one size.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRecord {
    pub model: String,
    pub device: String,
    /// The weights' and activations' dtype.
    pub dtype: String,
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
    /// Peak resident memory while stepping, MiB (the process's RSS).
    pub step_peak_rss_mib: Option<f64>,
    /// GPU memory before the target forward (weights and prefix), from the driver.
    pub device_memory_at_rest: Option<DeviceMemory>,
    /// Peak GPU memory held by tensors during the target forward, MiB.
    pub target_peak_device_mib: Option<f64>,
    /// Peak GPU memory held by tensors while stepping, MiB.
    pub step_peak_device_mib: Option<f64>,
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
    /// Peak GPU memory held by tensors while stepping the ratios together, MiB.
    pub together_peak_device_mib: Option<f64>,
    /// Why the ratios could not be stepped together (out of memory, say).
    pub together_error: Option<String>,
    /// Steps of the timed whole compression ([`BenchSettings::compression_steps`]).
    pub compression_steps: Option<usize>,
    /// Wall time of that compression: target forward, start, optimization.
    pub compression_seconds: Option<f64>,
    pub answer_tokens: usize,
    pub answer_tokens_per_second: f64,
    /// Answers decoded together in the second timing.
    pub answer_rows: usize,
    /// Tokens of all those answers a second, decoded together.
    pub answer_tokens_per_second_together: Option<f64>,
    /// Why the answers could not be decoded together (the rest of the
    /// record stands).
    pub answer_together_error: Option<String>,
    /// [`BenchSettings::methods`]' compactions of the span.
    pub compactions: Vec<CompactionTiming>,
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

/// Token ids for a random-weight model: `count` ids spread over its
/// vocabulary by a fixed stride (the timings do not depend on which).
pub fn synthetic_ids(vocab_size: usize, count: usize) -> Vec<u32> {
    const STRIDE: usize = 7_919; // a prime: successive ids differ
    (0..count).map(|i| ((i * STRIDE + 1) % vocab_size) as u32).collect()
}

/// Runs every part once at `n_virtual` with two steps, untimed: the first
/// use of each GPU kernel loads (and JIT-compiles) its module, which would
/// otherwise land in whichever timing comes first.
pub fn warm_up(model: &Model, ids: &[u32], n_virtual: usize, settings: &BenchSettings) -> Result<()> {
    let quick = BenchSettings { steps: 2, compression_steps: None, together_ratios: settings.together_ratios.iter().copied().take(2).collect(), ..settings.clone() };
    measure(model, ids, n_virtual, &quick).map(|_| ())
}

/// Times every part for `n_virtual` virtual tokens, on tokens drawn from `ids`.
pub fn measure(model: &Model, ids: &[u32], n_virtual: usize, settings: &BenchSettings) -> Result<BenchRecord> {
    settings.check(&[n_virtual])?;
    if ids.is_empty() {
        return Err(EvalError::Model(cram::Error::Invalid("bench: the transcript has no tokens".into())));
    }
    let qwen = &model.qwen2;
    let device = qwen.device();
    let span_tokens = (n_virtual as f64 * settings.ratio).round() as usize;
    let tokens: Vec<u32> = ids.iter().copied().cycle().take(settings.prefix_tokens + span_tokens).collect();
    let positions: Vec<f32> = (0..tokens.len()).map(|p| p as f32).collect();
    let (prefix_ids, span_ids) = tokens.split_at(settings.prefix_tokens);
    let prefix = prefix_cache(qwen, prefix_ids, &positions[..settings.prefix_tokens])?;
    let span_positions = &positions[settings.prefix_tokens..];

    let device_memory_at_rest = device_memory(device);
    reset_device_peak(device);
    let started = Instant::now();
    let span = SpanTargets::compute(qwen, &prefix, span_ids, span_positions)?;
    device.synchronize()?;
    let target_forward_seconds = started.elapsed().as_secs_f64();
    let target_peak_device_mib = device_memory(device).map(|memory| memory.peak_mib);

    let single = Recipe::published(settings.ratio).virtual_start_sized(model, &prefix, &span, n_virtual)?;
    reset_peak_rss();
    reset_device_peak(device);
    let (step_seconds, compressed) = time_steps(qwen, &prefix, std::slice::from_ref(&single), settings.steps)?;
    let step_peak_rss_mib = peak_rss_bytes().map(|bytes| bytes as f64 / (1024.0 * 1024.0));
    let step_peak_device_mib = device_memory(device).map(|memory| memory.peak_mib);

    let mut together_error = None;
    let (together_step_seconds, together_peak_device_mib) = if settings.together_ratios.is_empty() {
        (None, None)
    } else {
        let starts = settings
            .together_ratios
            .iter()
            .map(|&ratio| Recipe::published(ratio).virtual_start(model, &prefix, &span))
            .collect::<cram::Result<Vec<_>>>()?;
        reset_device_peak(device);
        // All the ratios' tokens attend to each other before the mask
        // removes it, so memory grows with the square of their sum: a span
        // the device holds alone may not fit batched. That is a finding to
        // record, not a reason to lose the other figures.
        match time_steps(qwen, &prefix, &starts, settings.steps) {
            Ok((seconds, _)) => (Some(seconds), device_memory(device).map(|memory| memory.peak_mib)),
            Err(error) => {
                together_error = Some(error.to_string());
                (None, None)
            }
        }
    };

    let compression_seconds =
        settings.compression_steps.map(|steps| time_compression(model, &prefix, span_ids, span_positions, n_virtual, settings.ratio, steps)).transpose()?;
    let prompt = &tokens[..8.min(tokens.len())];
    let (answer_seconds, answer_tokens) = time_answer(qwen, compressed.clone(), prompt, settings.answer_tokens)?;
    let (answer_tokens_per_second_together, answer_together_error) = match (settings.answer_rows > 0)
        .then(|| time_answers_together(qwen, &compressed, prompt, settings.answer_rows, settings.answer_tokens))
    {
        Some(Ok((seconds, tokens))) => (Some(tokens as f64 / seconds), None),
        Some(Err(error)) => (None, Some(error.to_string())),
        None => (None, None),
    };
    let compactions = settings.methods.iter().map(|spec| time_compaction(model, &prefix, span_ids, span_positions, &*settings.compressor(spec)?)).collect::<Result<_>>()?;
    let flops = step_flops(qwen.config(), n_virtual, prefix.len());
    Ok(BenchRecord {
        model: model.name.clone(),
        device: format!("{device:?}"),
        dtype: format!("{:?}", qwen.dtype()),
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
        device_memory_at_rest,
        target_peak_device_mib,
        step_peak_device_mib,
        default_steps: default_steps(span_tokens),
        projected_optimization_seconds: default_steps(span_tokens) as f64 * step_seconds,
        together_ratios: settings.together_ratios.clone(),
        together_step_seconds,
        together_over_single: together_step_seconds.map(|together| together / step_seconds),
        together_peak_device_mib,
        together_error,
        compression_steps: settings.compression_steps,
        compression_seconds,
        answer_tokens,
        answer_tokens_per_second: answer_tokens as f64 / answer_seconds,
        answer_rows: settings.answer_rows,
        answer_tokens_per_second_together,
        answer_together_error,
        compactions,
    })
}

/// `compressor`'s compaction of the span, after its targets (with what
/// it reads of them: surprisal, the span's own queries).
fn time_compaction(model: &Model, prefix: &KvCache, span_ids: &[u32], span_positions: &[f32], compressor: &dyn Compressor) -> Result<CompactionTiming> {
    let span = SpanTargets::compute_for(&model.qwen2, prefix, span_ids, span_positions, compressor.needs_surprisal(), compressor.needs_span_queries())?;
    let mut seconds = Vec::with_capacity(COMPACTION_RUNS);
    let mut last = None;
    for run in 0..=COMPACTION_RUNS {
        let started = Instant::now();
        let compressed = compressor.compress(model, prefix, &span, &mut |_, _| {})?;
        compressed.values[0].device().synchronize()?;
        if run > 0 {
            seconds.push(started.elapsed().as_secs_f64());
        }
        last = Some(compressed);
    }
    seconds.sort_by(f64::total_cmp);
    let report = last.expect("at least one run").report;
    Ok(CompactionTiming { method: compressor.name(), seconds: seconds[seconds.len() / 2], n_kept: report.n_kept, fit_error: report.fit_error })
}

/// One whole compression of the span to `n_virtual` tokens with `steps`
/// steps, as a user runs it: the span's targets, the recipe's start, the
/// optimization and the final entries. Returns its wall time.
fn time_compression(model: &Model, prefix: &KvCache, span_ids: &[u32], span_positions: &[f32], n_virtual: usize, ratio: f64, steps: usize) -> Result<f64> {
    let mut recipe = Recipe::published(ratio);
    recipe.optimizer.steps = Some(steps);
    let started = Instant::now();
    let span = SpanTargets::compute(&model.qwen2, prefix, span_ids, span_positions)?;
    let compressed = recipe.compress_sized(recipe.name(), model, prefix, &span, n_virtual, &mut |_, _| {})?;
    compressed.values[0].device().synchronize()?;
    Ok(started.elapsed().as_secs_f64())
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
    model.device().synchronize()?;
    Ok((started.elapsed().as_secs_f64(), answer.len()))
}

/// `rows` answers of exactly `max_tokens` tokens each, decoded together
/// after the same prompt; returns seconds and tokens generated in all.
fn time_answers_together(model: &Qwen2, cache: &KvCache, prompt: &[u32], rows: usize, max_tokens: usize) -> Result<(f64, usize)> {
    let prompts = vec![prompt.to_vec(); rows];
    let started = Instant::now();
    let answers = generate::greedy_together(model, cache, &prompts, cache.next_position(), max_tokens, &[])?;
    model.device().synchronize()?;
    Ok((started.elapsed().as_secs_f64(), answers.iter().map(Vec::len).sum()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every method asked is timed on the span, kept at its budget, and
    /// reports a fit error when it fits.
    #[test]
    fn the_methods_asked_are_timed_on_the_span() {
        let model = cram::synthetic::full_model(&cram::synthetic::tiny_config(), 5, &candle_core::Device::Cpu).unwrap();
        let ids = synthetic_ids(model.qwen2.config().vocab_size, 64);
        let methods = vec!["kvzip".to_string(), r#"attention-matching:{"queries":"context"}"#.to_string()];
        let settings = BenchSettings { prefix_tokens: 4, steps: 2, answer_tokens: 2, together_ratios: Vec::new(), methods, ..BenchSettings::default() };
        let record = measure(&model, &ids, 5, &settings).unwrap();
        let kept = cram::budget(record.span_tokens, settings.ratio).unwrap();
        let names: Vec<&str> = record.compactions.iter().map(|c| c.method.as_str()).collect();
        assert_eq!(names, ["kvzip", "attention-matching-context-spread"]);
        assert!(record.compactions.iter().all(|c| c.n_kept == kept && c.seconds > 0.0));
        assert!(record.compactions[0].fit_error.is_none() && record.compactions[1].fit_error.is_some());
        assert!(record.answer_tokens_per_second_together.is_some_and(|rate| rate > 0.0), "8 answers decoded together are timed");
    }

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
        let methods = |specs: &[&str]| BenchSettings { methods: specs.iter().map(|s| s.to_string()).collect(), ..BenchSettings::default() };
        assert!(methods(&["kvzip", r#"attention-matching:{"budgets":"spread","queries":"context"}"#]).check(&[64]).is_ok());
        assert!(methods(&["surprisal"]).check(&[64]).unwrap_err().to_string().contains("optimises"));
        assert!(methods(&["no-such-method"]).check(&[64]).unwrap_err().to_string().contains("unknown method"));
        assert!(methods(&[r#"kvzip:{"query_kap":1}"#]).check(&[64]).is_err(), "an unknown knob");
        assert!(methods(&["kvzip:{"]).check(&[64]).unwrap_err().to_string().contains("JSON"));
    }
}
