//! The text-level baseline: what agents do today when their context fills
//! up. The same model rewrites the span as notes that keep exact names,
//! paths, versions, ports, commands and errors, and the notes' own KV
//! replaces the span. A long span is summarised chunk by chunk, each chunk
//! asked for its share of the budget, so that the notes fill the `n / ratio`
//! tokens the ratio allows instead of stopping at the few dozen tokens a
//! small model writes for any single request. The notes sit at the span's
//! first positions; what follows keeps its original positions, as for every
//! other method. The tokens actually used are the entries kept
//! (`CompressionReport::n_kept`), the notes the report's `text`.

use serde::{Deserialize, Serialize};

use crate::cache::KvCache;
use crate::compressor::{budget, CompressedSpan, Compressor};
use crate::error::{Error, Result};
use crate::generate;
use crate::model::{Logits, Model};
use crate::span::SpanTargets;

/// Summarises the span in at most `n / ratio` tokens.
#[derive(Debug, Clone, Copy)]
pub struct Summarize {
    /// Span tokens / summary tokens (at least).
    pub ratio: f64,
    /// How the span is cut into requests.
    pub settings: SummarySettings,
}

/// The summary's own knobs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SummarySettings {
    /// Span tokens summarised by one request at most.
    pub chunk_tokens: usize,
}

impl Default for SummarySettings {
    /// Chunks of up to 400 span tokens: a 0.5B model's single summary
    /// stays far under its budget beyond that (17 tokens for a 2,967-token
    /// span at 1.6x, the published ten-turn case).
    fn default() -> Self {
        Self { chunk_tokens: 400 }
    }
}

impl SummarySettings {
    /// Refuses a chunk of no tokens.
    pub fn validate(&self) -> Result<()> {
        if self.chunk_tokens == 0 {
            return Err(Error::Invalid("chunk_tokens must be at least 1".into()));
        }
        Ok(())
    }
}

/// Roughly how many English words fit in a token budget: asking for fewer
/// words than tokens leaves room for names, which take several tokens.
const WORDS_PER_TOKEN: f64 = 0.6;

impl Summarize {
    /// The ChatML request for notes on chunk `part` (from 1) of `parts`, in
    /// about `words` words, keeping exact identifiers: an agent's compaction
    /// prompt.
    pub fn prompt(chunk_text: &str, part: usize, parts: usize, words: usize) -> String {
        format!(
            "<|im_start|>system\nYou compact a coding agent's context so that it can keep working.<|im_end|>\n\
             <|im_start|>user\nBelow, between <context> tags, is part {part} of {parts} of the conversation so far: \
             the agent's tool calls and what the tools returned. Rewrite it as plain-text notes of about {words} \
             words; do not call any tool. Copy exactly, character for character: names of libraries and packages, \
             file paths, versions, port numbers, environment variables, table, queue and function names, commands, \
             ids and error messages. Leave out what does not matter for the work.\n\n\
             <context>\n{chunk_text}\n</context><|im_end|>\n<|im_start|>assistant\nNotes:\n"
        )
    }

    /// The notes' token ids, at most `budget`: each chunk's greedy notes in
    /// at most its share of the budget, joined by newlines.
    pub fn summary_ids(&self, model: &Model, span: &SpanTargets, budget: usize) -> Result<Vec<u32>> {
        let tokenizer = &model.tokenizer;
        let parts = span.len().div_ceil(self.settings.chunk_tokens).min(budget).max(1);
        let chunk_bounds = even_bounds(span.len(), parts);
        let budget_bounds = even_bounds(budget, parts);
        let mut notes = Vec::with_capacity(parts);
        for part in 0..parts {
            let chunk = &span.ids[chunk_bounds[part]..chunk_bounds[part + 1]];
            let chunk_budget = budget_bounds[part + 1] - budget_bounds[part];
            let words = ((chunk_budget as f64 * WORDS_PER_TOKEN).floor() as usize).max(1);
            let prompt = tokenizer.encode(&Self::prompt(&tokenizer.decode(chunk)?, part + 1, parts, words))?;
            let ids = generate::greedy(&model.qwen2, &mut KvCache::new(), &prompt, 0.0, chunk_budget, &tokenizer.stop_ids())?;
            notes.push(tokenizer.decode(&ids)?.trim().to_string());
        }
        // The joined text can tokenize a token longer than its parts did.
        let mut ids = tokenizer.encode(&notes.join("\n"))?;
        ids.truncate(budget);
        Ok(ids)
    }
}

/// `parts + 1` boundaries splitting `total` into `parts` runs whose lengths
/// differ by at most one: `floor(i * total / parts)`.
fn even_bounds(total: usize, parts: usize) -> Vec<usize> {
    (0..=parts).map(|i| i * total / parts).collect()
}

impl Compressor for Summarize {
    fn name(&self) -> String {
        "summary".into()
    }

    fn needs_surprisal(&self) -> bool {
        false
    }

    fn compress(&self, model: &Model, prefix: &KvCache, span: &SpanTargets, _on_step: &mut dyn FnMut(usize, f32)) -> Result<CompressedSpan> {
        let summary = self.summary_ids(model, span, budget(span.len(), self.ratio)?)?;
        let text = model.tokenizer.decode(&summary)?;
        let mut compressed = if summary.is_empty() {
            CompressedSpan::empty(self.name(), span)
        } else {
            let positions: Vec<f32> = (0..summary.len()).map(|i| span.positions[0] + i as f32).collect();
            let output = model.qwen2.forward(&model.qwen2.embed(&summary)?, &positions, Some(prefix), Logits::None)?;
            CompressedSpan::new(self.name(), span, output.keys, output.values, positions)
        };
        compressed.report.text = Some(text);
        Ok(compressed)
    }
}
