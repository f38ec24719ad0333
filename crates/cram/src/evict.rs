//! Eviction: keep a subset of the span's real KV entries, at their real
//! positions, chosen by a score. Three policies from the KV-compression
//! literature sit side by side behind [`Evict`] (a [`Compressor`]):
//! SnapKV-style attention from an observation window, the attention-free
//! key-norm heuristic, and StreamingLLM's sinks plus recent tokens. They
//! choose among the span's tokens only: the prefix is never evicted.
//! [`CompressThenEvict`] applies attention eviction to the recipe's virtual
//! tokens instead.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::cache::KvCache;
use crate::compress::{CompressedSpan, Compressor, Recipe};
use crate::model::Qwen2;
use crate::pooling;
use crate::targets::SpanTargets;
use crate::{Error, Result};

/// How an eviction method scores the span's tokens (higher is kept).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "policy")]
pub enum Eviction {
    /// SnapKV: the attention the span's last `window` tokens pay each span
    /// token in the span's own forward, summed over layers, heads and
    /// observers, then max-pooled over `kernel` neighbours so that kept
    /// tokens come in runs (a name is several tokens). All tokens compete
    /// for the budget, the window included, since the budget can be smaller
    /// than the window.
    SnapKv {
        /// Observing tokens: the span's last.
        window: usize,
        /// Width of the max-pool over neighbouring scores (odd; 1 = none).
        kernel: usize,
    },
    /// Keep the tokens whose keys have the smallest norm (low-norm keys
    /// draw the most attention), per layer relative to the layer's mean and
    /// summed over layers. Needs no attention at all.
    KeyNorm,
    /// StreamingLLM: the span's first `sinks` tokens (at most half the
    /// budget) and the most recent ones.
    Streaming {
        /// Attention-sink tokens kept from the span's start.
        sinks: usize,
    },
}

impl Eviction {
    /// SnapKV with a 32-token window and a 5-wide pool.
    pub fn snapkv() -> Self {
        Self::SnapKv { window: 32, kernel: 5 }
    }

    /// StreamingLLM with 4 sinks.
    pub fn streaming() -> Self {
        Self::Streaming { sinks: 4 }
    }

    /// `snapkv`, `key-norm` or `streaming`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::SnapKv { .. } => "snapkv",
            Self::KeyNorm => "key-norm",
            Self::Streaming { .. } => "streaming",
        }
    }

    /// Indices (ascending) of the `count` span tokens this policy keeps.
    pub fn keep(&self, model: &Qwen2, prefix: &KvCache, span: &SpanTargets, count: usize) -> Result<Vec<usize>> {
        if count == 0 || count > span.len() {
            return Err(Error::Invalid(format!("cannot keep {count} of a span's {} tokens", span.len())));
        }
        let scores = match *self {
            Self::SnapKv { window, kernel } => max_pool(&window_attention(model, prefix, span, window)?, kernel),
            Self::KeyNorm => negative_key_norms(&span.keys)?,
            Self::Streaming { sinks } => sinks_then_recent(span.len(), sinks.min(count / 2)),
        };
        let mut kept = most_important(&scores, count);
        kept.sort_unstable();
        Ok(kept)
    }
}

/// Keeps `n / ratio` of the span's real KV entries, chosen by `eviction`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Evict {
    /// The scoring policy.
    pub eviction: Eviction,
    /// Span tokens / entries kept.
    pub ratio: f64,
}

impl Compressor for Evict {
    fn name(&self) -> String {
        self.eviction.name().into()
    }

    fn compress(
        &self,
        model: &Qwen2,
        prefix: &KvCache,
        span: &SpanTargets,
        _on_step: &mut dyn FnMut(usize, f32),
    ) -> Result<CompressedSpan> {
        let kept = self.eviction.keep(model, prefix, span, pooling::n_virtual(span.len(), self.ratio)?)?;
        CompressedSpan::real_entries(span, self.name()).select(&kept)
    }
}

/// Per span token, the attention its last `window` tokens pay it (causal,
/// so a token is observed only by the observers at or after it).
fn window_attention(model: &Qwen2, prefix: &KvCache, span: &SpanTargets, window: usize) -> Result<Vec<f32>> {
    let observers = span.len().min(window.max(1));
    let probabilities = model.attention_probabilities(&span.embeddings, &span.positions, Some(prefix))?;
    let rows: Vec<Tensor> = probabilities
        .iter()
        .map(|layer| layer.narrow(2, span.len() - observers, observers))
        .collect::<candle_core::Result<_>>()?;
    attention_on(&rows, prefix.len(), span.len())
}

