//! Step 5: compressors. Each method is one small unit behind [`Compressor`]:
//! span in, KV entries to append out. The published recipe, and the sanity
//! baseline that keeps the span's own KV, sit side by side.

use serde::{Deserialize, Serialize};

use crate::cache::{select_entries, KvCache};
use crate::model::{Logits, Qwen2};
use crate::init::Init;
use crate::optimize::{optimise, optimise_together, KeyTargets, Objective, OptimizationReport, Optimized, OptimizerConfig};
use crate::pooling::{self, Pooling};
use crate::positions::{virtual_positions, PositionMode};
use crate::targets::SpanTargets;
use crate::Result;
use candle_core::Tensor;

/// KV entries that stand for a span, ready to append to the cache that
/// held the prefix.
#[derive(Debug, Clone)]
pub struct CompressedSpan {
    /// Per layer, (1, kv_heads, n_kept, head_dim), RoPE applied.
    pub keys: Vec<Tensor>,
    /// Per layer, (1, kv_heads, n_kept, head_dim).
    pub values: Vec<Tensor>,
    /// (n_kept): the entries' positions, inside the span's range.
    pub positions: Vec<f32>,
    /// What the compression did.
    pub report: CompressionReport,
}

impl CompressedSpan {
    /// Appends the entries to `cache`.
    pub fn append_to(&self, cache: &mut KvCache) -> Result<()> {
        cache.append(&self.keys, &self.values, &self.positions)
    }

    /// The span's own KV entries, all of them, under `method`: what
    /// verbatim-keeping methods select from.
    pub fn real_entries(span: &SpanTargets, method: String) -> Self {
        Self {
            keys: span.keys.clone(),
            values: span.values.clone(),
            positions: span.positions.clone(),
            report: CompressionReport::new(method, span.len(), span.len()),
        }
    }

    /// No entries: the span is dropped (what follows keeps its positions).
    pub fn empty(report: CompressionReport) -> Self {
        Self { keys: Vec::new(), values: Vec::new(), positions: Vec::new(), report }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    /// Whether the span is represented by no entries.
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// The entries at `indices` (in that order); the report is kept, with
    /// `n_kept` updated.
    pub fn select(&self, indices: &[usize]) -> Result<Self> {
        if let Some(bad) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(crate::Error::Invalid(format!("entry {bad} of a span of {} entries", self.len())));
        }
        let mut report = self.report.clone();
        report.n_kept = indices.len();
        Ok(Self {
            keys: select_entries(&self.keys, indices)?,
            values: select_entries(&self.values, indices)?,
            positions: indices.iter().map(|&i| self.positions[i]).collect(),
            report,
        })
    }

    /// `self`'s entries followed by `other`'s, under `self`'s report with
    /// `n_kept` summed.
    pub fn followed_by(&self, other: &Self) -> Result<Self> {
        let join = |a: &[Tensor], b: &[Tensor]| {
            a.iter().zip(b).map(|(a, b)| Ok(Tensor::cat(&[a, b], 2)?)).collect::<Result<Vec<_>>>()
        };
        let mut report = self.report.clone();
        report.n_kept += other.report.n_kept;
        Ok(Self {
            keys: join(&self.keys, &other.keys)?,
            values: join(&self.values, &other.values)?,
            positions: self.positions.iter().chain(&other.positions).copied().collect(),
            report,
        })
    }
}

/// What a compression did, for reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompressionReport {
    /// The compressor's name (`surprisal`, `hybrid`, ...).
    pub method: String,
    /// Tokens of the span.
    pub n_tokens: usize,
    /// Cache entries that stand for the span.
    pub n_kept: usize,
    /// The optimisation's report, for methods that optimise.
    pub optimization: Option<OptimizationReport>,
    /// The text that replaced the span, for text-level methods (the summary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl CompressionReport {
    /// The report of a method that neither optimises nor writes text.
    pub fn new(method: String, n_tokens: usize, n_kept: usize) -> Self {
        Self { method, n_tokens, n_kept, optimization: None, text: None }
    }
}

/// A way of turning a span into fewer cache entries.
pub trait Compressor {
    /// A short name for reports (`surprisal`, `uniform`, `raw`, ...).
    fn name(&self) -> String;

    /// Compresses the span whose targets were computed over `prefix`.
    /// `on_step(step, loss)` reports progress of iterative methods.
    fn compress(
        &self,
        model: &Qwen2,
        prefix: &KvCache,
        span: &SpanTargets,
        on_step: &mut dyn FnMut(usize, f32),
    ) -> Result<CompressedSpan>;
}

