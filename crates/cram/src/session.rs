//! A conversation compressed turn by turn, as an agent's history ages.
//!
//! A [`Session`] holds the running KV cache. Each turn is pushed verbatim or
//! through a [`Compressor`]; a compressed turn's targets are computed over
//! the cache as it stands (earlier turns already compressed), at the turn's
//! original positions. The cache's physical length (entries) and the
//! logical position the next turn starts at are tracked apart (by the
//! cache): a compressed turn holds fewer entries than the positions it covers.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::cache::KvCache;
use crate::compressor::{CompressedSpan, CompressionReport, Compressor};
use crate::generate;
use crate::model::{Logits, Model};
use crate::recipe::{compress_together, Recipe};
use crate::span::SpanTargets;
use crate::error::{Error, Result};

/// What one pushed turn became.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Turn {
    /// Tokens of the turn as rendered.
    pub n_tokens: usize,
    /// Cache entries that stand for it.
    pub n_kept: usize,
    /// The compressor's report; `None` for a verbatim turn.
    pub compression: Option<CompressionReport>,
}

/// A turn's targets, computed over a session as it stood
/// ([`Session::turn_targets`]) to compress the turn more than one way.
#[derive(Debug, Clone)]
pub struct TurnTargets {
    span: SpanTargets,
    with_surprisal: bool,
    with_queries: bool,
    /// Seconds their forward took.
    seconds: f64,
    /// The session they were computed over: its entries and next position.
    entries_before: usize,
    next_position: f32,
}

/// A running conversation over a frozen model.
#[derive(Debug, Clone)]
pub struct Session<'m> {
    model: &'m Model,
    /// Its next position is where the next turn starts: the original
    /// positions, as if every turn were still there verbatim.
    cache: KvCache,
    turns: Vec<Turn>,
}

/// Header keys of a saved session.
const FORMAT_KEY: &str = "cram.format";
const FORMAT: &str = "cram-session-1";
const IDENTITY_KEY: &str = "model.identity";
const NAME_KEY: &str = "model.name";
const TURNS_KEY: &str = "turns";

impl TurnTargets {
    /// The turn's K/V targets (and surprisal, queries, as asked for).
    pub fn span(&self) -> &SpanTargets {
        &self.span
    }
}

impl<'m> Session<'m> {
    /// A session whose cache holds `system_prompt`, already rendered (e.g.
    /// `<|im_start|>system\n...<|im_end|>\n`); it may be empty.
    pub fn new(model: &'m Model, system_prompt: &str) -> Result<Self> {
        let mut session = Self { model, cache: KvCache::new(), turns: Vec::new() };
        session.push_verbatim(system_prompt)?;
        Ok(session)
    }

    /// Appends rendered text verbatim.
    pub fn push_verbatim(&mut self, text: &str) -> Result<()> {
        let ids = self.model.tokenizer.encode(text)?;
        self.push_verbatim_ids(&ids)
    }

    /// Appends tokens verbatim.
    pub fn push_verbatim_ids(&mut self, ids: &[u32]) -> Result<()> {
        if !ids.is_empty() {
            let positions = self.turn_positions(ids.len());
            let qwen2 = &self.model.qwen2;
            let output = qwen2.forward(&qwen2.embed(ids)?, &positions, Some(&self.cache), Logits::None)?;
            self.cache.append(&output.keys, &output.values, &positions)?;
        }
        self.turns.push(Turn { n_tokens: ids.len(), n_kept: ids.len(), compression: None });
        Ok(())
    }

    /// Compresses rendered text with `compressor` against the running cache
    /// and appends the result. `on_step(step, loss)` reports optimization.
    pub fn push_compressed(
        &mut self,
        text: &str,
        compressor: &dyn Compressor,
        on_step: &mut dyn FnMut(usize, f32),
    ) -> Result<CompressionReport> {
        let targets = self.turn_targets(text, compressor.needs_surprisal(), compressor.needs_span_queries())?;
        self.push_compressed_targets(&targets, compressor, on_step)
    }

