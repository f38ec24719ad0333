//! The text-level baseline: what agents do today. The same model writes a
//! summary of the span (greedy, fixed prompt), cut to the token budget the
//! ratio allows, and the summary's own KV replaces the span. The summary
//! sits at the span's first positions; what follows keeps its original
//! positions, as for every other method.

use crate::cache::KvCache;
use crate::compressor::{budget, CompressedSpan, Compressor};
use crate::generate;
use crate::model::{Logits, Model};
use crate::span::SpanTargets;
use crate::error::Result;

/// Summarises the span in at most `n / ratio` tokens.
#[derive(Debug, Clone, Copy)]
pub struct Summarize {
    /// Span tokens / summary tokens (at least).
    pub ratio: f64,
}

/// Roughly how many English words fit in a token budget: asking for fewer
/// words than tokens leaves room for names, which take several tokens.
const WORDS_PER_TOKEN: f64 = 0.6;

impl Summarize {
    /// The fixed ChatML prompt asking for a summary of `span_text` in at
    /// most `words` words, keeping exact identifiers.
    pub fn prompt(span_text: &str, words: usize) -> String {
        format!(
            "<|im_start|>system\nYou condense a coding agent's conversation history.<|im_end|>\n\
             <|im_start|>user\nSummarise this part of the conversation in at most {words} words. \
             Keep exact names of libraries, tools, commands, files, ports and versions.\n\n\
             {span_text}<|im_end|>\n<|im_start|>assistant\n"
        )
    }

    /// The summary's token ids: greedy, at most `budget` tokens.
    pub fn summary_ids(&self, model: &Model, span: &SpanTargets, budget: usize) -> Result<Vec<u32>> {
        let tokenizer = &model.tokenizer;
        let words = ((budget as f64 * WORDS_PER_TOKEN).floor() as usize).max(1);
        let prompt = tokenizer.encode(&Self::prompt(&tokenizer.decode(&span.ids)?, words))?;
        generate::greedy(&model.qwen2, &mut KvCache::new(), &prompt, 0.0, budget, &tokenizer.stop_ids())
    }
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
