//! # cram
//!
//! Compresses a span of an LLM conversation into fewer *virtual tokens*:
//! input embeddings optimised through a frozen Qwen2 so that their Value
//! vectors at every layer match pooled Values of the original tokens. The
//! result is a KV cache a caller keeps generating from.
//!
//! This part of the crate is the foundation: a Qwen2 whose forward takes
//! input embeddings at arbitrary float positions over a [`KvCache`] and
//! backpropagates to them, greedy decoding, and model loading from GGUF,
//! safetensors or hf-hub.
//!
//! ```no_run
//! use candle_core::Device;
//! use cram::{generate, KvCache, Model, ModelSource};
//!
//! # fn main() -> cram::Result<()> {
//! let model = Model::load(&ModelSource::gguf("qwen2.5-coder-0.5b-instruct.gguf"), &Device::Cpu)?;
//! let prompt = model.tokenizer.encode("<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n")?;
//! let mut cache = KvCache::new();
//! let stop = model.tokenizer.stop_ids();
//! let answer = generate::greedy(&model.qwen2, &mut cache, &prompt, 0.0, 16, &stop)?;
//! println!("{}", model.tokenizer.decode(&answer)?);
//! # Ok(())
//! # }
//! ```

pub mod cache;
pub mod error;
pub mod generate;
pub mod model;
pub mod objective;
pub mod ops;
pub mod random;
pub mod rope;
pub mod tokenizer;

pub use cache::KvCache;
pub use error::{Error, Result};
pub use model::{ForwardOutput, Logits, Model, ModelSource, Qwen2, Qwen2Config};
pub use tokenizer::Tokenizer;
