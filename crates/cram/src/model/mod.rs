//! Loading a frozen Qwen2 model: hyperparameters, weights and tokenizer from a
//! GGUF file (dequantised), a local safetensors directory, or an hf-hub repo.

mod blocks;
mod config;
pub mod ops;
mod placement;
mod qwen2;
pub mod rope;
mod rows;

pub use config::Qwen2Config;
pub use qwen2::{ForwardOutput, Logits, Placement, Qwen2};
pub use rows::RowEntries;

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::tokenizer::Tokenizer;
use crate::error::{Error, Result};

/// Where a model's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// One GGUF file holding hyperparameters, (quantised) weights and tokenizer.
    Gguf(PathBuf),
    /// A directory with `config.json`, `tokenizer.json` and `*.safetensors`.
    SafetensorsDir(PathBuf),
    /// An hf-hub repository id such as `Qwen/Qwen2.5-Coder-7B-Instruct`,
    /// fetched (or taken from the hub cache) with the hf-hub crate.
    HfHub {
        /// `owner/name`.
        repo: String,
        /// A branch, tag or commit; the default branch when `None`.
        revision: Option<String>,
    },
}

impl ModelSource {
    /// A GGUF file.
    pub fn gguf(path: impl Into<PathBuf>) -> Self {
        Self::Gguf(path.into())
    }

    /// A local HF-style safetensors directory.
    pub fn safetensors_dir(path: impl Into<PathBuf>) -> Self {
        Self::SafetensorsDir(path.into())
    }

    /// An hf-hub repository at its default revision.
    pub fn hf_hub(repo: impl Into<String>) -> Self {
        Self::HfHub { repo: repo.into(), revision: None }
    }

    /// A readable name for reports and cache metadata.
    pub fn name(&self) -> String {
        match self {
            Self::Gguf(path) | Self::SafetensorsDir(path) => {
                path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())
            }
            Self::HfHub { repo, revision } => match revision {
                Some(revision) => format!("{repo}@{revision}"),
                None => repo.clone(),
            },
        }
    }
}

/// The dtype weights are held in by default: f32 on CPU (no fast bf16
/// matmul there), bf16 on an accelerator.
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

/// A frozen model and its tokenizer.
#[derive(Debug, Clone)]
pub struct Model {
    /// The network.
    pub qwen2: Qwen2,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// The source's name (reports, cache metadata).
    pub name: String,
}

impl Model {
    /// Loads a model in [`default_dtype`] for `device`.
    pub fn load(source: &ModelSource, device: &Device) -> Result<Self> {
        Self::load_with_dtype(source, device, default_dtype(device))
    }

    /// Loads a model with weights (and activations) in `dtype`.
    pub fn load_with_dtype(source: &ModelSource, device: &Device, dtype: DType) -> Result<Self> {
        let (qwen2, tokenizer) = match source {
            ModelSource::Gguf(path) => load_gguf(path, device, dtype)?,
            ModelSource::SafetensorsDir(dir) => load_safetensors_dir(dir, device, dtype)?,
            ModelSource::HfHub { repo, revision } => {
                let dir = fetch_from_hub(repo, revision.as_deref())?;
                load_safetensors_files(&dir, repo, device, dtype)?
            }
        };
        Ok(Self { qwen2, tokenizer, name: source.name() })
    }
}

fn load_gguf(path: &Path, device: &Device, dtype: DType) -> Result<(Qwen2, Tokenizer)> {
    let bad = |reason: String| Error::BadGguf { path: path.to_path_buf(), reason };
    if !path.exists() {
        return Err(Error::MissingFile(path.to_path_buf()));
    }
    let mut reader = BufReader::new(File::open(path).map_err(|e| Error::io(path, e))?);
    let content = gguf_file::Content::read(&mut reader).map_err(|e| bad(e.to_string()))?;
    check_gguf_complete(path, &content)?;
    let source_name = path.display().to_string();
    let config = Qwen2Config::from_gguf(&content, &source_name)?;
    let tokenizer = Tokenizer::from_gguf(&content)?;
    let qwen2 = Qwen2::from_named_weights(config, |hf_name| {
        let name = gguf_tensor_name(hf_name);
        if !content.tensor_infos.contains_key(&name) {
            return Ok(None);
        }
        // Dequantise on the CPU (every quantisation type is supported there),
        // then move: weights are frozen, so one conversion at load suffices.
        let quantized = content.tensor(&mut reader, &name, &Device::Cpu).map_err(|e| bad(format!("{name}: {e}")))?;
        let weight = quantized.dequantize(&Device::Cpu)?.to_dtype(dtype)?.to_device(device)?;
        Ok(Some(weight))
    })?;
    Ok((qwen2, tokenizer))
}

