//! Compress two turns of a conversation, save the cache, and answer from it
//! with plain candle code that knows nothing of sessions: the file is an
//! ordinary safetensors file, the cache just per-layer K/V, positions, and
//! (for attention matching's entries) a logit bias per entry and KV head,
//! which the forward adds to the attention scores like an additive mask.
//!
//! cargo run --release -p cram --example session_cache -- [MODEL.gguf] [OUT.safetensors]
//!
//! The model defaults to `qwen2.5-coder-0.5b-instruct.gguf` where
//! `cargo run --release -- fetch-model` puts it: `$CRAM_HOME/models/`, else
//! `$XDG_CACHE_HOME/cram/models/`, else `~/.cache/cram/models/`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{Device, D};
use cram::{AttentionMatching, Compressor, KvCache, Logits, Model, ModelSource, Recipe, Session};

const SYSTEM: &str = "<|im_start|>system\nYou are a coding agent working in a Node.js repository.<|im_end|>\n";
const TURNS: [&str; 2] = [
    "<|im_start|>user\nSet up auth. Passwords are hashed with bcryptjs (not bcrypt: no native build on our CI), \
     cost factor 12, in src/auth/hash.js.<|im_end|>\n",
    "<|im_start|>assistant\nDone: src/auth/hash.js exports hashPassword and verifyPassword using bcryptjs with 12 rounds. \
     Tests use the built-in node:test runner, run with `node --test`.<|im_end|>\n",
];
const QUESTION: &str = "<|im_start|>user\nWhich library hashes passwords?<|im_end|>\n<|im_start|>assistant\n";

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let model_path = args.next().map(PathBuf::from).unwrap_or_else(default_model_path);
    let out = args.next().map_or_else(|| std::env::temp_dir().join("cram-session.safetensors"), PathBuf::from);
    let model = Model::load(&ModelSource::gguf(&model_path), &Device::Cpu)
        .with_context(|| format!("loading {} (fetch it with `cargo run --release -- fetch-model`)", model_path.display()))?;

    // 1. cram: compress two turns, 2x, each against the cache so far (the
    // first by attention matching, the second by the recipe); save.
    let mut session = Session::new(&model, SYSTEM)?;
    let methods: [&dyn Compressor; 2] = [&AttentionMatching { settings: Default::default(), ratio: 2.0 }, &Recipe::published(2.0)];
    for (turn, method) in TURNS.into_iter().zip(methods) {
        let report = session.push_compressed(turn, method, &mut |_, _| {})?;
        println!("turn of {} tokens -> {} entries ({})", report.n_tokens, report.n_kept, report.method);
    }
    session.save(&out)?;
    println!("cache: {} entries standing for {} positions, saved to {}", session.cache().len(), session.next_position(), out.display());

    // 2. Plain candle: load the tensors and the header, decode greedily.
    let bytes = std::fs::read(&out)?;
    let mut tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
    let next_position: f32 = header.metadata().as_ref().and_then(|m| m.get("next_position")).context("no next_position")?.parse()?;
    let layers = model.qwen2.config().num_hidden_layers;
    let keys = (0..layers).map(|l| tensors.remove(&format!("keys.{l}")).context("keys")).collect::<Result<Vec<_>>>()?;
    let values = (0..layers).map(|l| tensors.remove(&format!("values.{l}")).context("values")).collect::<Result<Vec<_>>>()?;
    let positions = tensors.remove("positions").context("positions")?.to_vec1::<f32>()?;
    // Per layer (1, kv_heads, entries): absent when every bias is 0.
    let biases = (0..layers).map(|l| tensors.remove(&format!("biases.{l}"))).collect::<Option<Vec<_>>>();
    let mut cache = KvCache::new();
    cache.append_biased(&keys, &values, biases.as_deref(), &positions)?;

    let qwen2 = &model.qwen2;
    let stop = model.tokenizer.stop_ids();
    let mut feed = model.tokenizer.encode(QUESTION)?;
    let (mut position, mut answer) = (next_position, Vec::new());
    while answer.len() < 32 {
        let at: Vec<f32> = (0..feed.len()).map(|i| position + i as f32).collect();
        let output = qwen2.forward(&qwen2.embed(&feed)?, &at, Some(&cache), Logits::Last)?;
        cache.append(&output.keys, &output.values, &at)?;
        position += feed.len() as f32;
        let next = output.logits.context("logits")?.squeeze(0)?.squeeze(0)?.argmax(D::Minus1)?.to_scalar::<u32>()?;
        if stop.contains(&next) {
            break;
        }
        answer.push(next);
        feed = vec![next];
    }
    println!("Q: Which library hashes passwords?\nA: {}", model.tokenizer.decode(&answer)?);
    Ok(())
}

/// Where `cram fetch-model` puts it: `$CRAM_HOME`, else
/// `$XDG_CACHE_HOME/cram`, else `~/.cache/cram`.
fn default_model_path() -> PathBuf {
    let cache = || std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    let home = std::env::var_os("CRAM_HOME")
        .map(PathBuf::from)
        .or_else(|| cache().map(|c| c.join("cram")))
        .unwrap_or_else(|| PathBuf::from("."));
    home.join("models/qwen2.5-coder-0.5b-instruct.gguf")
}
