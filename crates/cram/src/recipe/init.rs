//! Step 3b: where the virtual embeddings start. The published chunk mean,
//! random vectors at the embeddings' scale, or the embeddings of the tokens
//! an eviction policy would keep: only the starting point differs, the
//! chunks, positions and optimizer are the recipe's. Or anchored: the
//! virtual tokens start as span tokens that some method picks (attention
//! matching's keys: the reverse start), at those tokens' own positions,
//! each standing for the tokens nearest it.

use std::fmt::Debug;
use std::rc::Rc;

use candle_core::{Device, Tensor};

use super::pooling::{self, Pooling};
use super::positions::{virtual_positions, PositionMode};
use crate::cache::KvCache;
use crate::model::{Model, Qwen2};
use crate::rng::normal_samples;
use crate::scoring::Scorer;
use crate::span::SpanTargets;
use crate::error::{Error, Result};

/// Picks the span tokens an anchored start begins from.
pub trait Anchors: Debug {
    /// A short name for reports (`attention-matching`).
    fn name(&self) -> String;

    /// Ascending, distinct indices of `count` span tokens.
    fn anchors(&self, model: &Model, prefix: &KvCache, span: &SpanTargets, count: usize) -> Result<Vec<usize>>;
}

/// Where the virtual tokens start: their embeddings (and, anchored, their
/// positions and chunks).
#[derive(Debug, Clone, Default)]
pub enum Init {
    /// The mean input embedding of each chunk (the published choice).
    #[default]
    ChunkMean,
    /// Gaussian vectors, each scaled to the span's mean embedding norm.
    Random {
        /// Seed of the draw.
        seed: u64,
    },
    /// The input embeddings of the `n_virtual` tokens this policy keeps.
    Kept(Rc<dyn Scorer>),
    /// The `n_virtual` tokens these anchors pick, at their own positions,
    /// each pooling the span tokens nearest it (not the recipe's chunks).
    Anchored(Rc<dyn Anchors>),
}

/// Where the virtual tokens start: what each stands for, where it sits,
/// and its first embedding.
#[derive(Debug, Clone)]
pub struct Start {
    /// n_virtual + 1 chunk boundaries: virtual token j pools tokens
    /// `bounds[j]..bounds[j + 1]`.
    pub bounds: Vec<usize>,
    /// (n_virtual) positions.
    pub positions: Vec<f32>,
    /// (1, n_virtual, hidden) f32
    pub embeddings: Tensor,
}

impl Init {
    /// A short name for reports (`chunk-mean`, `random`, `snapkv`, ...).
    pub fn name(&self) -> String {
        match self {
            Init::ChunkMean => "chunk-mean".into(),
            Init::Random { .. } => "random".into(),
            Init::Kept(scorer) => scorer.name(),
            Init::Anchored(anchors) => anchors.name(),
        }
    }

    /// The start of `n_virtual` virtual tokens: an anchored start's own,
    /// or the recipe's chunks and interpolated positions (`mode`) with
    /// [`Self::embeddings`].
    pub fn start(&self, model: &Model, prefix: &KvCache, span: &SpanTargets, n_virtual: usize, mode: PositionMode) -> Result<Start> {
        let n_tokens = span.len();
        if let Init::Anchored(anchors) = self {
            let picked = anchors.anchors(model, prefix, span, n_virtual)?;
            if picked.len() != n_virtual {
                return Err(Error::Invalid(format!("{} picked {} anchors, {n_virtual} were asked", anchors.name(), picked.len())));
            }
            let bounds = pooling::bounds_around(&picked, n_tokens)?;
            let positions = picked.iter().map(|&token| span.positions[token]).collect();
            return Ok(Start { bounds, positions, embeddings: span.select(&picked)?.embeddings });
        }
        let bounds = pooling::chunk_bounds(n_tokens, n_virtual)?;
        let positions = virtual_positions(span.positions[0], span.positions[n_tokens - 1], n_virtual, mode);
        Ok(Start { embeddings: self.embeddings(&model.qwen2, prefix, span, &bounds)?, bounds, positions })
    }

    /// (1, n_virtual, hidden) f32: the starting embeddings for a span cut
    /// into chunks at `bounds` (n_virtual + 1 boundaries); an anchored
    /// start has no such embeddings.
    pub fn embeddings(&self, model: &Qwen2, prefix: &KvCache, span: &SpanTargets, bounds: &[usize]) -> Result<Tensor> {
        let n_virtual = bounds.len() - 1;
        match self {
            Init::ChunkMean => {
                let weights = pooling::token_weights(&span.surprisal, bounds, Pooling::Uniform);
                pooling::pool(&pooling::pooling_matrix(&weights, bounds, span.embeddings.device())?, &span.embeddings)
            }
            Init::Random { seed } => random_embeddings(&span.embeddings, n_virtual, *seed),
            Init::Kept(scorer) => {
                let kept = scorer.keep(model, prefix, span, n_virtual)?;
                Ok(span.select(&kept)?.embeddings)
            }
            Init::Anchored(anchors) => Err(Error::Invalid(format!("the {} start chooses its own chunks: see Init::start", anchors.name()))),
        }
    }
}

/// `count` Gaussian rows, each with the mean L2 norm of `embeddings`' rows
/// (1, n, hidden): random directions at the scale the model expects.
fn random_embeddings(embeddings: &Tensor, count: usize, seed: u64) -> Result<Tensor> {
    let hidden = embeddings.dim(2)?;
    let mean_norm = embeddings.sqr()?.sum(2)?.sqrt()?.mean_all()?.to_scalar::<f32>()?;
    let draw = Tensor::from_vec(normal_samples(seed, count * hidden), (1, count, hidden), &Device::Cpu)?.to_device(embeddings.device())?;
    let norms = draw.sqr()?.sum_keepdim(2)?.sqrt()?;
    Ok((draw.broadcast_div(&norms)? * mean_norm as f64)?)
}
