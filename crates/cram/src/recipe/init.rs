//! Step 3b: where the virtual embeddings start. The published chunk mean,
//! random vectors at the embeddings' scale, or the embeddings of the tokens
//! an eviction policy would keep. Only the starting point differs: targets,
//! positions and the optimizer are the recipe's.

use std::rc::Rc;

use candle_core::{Device, Tensor};

use super::pooling::{self, Pooling};
use crate::cache::KvCache;
use crate::model::Qwen2;
use crate::rng::normal_samples;
use crate::scoring::Scorer;
use crate::span::SpanTargets;
use crate::error::Result;

/// How the virtual embeddings are initialised.
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
}

impl Init {
    /// A short name for reports (`chunk-mean`, `random`, `snapkv`, ...).
    pub fn name(&self) -> String {
        match self {
            Init::ChunkMean => "chunk-mean".into(),
            Init::Random { .. } => "random".into(),
            Init::Kept(scorer) => scorer.name(),
        }
    }

    /// (1, n_virtual, hidden) f32: the starting embeddings for a span cut
    /// into chunks at `bounds` (n_virtual + 1 boundaries).
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
