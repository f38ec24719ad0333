//! Random-weight Qwen2 models: small ones, deterministic from a seed, that
//! the tests and benchmarks build their mechanics on; and the real
//! Qwen2.5-Coder models' shapes, made on the device, so that `cram
//! self-test` checks a device and `cram bench --synthetic` times it with no
//! download (speed does not depend on weight values).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::model::{Model, Qwen2, Qwen2Config};
use crate::tokenizer::Tokenizer;
use crate::rng::Normal;
use crate::error::{Error, Result};

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

/// The Qwen2.5-Coder models whose shapes [`real_shape`] knows.
pub const REAL_SHAPES: [&str; 3] = ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "qwen2.5-coder-7b"];

/// The configuration of a released Qwen2.5-Coder model (`qwen2.5-coder-7b`,
/// or `7b` for short; see [`REAL_SHAPES`]), as its `config.json` gives it.
pub fn real_shape(name: &str) -> Result<Qwen2Config> {
    let short = name.trim_start_matches("qwen2.5-coder-").trim_end_matches("-instruct");
    // (hidden, intermediate, layers, heads, kv heads, vocabulary, tied embeddings)
    let (hidden, intermediate, layers, heads, kv_heads, vocab, tied) = match short {
        "0.5b" => (896, 4864, 24, 14, 2, 151_936, true),
        "1.5b" => (1536, 8960, 28, 12, 2, 151_936, true),
        "7b" => (3584, 18_944, 28, 28, 4, 152_064, false),
        _ => return Err(Error::Invalid(format!("no known shape `{name}` (known: {})", REAL_SHAPES.join(", ")))),
    };
    Ok(Qwen2Config {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: intermediate,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        rope_theta: 1_000_000.0,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: tied,
    })
}

/// One weight of a random model: its HF checkpoint name, shape, and the
/// normal distribution it is drawn from.
struct WeightSpec {
    name: String,
    shape: Vec<usize>,
    mean: f32,
    std: f32,
}

/// Every weight of a Qwen2 with `config`, with biases on Q/K/V as the real
/// layout has. Matrices are scaled by 1/sqrt(fan-in) and norms sit near 1,
/// so activations keep their size through any number of layers.
fn weight_specs(config: &Qwen2Config) -> Vec<WeightSpec> {
    let hidden = config.hidden_size;
    let kv_width = config.num_key_value_heads * config.head_dim();
    let ffn = config.intermediate_size;
    let scale = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
    let spec = |name: String, shape: &[usize], mean: f32, std: f32| WeightSpec { name, shape: shape.to_vec(), mean, std };
    let mut specs = vec![spec("model.embed_tokens.weight".into(), &[config.vocab_size, hidden], 0.0, 1.0)];
    for layer in 0..config.num_hidden_layers {
        let p = format!("model.layers.{layer}");
        specs.extend([
            spec(format!("{p}.input_layernorm.weight"), &[hidden], 1.0, 0.1),
            spec(format!("{p}.self_attn.q_proj.weight"), &[hidden, hidden], 0.0, scale(hidden)),
            spec(format!("{p}.self_attn.q_proj.bias"), &[hidden], 0.0, 0.1),
            spec(format!("{p}.self_attn.k_proj.weight"), &[kv_width, hidden], 0.0, scale(hidden)),
            spec(format!("{p}.self_attn.k_proj.bias"), &[kv_width], 0.0, 0.1),
            spec(format!("{p}.self_attn.v_proj.weight"), &[kv_width, hidden], 0.0, scale(hidden)),
            spec(format!("{p}.self_attn.v_proj.bias"), &[kv_width], 0.0, 0.1),
            spec(format!("{p}.self_attn.o_proj.weight"), &[hidden, hidden], 0.0, scale(hidden)),
            spec(format!("{p}.post_attention_layernorm.weight"), &[hidden], 1.0, 0.1),
            spec(format!("{p}.mlp.gate_proj.weight"), &[ffn, hidden], 0.0, scale(hidden)),
            spec(format!("{p}.mlp.up_proj.weight"), &[ffn, hidden], 0.0, scale(hidden)),
            spec(format!("{p}.mlp.down_proj.weight"), &[hidden, ffn], 0.0, scale(ffn)),
        ]);
    }
    specs.push(spec("model.norm.weight".into(), &[hidden], 1.0, 0.1));
    if !config.tie_word_embeddings {
        specs.push(spec("lm_head.weight".into(), &[config.vocab_size, hidden], 0.0, scale(hidden)));
    }
    specs
}

/// Random f32 weights under their HF checkpoint names, the same for a seed
/// on every platform, so the same weights can feed this crate,
/// candle-transformers, a safetensors file, or two devices to compare.
pub fn named_weights(config: &Qwen2Config, seed: u64, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut normal = Normal::new(seed);
    let mut tensors = HashMap::new();
    for spec in weight_specs(config) {
        let count = spec.shape.iter().product();
        let data: Vec<f32> = (0..count).map(|_| spec.mean + spec.std * normal.sample()).collect();
        tensors.insert(spec.name, Tensor::from_vec(data, spec.shape, device)?);
    }
    Ok(tensors)
}

/// A random model drawn by `device`'s own generator, in `dtype`: fast at
/// the 7B's shape (a host-side draw of 7.6 billion normals takes minutes),
/// but not reproducible across devices. For timing, not for comparing.
pub fn device_model(config: &Qwen2Config, device: &Device, dtype: DType) -> Result<Qwen2> {
    let mut specs: HashMap<String, WeightSpec> = weight_specs(config).into_iter().map(|spec| (spec.name.clone(), spec)).collect();
    Qwen2::from_named_weights(config.clone(), |name| {
        let Some(spec) = specs.remove(name) else { return Ok(None) };
        Ok(Some(Tensor::randn(spec.mean, spec.std, spec.shape, device)?.to_dtype(dtype)?))
    })
}

/// A random model built from [`named_weights`].
pub fn model(config: &Qwen2Config, seed: u64, device: &Device) -> Result<Qwen2> {
    model_from_weights(config, &named_weights(config, seed, &Device::Cpu)?, device, DType::F32)
}

/// The model of `weights` (as [`named_weights`] makes them) on `device`, in `dtype`.
pub fn model_from_weights(config: &Qwen2Config, weights: &HashMap<String, Tensor>, device: &Device, dtype: DType) -> Result<Qwen2> {
    Qwen2::from_named_weights(config.clone(), |name| weights.get(name).map(|weight| weight.to_dtype(dtype)?.to_device(device)).transpose().map_err(Error::from))
}

/// A random [`crate::model::Model`]: [`model`] with [`word_tokenizer`], named `random-{seed}`.
pub fn full_model(config: &Qwen2Config, seed: u64, device: &Device) -> Result<Model> {
    with_word_tokenizer(model(config, seed, device)?, &format!("random-{seed}"))
}

/// `qwen2` as a [`crate::model::Model`] named `name`, with a [`word_tokenizer`] over its vocabulary.
pub fn with_word_tokenizer(qwen2: Qwen2, name: &str) -> Result<Model> {
    let tokenizer = Tokenizer::from_inner(word_tokenizer(qwen2.config().vocab_size)?);
    Ok(Model { qwen2, tokenizer, name: name.to_string() })
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
