//! Qwen2 hyperparameters, read from a GGUF's metadata or an HF `config.json`.

use std::collections::HashMap;

use candle_core::quantized::gguf_file;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The hyperparameters of a Qwen2 decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Qwen2Config {
    /// Vocabulary size (rows of the output projection used).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_key_value_heads: usize,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// Epsilon of RMS norm.
    pub rms_norm_eps: f64,
    /// Whether the output projection reuses the token embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

impl Qwen2Config {
    /// Per-head dimension.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Query heads per key/value head (grouped-query attention).
    pub fn query_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Parses an HF `config.json`; other architectures are refused.
    pub fn from_hf_json(json: &str, source_name: &str) -> Result<Self> {
        #[derive(Deserialize)]
        struct Header {
            model_type: Option<String>,
        }
        let header: Header =
            serde_json::from_str(json).map_err(|e| Error::Config(format!("{source_name}: {e}")))?;
        let model_type = header.model_type.unwrap_or_default();
        if model_type != "qwen2" {
            return Err(Error::UnsupportedArchitecture { source_name: source_name.into(), found: model_type });
        }
        let config: Self =
            serde_json::from_str(json).map_err(|e| Error::Config(format!("{source_name}: {e}")))?;
        config.validate()
    }

    /// Reads the `qwen2.*` metadata of a GGUF file. `vocab_size` comes from
    /// the tokenizer's token list; tying is decided by the weights present.
    pub fn from_gguf(content: &gguf_file::Content, source_name: &str) -> Result<Self> {
        let metadata = &content.metadata;
        let architecture = metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if architecture != "qwen2" {
            return Err(Error::UnsupportedArchitecture { source_name: source_name.into(), found: architecture });
        }
        let vocab_size = match metadata.get("tokenizer.ggml.tokens") {
            Some(tokens) => tokens.to_vec().map_err(|e| Error::Config(e.to_string()))?.len(),
            None => return Err(Error::Config(format!("{source_name}: no tokenizer.ggml.tokens"))),
        };
        let config = Self {
            vocab_size,
            hidden_size: gguf_usize(metadata, "qwen2.embedding_length")?,
            intermediate_size: gguf_usize(metadata, "qwen2.feed_forward_length")?,
            num_hidden_layers: gguf_usize(metadata, "qwen2.block_count")?,
            num_attention_heads: gguf_usize(metadata, "qwen2.attention.head_count")?,
            num_key_value_heads: gguf_usize(metadata, "qwen2.attention.head_count_kv")?,
            rope_theta: gguf_f64(metadata, "qwen2.rope.freq_base")?,
            rms_norm_eps: gguf_f64(metadata, "qwen2.attention.layer_norm_rms_epsilon")?,
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        };
        config.validate()
    }

    fn validate(self) -> Result<Self> {
        let fits = self.num_attention_heads > 0
            && self.num_key_value_heads > 0
            && self.hidden_size % self.num_attention_heads == 0
            && self.num_attention_heads % self.num_key_value_heads == 0
            && self.head_dim() % 2 == 0;
        if !fits {
            return Err(Error::Config(format!(
                "inconsistent head layout: hidden {} with {} heads and {} kv heads",
                self.hidden_size, self.num_attention_heads, self.num_key_value_heads
            )));
        }
        Ok(self)
    }
}

fn gguf_value<'a>(metadata: &'a HashMap<String, gguf_file::Value>, key: &str) -> Result<&'a gguf_file::Value> {
    metadata.get(key).ok_or_else(|| Error::Config(format!("GGUF metadata `{key}` is missing")))
}

fn gguf_usize(metadata: &HashMap<String, gguf_file::Value>, key: &str) -> Result<usize> {
    let value = gguf_value(metadata, key)?;
    let number = value
        .to_u64()
        .ok()
        .or_else(|| value.to_u32().ok().map(u64::from))
        .or_else(|| value.to_i32().ok().and_then(|v| u64::try_from(v).ok()))
        .ok_or_else(|| Error::Config(format!("GGUF metadata `{key}` is not an integer >= 0: {value:?}")))?;
    Ok(number as usize)
}

fn gguf_f64(metadata: &HashMap<String, gguf_file::Value>, key: &str) -> Result<f64> {
    let value = gguf_value(metadata, key)?;
    value
        .to_f32()
        .map(f64::from)
        .or_else(|_| value.to_f64())
        .map_err(|_| Error::Config(format!("GGUF metadata `{key}` is not a float: {value:?}")))
}
