//! Test fixtures (the `test-support` feature): small random-weight Qwen2
//! models, deterministic from a seed, the fast, download-free stand-in the
//! tests and benchmarks build their mechanics on.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::model::{Model, Qwen2, Qwen2Config};
use crate::tokenizer::Tokenizer;
use crate::rng::Normal;
use crate::error::Result;

/// A two-layer model with grouped-query attention (4 heads over 2 KV heads)
/// and biases on Q/K/V, like the real Qwen2 layout, only small.
pub fn tiny_config() -> Qwen2Config {
    Qwen2Config {
        vocab_size: 64,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: false,
    }
}

/// Random f32 weights under their HF checkpoint names, so the same weights
/// can feed this crate, candle-transformers, or a safetensors file.
pub fn named_weights(config: &Qwen2Config, seed: u64, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut normal = Normal::new(seed);
    let mut tensors = HashMap::new();
    let mut add = |name: String, shape: &[usize], mean: f32, std: f32| -> Result<()> {
        let count = shape.iter().product();
        let data: Vec<f32> = (0..count).map(|_| mean + std * normal.sample()).collect();
        tensors.insert(name, Tensor::from_vec(data, shape, device)?);
        Ok(())
    };
    let hidden = config.hidden_size;
    let kv_width = config.num_key_value_heads * config.head_dim();
    let ffn = config.intermediate_size;
    let scale = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
    add("model.embed_tokens.weight".into(), &[config.vocab_size, hidden], 0.0, 1.0)?;
    for layer in 0..config.num_hidden_layers {
        let p = format!("model.layers.{layer}");
        add(format!("{p}.input_layernorm.weight"), &[hidden], 1.0, 0.1)?;
        add(format!("{p}.self_attn.q_proj.weight"), &[hidden, hidden], 0.0, scale(hidden))?;
        add(format!("{p}.self_attn.q_proj.bias"), &[hidden], 0.0, 0.1)?;
        add(format!("{p}.self_attn.k_proj.weight"), &[kv_width, hidden], 0.0, scale(hidden))?;
        add(format!("{p}.self_attn.k_proj.bias"), &[kv_width], 0.0, 0.1)?;
        add(format!("{p}.self_attn.v_proj.weight"), &[kv_width, hidden], 0.0, scale(hidden))?;
        add(format!("{p}.self_attn.v_proj.bias"), &[kv_width], 0.0, 0.1)?;
        add(format!("{p}.self_attn.o_proj.weight"), &[hidden, hidden], 0.0, scale(hidden))?;
        add(format!("{p}.post_attention_layernorm.weight"), &[hidden], 1.0, 0.1)?;
        add(format!("{p}.mlp.gate_proj.weight"), &[ffn, hidden], 0.0, scale(hidden))?;
        add(format!("{p}.mlp.up_proj.weight"), &[ffn, hidden], 0.0, scale(hidden))?;
        add(format!("{p}.mlp.down_proj.weight"), &[hidden, ffn], 0.0, scale(ffn))?;
    }
    add("model.norm.weight".into(), &[hidden], 1.0, 0.1)?;
    if !config.tie_word_embeddings {
        add("lm_head.weight".into(), &[config.vocab_size, hidden], 0.0, scale(hidden))?;
    }
    Ok(tensors)
}

/// A random model built from [`named_weights`].
pub fn model(config: &Qwen2Config, seed: u64, device: &Device) -> Result<Qwen2> {
    let mut weights = named_weights(config, seed, device)?;
    Qwen2::from_named_weights(config.clone(), |name| Ok(weights.remove(name)))
}

/// A random [`crate::model::Model`]: [`model`] with [`word_tokenizer`], named `random-{seed}`.
pub fn full_model(config: &Qwen2Config, seed: u64, device: &Device) -> Result<Model> {
    Ok(Model {
        qwen2: model(config, seed, device)?,
        tokenizer: Tokenizer::from_inner(word_tokenizer(config.vocab_size)?),
        name: format!("random-{seed}"),
    })
}

/// A word-level tokenizer over `vocab_size` tokens named `t0`, `t1`, ...,
/// split on whitespace: text for a random model is written in those words.
pub fn word_tokenizer(vocab_size: usize) -> Result<tokenizers::Tokenizer> {
    use tokenizers::models::wordlevel::WordLevel;
    let vocab = (0..vocab_size).map(|i| (format!("t{i}"), i as u32)).collect();
    let model = WordLevel::builder()
        .vocab(vocab)
        .unk_token("t0".into())
        .build()
        .map_err(|e| crate::error::Error::Tokenizer(e.to_string()))?;
    let mut tokenizer = tokenizers::Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace {}));
    Ok(tokenizer)
}

/// Writes `weights` as an HF-style model directory (`config.json`,
/// `tokenizer.json` from [`word_tokenizer`], `model.safetensors`), loadable
/// with [`crate::model::ModelSource::SafetensorsDir`].
pub fn write_model_dir(dir: &Path, config: &Qwen2Config, weights: &HashMap<String, Tensor>) -> Result<()> {
    let io = |e: std::io::Error| crate::error::Error::io(dir, e);
    let mut json = serde_json::to_value(config).map_err(|e| crate::error::Error::Config(e.to_string()))?;
    json["model_type"] = "qwen2".into();
    std::fs::write(dir.join("config.json"), json.to_string()).map_err(io)?;
    word_tokenizer(config.vocab_size)?
        .save(dir.join("tokenizer.json"), false)
        .map_err(|e| crate::error::Error::Tokenizer(e.to_string()))?;
    candle_core::safetensors::save(weights, dir.join("model.safetensors"))?;
    Ok(())
}
