//! What every compression method shares: the [`Compressor`] trait (a span
//! in, cache entries out), the [`CompressedSpan`] it returns with its
//! [`CompressionReport`], and the [`budget`] of entries a ratio allows,
//! computed here once for every method.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::cache::{select_entries, KvCache};
use crate::model::Model;
use crate::span::SpanTargets;
use crate::error::{Error, Result};

/// `max(round(n / ratio), 1)` entries for a span of `n` tokens (Python
/// rounding: ties to even): what every method may keep at `ratio`.
pub fn budget(n_tokens: usize, ratio: f64) -> Result<usize> {
    if !(ratio.is_finite() && ratio > 1.0) {
        return Err(Error::Invalid(format!("compression ratio must be > 1, got {ratio}")));
    }
    Ok(((n_tokens as f64 / ratio).round_ties_even() as usize).max(1))
}

/// A way of turning a span into fewer cache entries.
pub trait Compressor {
    /// The name results carry (`surprisal`, `surprisal-kv`, `snapkv`, ...):
    /// the method and the options that change what it computes.
    fn name(&self) -> String;

    /// Compresses the span whose targets were computed over `prefix`.
    /// `on_step(step, loss)` reports progress of iterative methods.
    fn compress(
        &self,
        model: &Model,
        prefix: &KvCache,
        span: &SpanTargets,
        on_step: &mut dyn FnMut(usize, f32),
    ) -> Result<CompressedSpan>;

    /// Whether the method reads the span's surprisal (the recipe's pooling):
    /// those that do not get targets without it, which saves the forward's
    /// logits.
    fn needs_surprisal(&self) -> bool {
        true
    }

    /// Whether the method reads the span's own queries (attention
    /// matching's context-prefill reference queries): it then gets them
    /// from the targets' forward ([`SpanTargets::queries`]) instead of
    /// running the span a second time.
    fn needs_span_queries(&self) -> bool {
        false
    }
}

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
    /// Per layer, (1, kv_heads, n_kept) f32: the entries' logit biases;
    /// `None` for methods whose entries take none (0).
    pub biases: Option<Vec<Tensor>>,
    /// The position right after the span's last token: where what follows
    /// starts, however few entries stand for the span.
    pub next_position: f32,
    /// What the compression did.
    pub report: CompressionReport,
}

impl CompressedSpan {
    /// Entries that stand for `span` under `method`.
    pub fn new(method: String, span: &SpanTargets, keys: Vec<Tensor>, values: Vec<Tensor>, positions: Vec<f32>) -> Self {
        let report = CompressionReport::new(method, span.len(), positions.len());
        Self { keys, values, positions, biases: None, next_position: span.next_position(), report }
    }

    /// The span's own KV entries, all of them, under `method`: what
    /// verbatim-keeping methods select from.
    pub fn real_entries(method: String, span: &SpanTargets) -> Self {
        Self::new(method, span, span.keys.clone(), span.values.clone(), span.positions.clone())
    }

    /// No entries: the span is dropped (what follows keeps its positions).
    pub fn empty(method: String, span: &SpanTargets) -> Self {
        Self::new(method, span, Vec::new(), Vec::new(), Vec::new())
    }

    /// Appends the entries to `cache`, which then continues after the span.
    pub fn append_to(&self, cache: &mut KvCache) -> Result<()> {
        cache.append_biased(&self.keys, &self.values, self.biases.as_deref(), &self.positions)?;
        cache.advance_to(self.next_position);
        Ok(())
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
            return Err(Error::Invalid(format!("entry {bad} of a span of {} entries", self.len())));
        }
        let mut report = self.report.clone();
        report.n_kept = indices.len();
        Ok(Self {
            keys: select_entries(&self.keys, indices)?,
            values: select_entries(&self.values, indices)?,
            positions: indices.iter().map(|&i| self.positions[i]).collect(),
            biases: self.biases.as_deref().map(|biases| select_entries(biases, indices)).transpose()?,
            next_position: self.next_position,
            report,
        })
    }

    /// `self`'s entries followed by `other`'s, under `self`'s report with
    /// `n_kept` summed.
    pub fn followed_by(&self, other: &Self) -> Result<Self> {
        let join = |a: &[Tensor], b: &[Tensor]| a.iter().zip(b).map(|(a, b)| Ok(Tensor::cat(&[a, b], 2)?)).collect::<Result<Vec<_>>>();
        let mut report = self.report.clone();
        report.n_kept += other.report.n_kept;
        let zeros = |span: &Self| -> Result<Vec<Tensor>> {
            span.keys.iter().map(|k| Ok(Tensor::zeros(&k.dims()[..3], candle_core::DType::F32, k.device())?)).collect()
        };
        let biases = match (&self.biases, &other.biases) {
            (None, None) => None,
            (mine, theirs) => {
                let mine = mine.clone().map_or_else(|| zeros(self), Ok)?;
                let theirs = theirs.clone().map_or_else(|| zeros(other), Ok)?;
                Some(mine.iter().zip(&theirs).map(|(a, b)| Ok(Tensor::cat(&[a, b], 2)?)).collect::<Result<Vec<_>>>()?)
            }
        };
        Ok(Self {
            biases,
            keys: join(&self.keys, &other.keys)?,
            values: join(&self.values, &other.values)?,
            positions: self.positions.iter().chain(&other.positions).copied().collect(),
            next_position: self.next_position.max(other.next_position),
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
    /// The optimization's report, for methods that optimize.
    pub optimization: Option<OptimizationReport>,
    /// The text that replaced the span, for text-level methods (the summary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Wall time of the compression, the span's own forward included
    /// (measured by [`crate::session::Session::push_compressed`]; 0 where not measured).
    #[serde(default)]
    pub seconds: f64,
    /// For fitted methods (attention matching): the mean relative error of
    /// the compacted block's attention output on the reference queries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fit_error: Option<f64>,
}

impl CompressionReport {
    /// The report of a method that neither optimizes nor writes text.
    pub fn new(method: String, n_tokens: usize, n_kept: usize) -> Self {
        Self { method, n_tokens, n_kept, optimization: None, text: None, seconds: 0.0, fit_error: None }
    }
}

/// What an optimization did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OptimizationReport {
    /// The loss before each step, then the final loss.
    pub loss_curve: Vec<f32>,
    /// Steps taken.
    pub steps: usize,
    /// Steps allowed (more than `steps` when the run stopped early).
    #[serde(default)]
    pub budget: usize,
    /// Wall time of the optimization, seconds (before a resume included).
    pub seconds: f64,
    /// Steps restored from a checkpoint rather than run by this process.
    #[serde(default)]
    pub resumed_steps: usize,
    /// The part of `seconds` spent before the resume.
    #[serde(default)]
    pub resumed_seconds: f64,
}

impl OptimizationReport {
    /// The loss after the last step.
    pub fn final_loss(&self) -> Option<f32> {
        self.loss_curve.last().copied()
    }
}
