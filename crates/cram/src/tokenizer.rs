//! The Qwen2 tokenizer, from a GGUF's vocabulary and merges or a `tokenizer.json`.

use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;

use crate::error::{Error, Result};

/// Qwen's chat-turn end marker.
pub const IM_END: &str = "<|im_end|>";
/// Qwen's end-of-text marker.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// Encodes text (special tokens such as `<|im_start|>` included) and decodes ids.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// From the vocabulary and merges stored in a GGUF's metadata.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_gguf(content).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(Self { inner })
    }

    /// From an HF `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::MissingFile(path.to_path_buf()));
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self { inner })
    }

    /// Wraps an already built tokenizer.
    pub fn from_inner(inner: tokenizers::Tokenizer) -> Self {
        Self { inner }
    }

    /// Token ids of `text`, with no BOS/EOS added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens dropped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The id of a token, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The ids that end a chat answer: `<|im_end|>` and `<|endoftext|>`.
    pub fn stop_ids(&self) -> Vec<u32> {
        [IM_END, END_OF_TEXT].iter().filter_map(|t| self.token_id(t)).collect()
    }
}