/// A GGUF cut short still parses its header; refuse it before reading weights.
fn check_gguf_complete(path: &Path, content: &gguf_file::Content) -> Result<()> {
    let file_len = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
    let needed = content
        .tensor_infos
        .values()
        .map(|info| {
            let dtype = info.ggml_dtype;
            let bytes = info.shape.elem_count() / dtype.block_size() * dtype.type_size();
            content.tensor_data_offset + info.offset + bytes as u64
        })
        .max()
        .unwrap_or(content.tensor_data_offset);
    if file_len < needed {
        return Err(Error::BadGguf {
            path: path.to_path_buf(),
            reason: format!("truncated: {file_len} bytes, its tensors need {needed}"),
        });
    }
    Ok(())
}

/// HF checkpoint name -> llama.cpp GGUF name.
fn gguf_tensor_name(hf_name: &str) -> String {
    const GLOBAL: [(&str, &str); 3] = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    const PER_LAYER: [(&str, &str); 9] = [
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
    if let Some((_, gguf)) = GLOBAL.iter().find(|(hf, _)| *hf == hf_name) {
        return gguf.to_string();
    }
    if let Some(rest) = hf_name.strip_prefix("model.layers.") {
        if let Some((index, tail)) = rest.split_once('.') {
            for (hf, gguf) in PER_LAYER {
                if let Some(suffix) = tail.strip_prefix(hf) {
                    return format!("blk.{index}.{gguf}{suffix}");
                }
            }
        }
    }
    hf_name.to_string()
}

fn load_safetensors_dir(dir: &Path, device: &Device, dtype: DType) -> Result<(Qwen2, Tokenizer)> {
    if !dir.is_dir() {
        return Err(Error::MissingFile(dir.to_path_buf()));
    }
    load_safetensors_files(dir, &dir.display().to_string(), device, dtype)
}

/// Loads `config.json`, `tokenizer.json` and the safetensors weights of `dir`
/// (one `model.safetensors` or the shards of `model.safetensors.index.json`).
fn load_safetensors_files(dir: &Path, source_name: &str, device: &Device, dtype: DType) -> Result<(Qwen2, Tokenizer)> {
    let config_path = dir.join("config.json");
    let config_json = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let config = Qwen2Config::from_hf_json(&config_json, source_name)?;
    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    let files = safetensors_files(dir)?;
    // SAFETY: the files are memory-mapped read-only; the library does not
    // write to them, and a caller must not truncate them while loading.
    let tensors = unsafe { MmapedSafetensors::multi(&files) }?;
    let qwen2 = Qwen2::from_named_weights(config, |name| {
        if tensors.get(name).is_err() {
            return Ok(None);
        }
        let tensor: Tensor = tensors.load(name, device)?;
        Ok(Some(tensor.to_dtype(dtype)?))
    })?;
    Ok((qwen2, tokenizer))
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    let index = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
    shard_names(&index, &index_path).map(|names| names.into_iter().map(|n| dir.join(n)).collect())
}

/// The distinct shard file names of a `model.safetensors.index.json`.
fn shard_names(index_json: &str, index_path: &Path) -> Result<Vec<String>> {
    let index: serde_json::Value =
        serde_json::from_str(index_json).map_err(|e| Error::Config(format!("{}: {e}", index_path.display())))?;
    let weight_map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Config(format!("{}: no weight_map", index_path.display())))?;
    let mut names: Vec<String> = weight_map.values().filter_map(|v| v.as_str().map(String::from)).collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Fetches (or finds in the hub cache) a repo's config, tokenizer and
/// safetensors into one snapshot directory, and returns it.
fn fetch_from_hub(repo_id: &str, revision: Option<&str>) -> Result<PathBuf> {
    let hub_error = |file: &str, reason: String| Error::Hub { repo: repo_id.into(), file: file.into(), reason };
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| hub_error("-", e.to_string()))?;
    let repo = match revision {
        Some(revision) => hf_hub::Repo::with_revision(repo_id.into(), hf_hub::RepoType::Model, revision.into()),
        None => hf_hub::Repo::model(repo_id.into()),
    };
    let repo = api.repo(repo);
    let get = |file: &str| repo.get(file).map_err(|e| hub_error(file, e.to_string()));
    let config_path = get("config.json")?;
    get("tokenizer.json")?;
    match get("model.safetensors.index.json") {
        Ok(index_path) => {
            let index = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            for shard in shard_names(&index, &index_path)? {
                get(&shard)?;
            }
        }
        Err(_) => {
            get("model.safetensors")?;
        }
    }
    let snapshot = config_path.parent().ok_or_else(|| hub_error("config.json", "no snapshot directory".into()))?;
    Ok(snapshot.to_path_buf())
}
