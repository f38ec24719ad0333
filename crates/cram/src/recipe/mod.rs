//! The published method, its steps in reading order: [`crate::span`]'s
//! targets (V and surprisal of the span) -> [`pooling`] -> [`positions`] ->
//! [`init`] -> [`objective`] -> [`optimize`] (Adam on the embeddings,
//! [`adam`]; [`checkpoint`] lets a killed run resume), under the
//! [`settings`] of the optimisation. [`Recipe`] holds all its settings and
//! is a [`Compressor`].

pub mod adam;
pub mod checkpoint;
pub mod init;
pub mod objective;
pub mod optimize;
pub mod pooling;
pub mod positions;
pub mod settings;

use candle_core::Tensor;

use crate::cache::KvCache;
use crate::compressor::{budget, CompressedSpan, Compressor};
use crate::model::Model;
use crate::span::SpanTargets;
use crate::error::Result;
use init::Init;
use objective::{KeyTargets, Objective};
use optimize::{optimize, optimize_together, Optimized};
use settings::OptimizerConfig;
use pooling::Pooling;
use positions::PositionMode;

/// The published method: surprisal- (or uniformly) pooled V targets,
/// chunk-mean initial embeddings, interpolated positions, Adam on V at
/// every layer. Two extensions, off by default: matching the keys too
/// (`key_weight`), and other starting points (`init`).
#[derive(Debug, Clone)]
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
    pub key_weight: f64,
    /// Where the virtual embeddings start.
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

    /// The options that change what the recipe computes, as a suffix of
    /// names: `-kv` when keys are matched, `+NAME-init` for a starting
    /// point other than the chunk mean; empty for the published recipe.
    pub fn variant(&self) -> String {
        let mut variant = String::new();
        if self.key_weight > 0.0 {
            variant.push_str("-kv");
        }
        if !matches!(self.init, Init::ChunkMean) {
            variant.push_str(&format!("+{}-init", self.init.name()));
        }
        variant
    }
}

/// Where the recipe's optimization starts: initial embeddings at
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
    /// What the optimizer fits, after `prefix`.
    pub fn objective<'a>(&'a self, prefix: &'a KvCache) -> Objective<'a> {
        let keys = (!self.key_targets.is_empty()).then_some(KeyTargets { targets: &self.key_targets, weight: self.key_weight });
        Objective { prefix, positions: &self.positions, targets: &self.targets, keys }
    }
}

impl Recipe {
    /// Pools the span into this recipe's starting point (no optimization).
    pub fn virtual_start(&self, model: &Model, prefix: &KvCache, span: &SpanTargets) -> Result<VirtualStart> {
        self.virtual_start_sized(model, prefix, span, budget(span.len(), self.ratio)?)
    }

    /// The starting point with exactly `n_virtual` virtual tokens.
    pub fn virtual_start_sized(&self, model: &Model, prefix: &KvCache, span: &SpanTargets, n_virtual: usize) -> Result<VirtualStart> {
        let start = self.init.start(model, prefix, span, n_virtual, self.positions)?;
        let weights = pooling::token_weights(&span.surprisal, &start.bounds, self.pooling);
        let target_matrix = pooling::pooling_matrix(&weights, &start.bounds, span.embeddings.device())?;
        let pool_all = |per_layer: &[Tensor]| per_layer.iter().map(|x| pooling::pool(&target_matrix, x)).collect::<Result<Vec<_>>>();
        let targets = pool_all(&span.values)?;
        // Keys are pooled before RoPE: rotated keys at different positions do not average.
        let key_targets = if self.key_weight > 0.0 { pool_all(&span.unrotated_keys(&model.qwen2)?)? } else { Vec::new() };
        Ok(VirtualStart { init: start.embeddings, positions: start.positions, targets, key_targets, key_weight: self.key_weight })
    }

    /// The recipe with exactly `n_virtual` virtual tokens (the ratio is then
    /// unused), their entries reported under `method`: for methods that
    /// spend part of a budget otherwise.
    pub fn compress_sized(
        &self,
        method: String,
        model: &Model,
        prefix: &KvCache,
        span: &SpanTargets,
        n_virtual: usize,
        on_step: &mut dyn FnMut(usize, f32),
    ) -> Result<CompressedSpan> {
        let start = self.virtual_start_sized(model, prefix, span, n_virtual)?;
        let steps = self.optimizer.steps_for(span.len());
        let optimized = optimize(&model.qwen2, start.objective(prefix), &start.init, &self.optimizer, steps, on_step)?;
        Ok(compressed(method, span, start, optimized))
    }
}

impl Compressor for Recipe {
    /// `surprisal` or `uniform`, then the [`Recipe::variant`].
    fn name(&self) -> String {
        let pooling = match self.pooling {
            Pooling::Surprisal => "surprisal",
            Pooling::Uniform => "uniform",
        };
        format!("{pooling}{}", self.variant())
    }

    fn compress(&self, model: &Model, prefix: &KvCache, span: &SpanTargets, on_step: &mut dyn FnMut(usize, f32)) -> Result<CompressedSpan> {
        self.compress_sized(self.name(), model, prefix, span, budget(span.len(), self.ratio)?, on_step)
    }
}

/// The cache entries of optimized virtual tokens under `method`, with their report.
fn compressed(method: String, span: &SpanTargets, start: VirtualStart, optimized: Optimized) -> CompressedSpan {
    let mut entries = CompressedSpan::new(method, span, optimized.keys, optimized.values, start.positions);
    entries.report.optimization = Some(optimized.report);
    entries
}

/// Compresses one span with several recipes (ratios, poolings, seeds of a
/// random start) in one batched optimization ([`optimize_together`]): on a
/// GPU, which one span under-fills, this costs little more than one. Each
/// result is what that recipe alone gives (to float rounding), and its
/// report carries the batch's wall time. The recipes must share their
/// optimizer settings (one Adam run, one step budget); early stopping would
/// watch the batch's summed loss, so it is refused.
pub fn compress_together(
    recipes: &[Recipe],
    model: &Model,
    prefix: &KvCache,
    span: &SpanTargets,
    on_step: &mut dyn FnMut(usize, f32),
) -> Result<Vec<CompressedSpan>> {
    let Some(first) = recipes.first() else {
        return Err(crate::error::Error::Invalid("no recipes to compress with".into()));
    };
    if recipes.iter().any(|recipe| recipe.optimizer != first.optimizer) {
        return Err(crate::error::Error::Invalid("recipes compressed together must share their optimizer settings".into()));
    }
    if first.optimizer.early_stop.is_some() {
        return Err(crate::error::Error::Invalid(
            "early stopping would stop every recipe of a batch on the batch's summed loss: turn it off to compress together".into(),
        ));
    }
    let qwen2 = &model.qwen2;
    let starts = recipes.iter().map(|recipe| recipe.virtual_start(model, prefix, span)).collect::<Result<Vec<_>>>()?;
    let objectives: Vec<Objective> = starts.iter().map(|start| start.objective(prefix)).collect();
    let inits: Vec<Tensor> = starts.iter().map(|start| start.init.clone()).collect();
    let steps = first.optimizer.steps_for(span.len());
    let optimized = optimize_together(qwen2, &objectives, &inits, &first.optimizer, steps, on_step)?;
    Ok(recipes.iter().zip(starts).zip(optimized).map(|((recipe, start), optimized)| compressed(recipe.name(), span, start, optimized)).collect())
}