    /// The targets of rendered text as the next turn, what
    /// [`Session::push_compressed`] computes first: computed once, they
    /// serve every compressor of the turn with these needs (each on its
    /// own clone of this session, [`Session::push_compressed_targets`]),
    /// where the turn's forward would otherwise run once per compressor.
    pub fn turn_targets(&self, text: &str, with_surprisal: bool, with_queries: bool) -> Result<TurnTargets> {
        let started = std::time::Instant::now();
        let span = self.span_targets(text, with_surprisal, with_queries)?;
        let seconds = started.elapsed().as_secs_f64();
        Ok(TurnTargets { span, with_surprisal, with_queries, seconds, entries_before: self.cache.len(), next_position: self.next_position() })
    }

    /// [`Session::push_compressed`] from targets computed by
    /// [`Session::turn_targets`] over this session as it stands, or over a
    /// clone of it that has not changed since, with exactly the
    /// compressor's needs (extra queries would change how some methods
    /// read the span). The check here compares lengths and positions, not
    /// contents: targets of another session of the same length pass it.
    /// The report's seconds count the targets' forward too, so a
    /// compaction costs the same whether its targets were shared or not.
    pub fn push_compressed_targets(
        &mut self,
        targets: &TurnTargets,
        compressor: &dyn Compressor,
        on_step: &mut dyn FnMut(usize, f32),
    ) -> Result<CompressionReport> {
        if (targets.entries_before, targets.next_position) != (self.cache.len(), self.next_position()) {
            return Err(Error::Invalid(format!(
                "targets computed after {} entries, at position {}, pushed onto a session of {} entries at position {}: compute them over this session (`turn_targets`)",
                targets.entries_before,
                targets.next_position,
                self.cache.len(),
                self.next_position()
            )));
        }
        let with = |held: bool| if held { "with" } else { "without" };
        let needs = (compressor.needs_surprisal(), compressor.needs_span_queries());
        if needs != (targets.with_surprisal, targets.with_queries) {
            return Err(Error::Invalid(format!(
                "{} needs targets {} surprisal and {} the span's queries; these were computed {} surprisal and {} queries",
                compressor.name(),
                with(needs.0),
                with(needs.1),
                with(targets.with_surprisal),
                with(targets.with_queries),
            )));
        }
        let started = std::time::Instant::now();
        let mut compressed = compressor.compress(self.model, &self.cache, &targets.span, on_step)?;
        compressed.report.seconds = targets.seconds + started.elapsed().as_secs_f64();
        self.push_compressed_span(targets.span.len(), compressed)
    }

    /// Compresses rendered text with each recipe in one batched
    /// optimization ([`compress_together`]) and returns one session per
    /// recipe, each this one followed by its compressed turn: a ratio (or
    /// pooling, or seed) sweep of one span for about the cost of one on a GPU.
    pub fn fork_compressed(
        &self,
        text: &str,
        recipes: &[Recipe],
        on_step: &mut dyn FnMut(usize, f32),
    ) -> Result<Vec<Self>> {
        let span = self.span_targets(text, true, false)?;
        compress_together(recipes, self.model, &self.cache, &span, on_step)?
            .into_iter()
            .map(|compressed| {
                let mut fork = self.clone();
                fork.push_compressed_span(span.len(), compressed)?;
                Ok(fork)
            })
            .collect()
    }

    /// The targets of rendered text as the next turn.
    fn span_targets(&self, text: &str, with_surprisal: bool, with_queries: bool) -> Result<SpanTargets> {
        let ids = self.model.tokenizer.encode(text)?;
        if ids.is_empty() {
            return Err(Error::Invalid("cannot compress an empty turn".into()));
        }
        let positions = self.turn_positions(ids.len());
        SpanTargets::compute_for(&self.model.qwen2, &self.cache, &ids, &positions, with_surprisal, with_queries)
    }

