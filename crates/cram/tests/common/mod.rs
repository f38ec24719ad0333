//! Helpers shared by the integration tests: random models written to disk in
//! the formats the loaders read, and two references to check the forward
//! against (candle-transformers' qwen2, and [`reference`], a naive one).

#![allow(dead_code)]

pub mod reference;

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{Device, Tensor};
use cram::Qwen2Config;

/// Largest absolute difference between two tensors of one shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a.to_dtype(candle_core::DType::F32).unwrap() - b.to_dtype(candle_core::DType::F32).unwrap()).unwrap();
    diff.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Writes `weights` as an HF-style model directory.
pub fn write_safetensors_dir(dir: &Path, config: &Qwen2Config, weights: &HashMap<String, Tensor>) {
    cram::synthetic::write_model_dir(dir, config, weights).unwrap();
}

/// Writes `weights` as a llama.cpp-style GGUF (f32 tensors) with a tiny
/// GPT-2 BPE vocabulary of `config.vocab_size` tokens.
pub fn write_gguf(path: &Path, config: &Qwen2Config, weights: &HashMap<String, Tensor>, architecture: &str) {
    use gguf_file::Value;
    let tokens: Vec<Value> = (0..config.vocab_size)
        .map(|i| {
            Value::String(match i {
                0..26 => ((b'a' + i as u8) as char).to_string(),
                26 => "ab".to_string(), // the one merge's result
                _ => format!("tok{i}"),
            })
        })
        .collect();
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String(architecture.into())),
        ("qwen2.embedding_length", Value::U32(config.hidden_size as u32)),
        ("qwen2.feed_forward_length", Value::U32(config.intermediate_size as u32)),
        ("qwen2.block_count", Value::U32(config.num_hidden_layers as u32)),
        ("qwen2.attention.head_count", Value::U32(config.num_attention_heads as u32)),
        ("qwen2.attention.head_count_kv", Value::U32(config.num_key_value_heads as u32)),
        ("qwen2.rope.freq_base", Value::F32(config.rope_theta as f32)),
        ("qwen2.attention.layer_norm_rms_epsilon", Value::F32(config.rms_norm_eps as f32)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("qwen2".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        ("tokenizer.ggml.merges", Value::Array(vec![Value::String("a b".into())])),
    ];
    let qtensors: Vec<(String, QTensor)> = weights
        .iter()
        .map(|(name, tensor)| (gguf_name(name), QTensor::quantize(tensor, candle_core::quantized::GgmlDType::F32).unwrap()))
        .collect();
    let metadata_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &metadata_refs, &tensor_refs).unwrap();
}

fn gguf_name(hf: &str) -> String {
    let renames = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
        ("model.layers.", "blk."),
        ("input_layernorm", "attn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("post_attention_layernorm", "ffn_norm"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ];
    renames.iter().fold(hf.to_string(), |name, (from, to)| name.replace(from, to))
}

pub fn cpu() -> Device {
    Device::Cpu
}

/// Consecutive positions `start, start + 1, ...`, `n` of them.
pub fn positions(start: usize, n: usize) -> Vec<f32> {
    (start..start + n).map(|p| p as f32).collect()
}

/// The KV cache of `ids` run from position 0: a verbatim prefix.
pub fn prefix_cache(model: &cram::Qwen2, ids: &[u32]) -> cram::KvCache {
    let at = positions(0, ids.len());
    let out = model.forward(&model.embed(ids).unwrap(), &at, None, cram::Logits::None).unwrap();
    let mut cache = cram::KvCache::new();
    cache.append(&out.keys, &out.values, &at).unwrap();
    cache
}

/// candle-transformers' qwen2 on the same weights: the logits (1, n, vocab)
/// of `ids` run from position 0.
pub fn candle_transformers_logits(config: &Qwen2Config, weights: &HashMap<String, Tensor>, ids: &[u32]) -> Tensor {
    use candle_transformers::models::qwen2;
    let reference_config = qwen2::Config {
        vocab_size: config.vocab_size,
        hidden_size: config.hidden_size,
        intermediate_size: config.intermediate_size,
        num_hidden_layers: config.num_hidden_layers,
        num_attention_heads: config.num_attention_heads,
        num_key_value_heads: config.num_key_value_heads,
        max_position_embeddings: 4096,
        sliding_window: 4096,
        max_window_layers: config.num_hidden_layers,
        tie_word_embeddings: config.tie_word_embeddings,
        rope_theta: config.rope_theta,
        rms_norm_eps: config.rms_norm_eps,
        use_sliding_window: false,
        hidden_act: candle_nn::Activation::Silu,
    };
    let vb = candle_nn::VarBuilder::from_tensors(weights.clone(), candle_core::DType::F32, &cpu());
    let mut model = qwen2::Model::new(&reference_config, vb).unwrap();
    let ids = Tensor::new(ids, &cpu()).unwrap().unsqueeze(0).unwrap();
    let hidden = model.forward(&ids, 0, None).unwrap();
    let head = weights.get("lm_head.weight").unwrap_or(&weights["model.embed_tokens.weight"]);
    hidden.broadcast_matmul(&head.t().unwrap()).unwrap()
}
