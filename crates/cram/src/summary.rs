//! The text-level baseline: what agents do today. The same model writes a
//! summary of the span (greedy, fixed prompt), cut to the token budget the
//! ratio allows, and the summary's own KV replaces the span. The summary
//! sits at the span's first positions; what follows keeps its original
//! positions, as for every other method.

use crate::cache::KvCache;
use crate::compress::{CompressedSpan, CompressionReport, Compressor};
use crate::generate;
use crate::model::{Logits, Qwen2};
use crate::pooling;
use crate::targets::SpanTargets;
use crate::tokenizer::Tokenizer;
use crate::Result;

/// Summarises the span in at most `n / ratio` tokens.
#[derive(Debug, Clone, Copy)]
pub struct Summarize<'a> {
    /// Turns the span into text and the prompt into tokens.
    pub tokenizer: &'a Tokenizer,
    /// Span tokens / summary tokens (at least).
    pub ratio: f64,
}

/// Roughly how many English words fit in a token budget: asking for fewer
/// words than tokens leaves room for names, which take several tokens.
const WORDS_PER_TOKEN: f64 = 0.6;

impl Summarize<'_> {
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
    pub fn summary_ids(&self, model: &Qwen2, span: &SpanTargets, budget: usize) -> Result<Vec<u32>> {
        let words = ((budget as f64 * WORDS_PER_TOKEN).floor() as usize).max(1);
        let prompt = self.tokenizer.encode(&Self::prompt(&self.tokenizer.decode(&span.ids)?, words))?;
        generate::greedy(model, &mut KvCache::new(), &prompt, 0.0, budget, &self.tokenizer.stop_ids())
    }
}

impl Compressor for Summarize<'_> {
    fn name(&self) -> String {
        "summary".into()
    }

    fn compress(
        &self,
        model: &Qwen2,
        prefix: &KvCache,
        span: &SpanTargets,
        _on_step: &mut dyn FnMut(usize, f32),
    ) -> Result<CompressedSpan> {
        let budget = pooling::n_virtual(span.len(), self.ratio)?;
        let summary = self.summary_ids(model, span, budget)?;
        let report = CompressionReport {
            text: Some(self.tokenizer.decode(&summary)?),
            ..CompressionReport::new(self.name(), span.len(), summary.len())
        };
        if summary.is_empty() {
            return Ok(CompressedSpan::empty(report));
        }
        let positions: Vec<f32> = (0..summary.len()).map(|i| span.positions[0] + i as f32).collect();
        let output = model.forward(&model.embed(&summary)?, &positions, Some(prefix), Logits::None)?;
        Ok(CompressedSpan { keys: output.keys, values: output.values, positions, report })
    }
}