/// The published method: surprisal- (or uniformly) pooled V targets,
/// chunk-mean initial embeddings, interpolated positions, Adam on V at
/// every layer. Two extensions, off by default: matching the keys too
/// (`key_weight`), and other starting points (`init`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    /// Compression ratio: span tokens / virtual tokens.
    pub ratio: f64,
    /// How the V targets are pooled.
    pub pooling: Pooling,
    /// Whether virtual positions are rounded.
    pub positions: PositionMode,
    /// Adam's settings and the step budget.
    pub optimizer: OptimizerConfig,
    /// Weight of the K term (keys pooled and matched before RoPE) against
    /// the V term; 0 is the published V-only objective.
    #[serde(default)]
    pub key_weight: f64,
    /// Where the virtual embeddings start.
    #[serde(default)]
    pub init: Init,
}

impl Recipe {
    /// The published settings at `ratio`.
    pub fn published(ratio: f64) -> Self {
        Self {
            ratio,
            pooling: Pooling::Surprisal,
            positions: PositionMode::Rounded,
            optimizer: OptimizerConfig::default(),
            key_weight: 0.0,
            init: Init::ChunkMean,
        }
    }
}

/// Where the recipe's optimisation starts: initial embeddings at
/// interpolated positions, and the pooled targets they must reach.
#[derive(Debug, Clone)]
pub struct VirtualStart {
    /// (1, n_virtual, hidden) f32
    pub init: Tensor,
    /// (n_virtual)
    pub positions: Vec<f32>,
    /// Per layer, (1, kv_heads, n_virtual, head_dim) f32: pooled Values.
    pub targets: Vec<Tensor>,
    /// Per layer, (1, kv_heads, n_virtual, head_dim) f32: pooled keys with
    /// RoPE undone; empty for the V-only objective.
    pub key_targets: Vec<Tensor>,
    /// The K term's weight.
    pub key_weight: f64,
}

impl VirtualStart {
    /// What the optimiser fits, after `prefix`.
    pub fn objective<'a>(&'a self, prefix: &'a KvCache) -> Objective<'a> {
        let keys = (!self.key_targets.is_empty()).then_some(KeyTargets { targets: &self.key_targets, weight: self.key_weight });
        Objective { prefix, positions: &self.positions, targets: &self.targets, keys }
    }
}

impl Recipe {
    /// Pools the span into this recipe's starting point (no optimisation).
    pub fn virtual_start(&self, model: &Qwen2, prefix: &KvCache, span: &SpanTargets) -> Result<VirtualStart> {
        self.virtual_start_sized(model, prefix, span, pooling::n_virtual(span.len(), self.ratio)?)
    }

    /// The starting point with exactly `n_virtual` virtual tokens.
    pub fn virtual_start_sized(&self, model: &Qwen2, prefix: &KvCache, span: &SpanTargets, n_virtual: usize) -> Result<VirtualStart> {
        let n_tokens = span.len();
        let bounds = pooling::chunk_bounds(n_tokens, n_virtual)?;
        let weights = pooling::token_weights(&span.surprisal, &bounds, self.pooling);
        let target_matrix = pooling::pooling_matrix(&weights, &bounds, span.embeddings.device())?;
        let pool_all = |per_layer: &[Tensor]| per_layer.iter().map(|x| pooling::pool(&target_matrix, x)).collect::<Result<Vec<_>>>();
        let targets = pool_all(&span.values)?;
        // Keys are pooled before RoPE: rotated keys at different positions do not average.
        let key_targets = if self.key_weight > 0.0 { pool_all(&span.unrotated_keys(model)?)? } else { Vec::new() };
        let init = self.init.embeddings(model, prefix, span, &bounds)?;
        let positions = virtual_positions(span.positions[0], span.positions[n_tokens - 1], n_virtual, self.positions);
        Ok(VirtualStart { init, positions, targets, key_targets, key_weight: self.key_weight })
    }
}

impl Compressor for Recipe {
    /// `surprisal` or `uniform`, then `-kv` when keys are matched and
    /// `+NAME-init` for a starting point other than the chunk mean.
    fn name(&self) -> String {
        let mut name = match self.pooling {
            Pooling::Surprisal => "surprisal".to_string(),
            Pooling::Uniform => "uniform".to_string(),
        };
        if self.key_weight > 0.0 {
            name.push_str("-kv");
        }
        if self.init != Init::ChunkMean {
            name.push_str(&format!("+{}-init", self.init.name()));
        }
        name
    }

