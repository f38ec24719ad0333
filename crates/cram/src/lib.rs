//! # cram
//!
//! Compresses a span of an LLM conversation into fewer *virtual tokens*:
//! input embeddings optimized through a frozen Qwen2 so that their Value
//! vectors at every layer match surprisal-pooled Values of the original
//! tokens, at RoPE positions interpolated over the span. The result is KV
//! cache entries a caller keeps generating from.
//!
//! The modules follow the method: [`model`] (load, differentiable forward)
//! -> [`span`] (the span as the model saw it: K, V, surprisal) ->
//! [`compressor`] (the trait every method implements, and the budget) ->
//! [`recipe`] (the published method, its steps in order) or [`methods`]
//! (baselines, eviction by a [`scoring`] policy through [`select`], the
//! hybrid, compress-then-evict, the summary, and [`matching`]'s fitted
//! compaction and KVzip), all built by name from
//! [`registry`] -> [`cache`] -> [`generate`]. [`session`] runs the whole
//! flow turn by turn, as an agent's history ages.
//!
//! ```no_run
//! use candle_core::Device;
//! use cram::{generate, Compressor, KvCache, Logits, Model, ModelSource, Recipe, SpanTargets};
//!
//! # fn main() -> cram::Result<()> {
//! let model = Model::load(&ModelSource::gguf("qwen2.5-coder-0.5b-instruct.gguf"), &Device::Cpu)?;
//! let (qwen, tok) = (&model.qwen2, &model.tokenizer);
//! let at = |start: usize, n: usize| (start..start + n).map(|p| p as f32).collect::<Vec<f32>>();
//!
//! // The prefix, kept verbatim.
//! let prefix_ids = tok.encode("<|im_start|>system\nYou are a coding agent.<|im_end|>\n")?;
//! let out = qwen.forward(&qwen.embed(&prefix_ids)?, &at(0, prefix_ids.len()), None, Logits::None)?;
//! let mut cache = KvCache::new();
//! cache.append(&out.keys, &out.values, &at(0, prefix_ids.len()))?;
//!
//! // The span, compressed 3.2x into virtual tokens at its own positions.
//! let span_ids = tok.encode("<|im_start|>user\nWe hash passwords with bcryptjs.<|im_end|>\n")?;
//! let span = SpanTargets::compute(qwen, &cache, &span_ids, &at(prefix_ids.len(), span_ids.len()))?;
//! Recipe::published(3.2).compress(&model, &cache, &span, &mut |_, _| {})?.append_to(&mut cache)?;
//!
//! // The question continues after the span's original positions.
//! let question = tok.encode("<|im_start|>user\nWhich hashing library?<|im_end|>\n<|im_start|>assistant\n")?;
//! let first = cache.next_position();
//! let answer = generate::greedy(qwen, &mut cache, &question, first, 32, &tok.stop_ids())?;
//! println!("{}", tok.decode(&answer)?);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

// In the order data flows through the method.
pub mod model;
pub mod tokenizer;
pub mod span;
pub mod compressor;
pub mod scoring;
pub mod select;
pub mod matching;
pub mod recipe;
pub mod methods;
pub mod registry;
pub mod cache;
pub mod session;
pub mod generate;

pub mod error;
mod rng;
pub mod synthetic;

pub use cache::KvCache;
pub use compressor::{budget, CompressedSpan, CompressionReport, Compressor, OptimizationReport};
pub use error::{Error, Result};
pub use methods::attention_matching::{AttentionMatching, MatchedKeys, MatchingSettings};
pub use methods::baselines::{RawSpan, Truncate};
pub use methods::compress_evict::{CompressEvictSettings, CompressThenEvict};
pub use methods::evict::Evict;
pub use methods::fitted_recipe::FittedRecipe;
pub use methods::hybrid::{Hybrid, HybridSettings};
pub use methods::kvzip::{KvZip, KvZipSettings};
pub use methods::summary::{Summarize, SummarySettings};
pub use model::{ForwardOutput, Logits, Model, ModelSource, Placement, Qwen2, Qwen2Config, RowEntries};
pub use recipe::init::{Anchors, Init};
pub use recipe::pooling::Pooling;
pub use recipe::positions::PositionMode;
pub use recipe::settings::{Checkpointing, EarlyStop, OptimizerConfig};
pub use recipe::{compress_together, Recipe, VirtualStart};
pub use scoring::{KeyNorm, Scorer, SnapKv, Streaming, ValueUniqueness};
pub use session::{Session, Turn, TurnTargets};
pub use span::SpanTargets;
pub use tokenizer::Tokenizer;