    /// Appends the entries that stand for the next turn, of `n_tokens` tokens.
    fn push_compressed_span(&mut self, n_tokens: usize, compressed: CompressedSpan) -> Result<CompressionReport> {
        compressed.append_to(&mut self.cache)?;
        let report = compressed.report;
        self.turns.push(Turn { n_tokens, n_kept: report.n_kept, compression: Some(report.clone()) });
        Ok(report)
    }

    /// Answers `prompt` (rendered, e.g. a user turn and the assistant
    /// header) greedily, up to `max_new_tokens`, on a copy of the cache: the
    /// session itself does not change.
    pub fn ask(&self, prompt: &str, max_new_tokens: usize) -> Result<String> {
        let tokenizer = &self.model.tokenizer;
        let prompt_ids = tokenizer.encode(prompt)?;
        let mut cache = self.cache.clone();
        let answer = generate::greedy(
            &self.model.qwen2,
            &mut cache,
            &prompt_ids,
            self.cache.next_position(),
            max_new_tokens,
            &tokenizer.stop_ids(),
        )?;
        tokenizer.decode(&answer)
    }

    /// [`Session::ask`] for each of `prompts`, their answers decoded
    /// together ([`generate::greedy_together`]): the same answers but for
    /// rounding, faster (for the 0.5B on a 2-core CPU after 1,000 tokens,
    /// 1.8 times the tokens a second for 8 answers).
    pub fn ask_together(&self, prompts: &[String], max_new_tokens: usize) -> Result<Vec<String>> {
        let tokenizer = &self.model.tokenizer;
        let prompt_ids = prompts.iter().map(|prompt| tokenizer.encode(prompt)).collect::<Result<Vec<_>>>()?;
        let answers = generate::greedy_together(
            &self.model.qwen2,
            &self.cache,
            &prompt_ids,
            self.cache.next_position(),
            max_new_tokens,
            &tokenizer.stop_ids(),
        )?;
        answers.iter().map(|answer| tokenizer.decode(answer)).collect()
    }

    /// The running cache.
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// The position the next turn starts at (the logical length).
    pub fn next_position(&self) -> f32 {
        self.cache.next_position()
    }

    /// Every turn pushed so far, the system prompt first.
    pub fn turns(&self) -> &[Turn] {
        &self.turns
    }

    /// The model the session runs on.
    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// Saves the cache, its positions, the turns and the model's identity
    /// as one safetensors file (see [`KvCache::save`] for the tensors).
    pub fn save(&self, path: &Path) -> Result<()> {
        let turns = serde_json::to_string(&self.turns).map_err(|e| Error::Invalid(e.to_string()))?;
        let metadata = HashMap::from([
            (FORMAT_KEY.to_string(), FORMAT.to_string()),
            (IDENTITY_KEY.to_string(), self.model.qwen2.identity()?),
            (NAME_KEY.to_string(), self.model.name.clone()),
            (TURNS_KEY.to_string(), turns),
        ]);
        self.cache.save(path, metadata)
    }

    /// Loads a session saved by [`Session::save`]; a cache computed by
    /// another model is refused with [`Error::WrongModel`].
    pub fn load(model: &'m Model, path: &Path) -> Result<Self> {
        let (cache, metadata) = KvCache::load(path, model.qwen2.device(), model.qwen2.dtype())?;
        let bad = |reason: &str| Error::Invalid(format!("{}: {reason}", path.display()));
        if metadata.get(FORMAT_KEY).map(String::as_str) != Some(FORMAT) {
            return Err(bad("not a saved cram session"));
        }
        let saved = metadata.get(IDENTITY_KEY).cloned().unwrap_or_default();
        let loading = model.qwen2.identity()?;
        if saved != loading {
            return Err(Error::WrongModel { path: path.to_path_buf(), saved, loading });
        }
        let turns = metadata.get(TURNS_KEY).and_then(|t| serde_json::from_str(t).ok()).ok_or_else(|| bad("no turns"))?;
        Ok(Self { model, cache, turns })
    }

    /// Positions of a turn of `n` tokens starting at the next position.
    fn turn_positions(&self, n: usize) -> Vec<f32> {
        (0..n).map(|i| self.next_position() + i as f32).collect()
    }
}
