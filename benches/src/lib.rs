//! Shared pieces of the benchmarks: the real-model optimization step and a
//! counting allocator to measure its peak memory.

use std::alloc::{GlobalAlloc, Layout};

use mimalloc::MiMalloc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Result;
use candle_core::{Tensor, Var};
use cram::model::ops::WeightGrad;
use cram::recipe::objective;
use cram::{KvCache, Logits, Model, ModelSource, Recipe, SpanTargets};
use cram_eval::models::{KnownModel, DEFAULT_MODEL};

/// Wraps mimalloc (the allocator the `cram` binary runs on), counting live
/// bytes and their peak.
pub struct CountingAllocator;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let pointer = MiMalloc.alloc(layout);
        if !pointer.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        MiMalloc.dealloc(pointer, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

/// Runs `work` and returns the peak of live heap bytes above what was live
/// when it started (needs [`CountingAllocator`] as the global allocator).
pub fn peak_extra_bytes<T>(work: impl FnOnce() -> T) -> (T, usize) {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let result = work();
    (result, PEAK.load(Ordering::Relaxed) - before)
}

/// The default real model, fetched if absent.
pub fn load_default_model() -> Result<Model> {
    let path = KnownModel::find(DEFAULT_MODEL)?.ensure()?;
    Ok(Model::load(&ModelSource::gguf(path), &candle_core::Device::Cpu)?)
}

/// One optimization step's inputs: a prefix cache, virtual embeddings at
/// positions spread over a span after the prefix, and V targets.
pub struct StepSetup {
    pub cache: KvCache,
    pub virtual_embeddings: Var,
    pub virtual_positions: Vec<f32>,
    pub targets: Vec<Tensor>,
}

impl StepSetup {
    /// The first `prefix_len` tokens of `text` as the prefix and the next
    /// `round(3.2 n_virtual)` as the span, set up exactly as the published
    /// recipe starts its optimization at 3.2x (`Recipe::virtual_start`).
    pub fn new(model: &Model, text: &str, prefix_len: usize, n_virtual: usize) -> Result<Self> {
        let ratio = 3.2;
        let span_len = (n_virtual as f64 * ratio).round() as usize;
        let ids = model.tokenizer.encode(text)?;
        anyhow::ensure!(ids.len() >= prefix_len + span_len, "text too short: {} tokens", ids.len());
        let positions: Vec<f32> = (0..prefix_len + span_len).map(|i| i as f32).collect();
        let cache = cram_eval::bench::prefix_cache(&model.qwen2, &ids[..prefix_len], &positions[..prefix_len])?;
        let span = SpanTargets::compute(&model.qwen2, &cache, &ids[prefix_len..prefix_len + span_len], &positions[prefix_len..])?;
        let start = Recipe::published(ratio).virtual_start(model, &cache, &span)?;
        anyhow::ensure!(start.positions.len() == n_virtual, "{} virtual tokens, wanted {n_virtual}", start.positions.len());
        Ok(Self { cache, virtual_embeddings: Var::from_tensor(&start.init)?, virtual_positions: start.positions, targets: start.targets })
    }

    /// Forward to every layer's V, the normalised V loss, backward to the
    /// embeddings. Returns the loss.
    pub fn step(&self, model: &Model) -> Result<f32> {
        let output = model.qwen2.forward(self.virtual_embeddings.as_tensor(), &self.virtual_positions, Some(&self.cache), Logits::None)?;
        let loss = objective::normalised_loss(&output.values, &self.targets)?;
        let grads = loss.backward()?;
        anyhow::ensure!(grads.get(self.virtual_embeddings.as_tensor()).is_some(), "no gradient reached the embeddings");
        Ok(loss.to_scalar::<f32>()?)
    }
}

/// The transcript text the benchmarks run on (the published T8 turn and
/// what surrounds it, rendered with the chat template).
pub fn bench_text() -> Result<String> {
    let cases = cram_eval::cases::load_case_file(&repo_path("eval/bearing/bearing-questions.json"))?;
    let messages = &cases[0].transcript.messages;
    let indices: Vec<usize> = (0..messages.len().min(12)).collect();
    Ok(cram_eval::render::Rendering::Chatml.messages(messages, &indices))
}

/// A span of the bearing transcript (ChatML) after its first tokens,
/// cached verbatim as the prefix.
pub struct BearingSpan {
    pub prefix: KvCache,
    /// The span's token ids.
    pub ids: Vec<u32>,
    /// The span's positions, right after the prefix.
    pub positions: Vec<f32>,
}

impl BearingSpan {
    /// `span_tokens` tokens after a `prefix_tokens`-token prefix.
    pub fn new(model: &Model, prefix_tokens: usize, span_tokens: usize) -> Result<Self> {
        let ids = cram_eval::bench::transcript_ids(model, &repo_path("eval/bearing/bearing-questions.json"))?;
        let positions: Vec<f32> = (0..prefix_tokens + span_tokens).map(|p| p as f32).collect();
        let prefix = cram_eval::bench::prefix_cache(&model.qwen2, &ids[..prefix_tokens], &positions[..prefix_tokens])?;
        Ok(Self { prefix, ids: ids[prefix_tokens..prefix_tokens + span_tokens].to_vec(), positions: positions[prefix_tokens..].to_vec() })
    }
}

pub fn repo_path(relative: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(relative)
}

/// Sets how the model's frozen weights behave in backward.
pub fn with_weight_grad(model: &Model, weight_grad: WeightGrad) -> Model {
    let mut model = model.clone();
    model.qwen2.set_weight_grad(weight_grad);
    model
}