/// Attention rows (per layer, (1, heads, observers, columns)) summed onto
/// the `count` columns from `first`, over layers, heads and observers.
fn attention_on(rows: &[Tensor], first: usize, count: usize) -> Result<Vec<f32>> {
    let mut total = Tensor::zeros(count, DType::F32, rows[0].device())?;
    for layer in rows {
        total = (total + layer.narrow(3, first, count)?.sum(2)?.sum(1)?.squeeze(0)?)?;
    }
    Ok(total.to_vec1()?)
}

/// Each score replaced by the largest within `kernel / 2` places of it.
fn max_pool(scores: &[f32], kernel: usize) -> Vec<f32> {
    let reach = kernel / 2;
    (0..scores.len())
        .map(|i| scores[i.saturating_sub(reach)..(i + reach + 1).min(scores.len())].iter().copied().fold(f32::MIN, f32::max))
        .collect()
}

/// Minus each token's key norm (mean over KV heads), relative to its
/// layer's mean, summed over layers. RoPE is a rotation, so rotated keys
/// give the same norms. keys: per layer (1, kv_heads, n, head_dim).
fn negative_key_norms(keys: &[Tensor]) -> Result<Vec<f32>> {
    let n = keys[0].dim(2)?;
    let mut total = vec![0.0f32; n];
    for key in keys {
        let norms: Vec<f32> = key.to_dtype(DType::F32)?.sqr()?.sum(3)?.sqrt()?.mean(1)?.squeeze(0)?.to_vec1()?;
        let mean = norms.iter().sum::<f32>() / n as f32;
        for (slot, norm) in total.iter_mut().zip(norms) {
            *slot -= if mean > 0.0 { norm / mean } else { 0.0 };
        }
    }
    Ok(total)
}

/// Scores under which the top entries are the first `sinks` tokens, then
/// the latest ones.
fn sinks_then_recent(n: usize, sinks: usize) -> Vec<f32> {
    (0..n).map(|i| if i < sinks { (2 * n - i) as f32 } else { i as f32 }).collect()
}

/// Compress with the recipe at a mild ratio, then evict the virtual tokens
/// that the span's last tokens attend to least, down to `ratio`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompressThenEvict {
    /// The first stage; its ratio (the published 2x) must be below `ratio`.
    pub recipe: Recipe,
    /// The overall ratio: n / entries kept.
    pub ratio: f64,
    /// Observing tokens: the span's last `window` tokens.
    pub window: usize,
}

impl CompressThenEvict {
    /// The published pairing: the recipe at 2x, evicted down to `ratio`,
    /// observed by the span's last 32 tokens.
    pub fn new(recipe: Recipe, ratio: f64) -> Self {
        Self { recipe, ratio, window: 32 }
    }
}

impl Compressor for CompressThenEvict {
    fn name(&self) -> String {
        "compress-evict".into()
    }

    fn compress(
        &self,
        model: &Qwen2,
        prefix: &KvCache,
        span: &SpanTargets,
        on_step: &mut dyn FnMut(usize, f32),
    ) -> Result<CompressedSpan> {
        if self.recipe.ratio >= self.ratio {
            return Err(Error::Invalid(format!(
                "compress-then-evict compresses at {}x first, which must be below the final {}x",
                self.recipe.ratio, self.ratio
            )));
        }
        let compressed = self.recipe.compress(model, prefix, span, on_step)?;
        let n_keep = pooling::n_virtual(span.len(), self.ratio)?.min(compressed.len());
        let observers = span.len().min(self.window.max(1));
        let observer_span = span.select(&(span.len() - observers..span.len()).collect::<Vec<_>>())?;
        let importance = attention_importance(model, prefix, &compressed, &observer_span)?;
        let mut kept = most_important(&importance, n_keep);
        kept.sort_unstable();
        let mut evicted = compressed.select(&kept)?;
        evicted.report.method = self.name();
        Ok(evicted)
    }
}

/// The attention each of `candidates`' entries draws from `observers`
/// (their own embeddings at their own positions), placed after `prefix` and
/// the candidates: summed over layers, heads and observing tokens.
pub fn attention_importance(
    model: &Qwen2,
    prefix: &KvCache,
    candidates: &CompressedSpan,
    observers: &SpanTargets,
) -> Result<Vec<f32>> {
    let mut context = prefix.clone();
    candidates.append_to(&mut context)?;
    // Per layer (1, heads, observers, prefix + candidates + observers): the candidates' columns.
    let probabilities = model.attention_probabilities(&observers.embeddings, &observers.positions, Some(&context))?;
    attention_on(&probabilities, prefix.len(), candidates.len())
}

/// Indices of the `count` largest scores (ties: the earlier entry).
pub fn most_important(scores: &[f32], count: usize) -> Vec<usize> {
    let mut ranked: Vec<usize> = (0..scores.len()).collect();
    ranked.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    ranked.truncate(count);
    ranked
}
