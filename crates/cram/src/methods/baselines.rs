//! The sanity baselines: the span's own KV through the compressed path,
//! and the span dropped.

use crate::cache::KvCache;
use crate::compressor::{CompressedSpan, Compressor};
use crate::model::{Logits, Model};
use crate::span::SpanTargets;
use crate::error::Result;

/// The span's own embeddings through the compressed path (forward over the
/// prefix at the original positions, no optimization): must score as full
/// context, or the path itself is broken.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawSpan;

impl Compressor for RawSpan {
    fn name(&self) -> String {
        "raw".into()
    }

    fn needs_surprisal(&self) -> bool {
        false
    }

    fn compress(&self, model: &Model, prefix: &KvCache, span: &SpanTargets, _on_step: &mut dyn FnMut(usize, f32)) -> Result<CompressedSpan> {
        let output = model.qwen2.forward(&span.embeddings, &span.positions, Some(prefix), Logits::None)?;
        Ok(CompressedSpan::new(self.name(), span, output.keys, output.values, span.positions.clone()))
    }
}

/// Drops the span: no entries, and what follows keeps its original
/// positions (the truncation baseline).
#[derive(Debug, Clone, Copy, Default)]
pub struct Truncate;

impl Compressor for Truncate {
    fn name(&self) -> String {
        "truncated".into()
    }

    fn needs_surprisal(&self) -> bool {
        false
    }

    fn compress(&self, _model: &Model, _prefix: &KvCache, span: &SpanTargets, _on_step: &mut dyn FnMut(usize, f32)) -> Result<CompressedSpan> {
        Ok(CompressedSpan::empty(self.name(), span))
    }
}