    fn compress(
        &self,
        model: &Qwen2,
        prefix: &KvCache,
        span: &SpanTargets,
        on_step: &mut dyn FnMut(usize, f32),
    ) -> Result<CompressedSpan> {
        self.compress_into(model, prefix, span, pooling::n_virtual(span.len(), self.ratio)?, on_step)
    }
}

impl Recipe {
    /// The recipe with exactly `n_virtual` virtual tokens (the ratio is then
    /// unused): for methods that spend part of a budget otherwise.
    pub fn compress_into(
        &self,
        model: &Qwen2,
        prefix: &KvCache,
        span: &SpanTargets,
        n_virtual: usize,
        on_step: &mut dyn FnMut(usize, f32),
    ) -> Result<CompressedSpan> {
        let start = self.virtual_start_sized(model, prefix, span, n_virtual)?;
        let steps = self.optimizer.steps_for(span.len());
        let optimized = optimise(model, start.objective(prefix), &start.init, &self.optimizer, steps, on_step)?;
        Ok(self.compressed(span, start, optimized))
    }

    /// The cache entries of optimised virtual tokens, with their report.
    fn compressed(&self, span: &SpanTargets, start: VirtualStart, optimized: Optimized) -> CompressedSpan {
        let report = CompressionReport::new(self.name(), span.len(), start.positions.len());
        CompressedSpan {
            keys: optimized.keys,
            values: optimized.values,
            positions: start.positions,
            report: CompressionReport { optimization: Some(optimized.report), ..report },
        }
    }
}

/// Compresses one span with several recipes (ratios, poolings, seeds of a
/// random start) in one batched optimisation ([`optimise_together`]): on a
/// GPU, which one span under-fills, this costs little more than one. Each
/// result is what that recipe alone gives (to float rounding), and its
/// report carries the batch's wall time. The recipes must share their
/// optimiser settings (one Adam run, one step budget); early stopping would
/// watch the batch's summed loss, so it is refused.
pub fn compress_together(
    recipes: &[Recipe],
    model: &Qwen2,
    prefix: &KvCache,
    span: &SpanTargets,
    on_step: &mut dyn FnMut(usize, f32),
) -> Result<Vec<CompressedSpan>> {
    let Some(first) = recipes.first() else {
        return Err(crate::Error::Invalid("no recipes to compress with".into()));
    };
    if recipes.iter().any(|recipe| recipe.optimizer != first.optimizer) {
        return Err(crate::Error::Invalid("recipes compressed together must share their optimizer settings".into()));
    }
    if first.optimizer.early_stop.is_some() {
        return Err(crate::Error::Invalid(
            "early stopping would stop every recipe of a batch on the batch's summed loss: turn it off to compress together".into(),
        ));
    }
    let starts = recipes.iter().map(|recipe| recipe.virtual_start(model, prefix, span)).collect::<Result<Vec<_>>>()?;
    let objectives: Vec<Objective> = starts.iter().map(|start| start.objective(prefix)).collect();
    let inits: Vec<Tensor> = starts.iter().map(|start| start.init.clone()).collect();
    let steps = first.optimizer.steps_for(span.len());
    let optimized = optimise_together(model, &objectives, &inits, &first.optimizer, steps, on_step)?;
    Ok(recipes.iter().zip(starts).zip(optimized).map(|((recipe, start), optimized)| recipe.compressed(span, start, optimized)).collect())
}

/// The span's own embeddings through the compressed path (forward over the
/// prefix at the original positions, no optimisation): must score as full
/// context, or the path itself is broken.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawSpan;

impl Compressor for RawSpan {
    fn name(&self) -> String {
        "raw".into()
    }

    fn compress(
        &self,
        model: &Qwen2,
        prefix: &KvCache,
        span: &SpanTargets,
        _on_step: &mut dyn FnMut(usize, f32),
    ) -> Result<CompressedSpan> {
        let output = model.forward(&span.embeddings, &span.positions, Some(prefix), Logits::None)?;
        Ok(CompressedSpan {
            keys: output.keys,
            values: output.values,
            positions: span.positions.clone(),
            report: CompressionReport::new(self.name(), span.len(), span.len()),
        })
    }
}

/// Drops the span: no entries, and what follows keeps its original
/// positions (the truncation baseline).
#[derive(Debug, Clone, Copy, Default)]
pub struct Truncate;

impl Compressor for Truncate {
    fn name(&self) -> String {
        "truncated".into()
    }

    fn compress(
        &self,
        _model: &Qwen2,
        _prefix: &KvCache,
        span: &SpanTargets,
        _on_step: &mut dyn FnMut(usize, f32),
    ) -> Result<CompressedSpan> {
        Ok(CompressedSpan::empty(CompressionReport::new(self.name(), span.len(), 0)))
    }
}
