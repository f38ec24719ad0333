//! Transcripts: our JSON format and agent logs in Messages-API JSONL form.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::questions::Question;
use crate::{EvalError, Result};

/// One piece of a message's content.
#[derive(Debug, Clone, PartialEq)]
pub enum Block {
    Text(String),
    /// An assistant's tool call: the tool's name and its JSON input.
    ToolUse { name: String, input: Value },
    /// A tool's result as the user turn carries it: the call's id and the
    /// content (a string, or a list of blocks, kept as JSON).
    ToolResult { id: String, content: Value },
}

/// A conversation turn.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    pub blocks: Vec<Block>,
}

/// A conversation, with the questions our JSON format may carry.
#[derive(Debug, Clone)]
pub struct Transcript {
    pub id: String,
    pub messages: Vec<Message>,
    /// Questions of our JSON format (empty for a Messages-API log).
    pub questions: Vec<Question>,
    /// The split our JSON format may give (`prefix`, `compress`, `suffix`).
    pub split: Option<Split>,
}

/// Which messages are kept, compressed and kept after.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Split {
    pub prefix: Vec<usize>,
    pub compress: Vec<usize>,
    #[serde(default)]
    pub suffix: Vec<usize>,
}

impl Transcript {
    /// Reads `.jsonl` as a Messages-API log and anything else as our JSON format.
    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::bundled::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
        Self::from_text(&text, path)
    }

    /// Parses `text` as [`Transcript::load`] parses the file at `path` (whose
    /// name gives a log's id, and errors their place).
    pub fn from_text(text: &str, path: &Path) -> Result<Self> {
        let id = path.file_stem().map_or_else(|| "transcript".into(), |s| s.to_string_lossy().into_owned());
        let is_jsonl = path.extension().is_some_and(|e| e == "jsonl");
        let parsed = if is_jsonl { Self::from_jsonl(&text, id) } else { Self::from_json(&text) };
        parsed.map_err(|reason| EvalError::Transcript { path: path.to_path_buf(), reason })
    }

    fn from_jsonl(text: &str, id: String) -> std::result::Result<Self, String> {
        let messages = text
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(number, line)| {
                let value: Value = serde_json::from_str(line).map_err(|e| format!("line {}: {e}", number + 1))?;
                message_from_value(&value).map_err(|e| format!("line {}: {e}", number + 1))
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Self { id, messages, questions: Vec::new(), split: None })
    }

    fn from_json(text: &str) -> std::result::Result<Self, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            id: String,
            #[serde(default)]
            #[allow(dead_code)]
            description: Option<String>,
            messages: Vec<Value>,
            #[serde(default)]
            questions: Vec<Question>,
            prefix: Option<Vec<usize>>,
            compress: Option<Vec<usize>>,
            suffix: Option<Vec<usize>>,
        }
        let file: File = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let messages = file
            .messages
            .iter()
            .enumerate()
            .map(|(i, v)| message_from_value(v).map_err(|e| format!("message {i}: {e}")))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let split = match (file.prefix, file.compress) {
            (Some(prefix), Some(compress)) => Some(Split { prefix, compress, suffix: file.suffix.unwrap_or_default() }),
            (None, None) => None,
            _ => return Err("`prefix` and `compress` must be given together".into()),
        };
        Ok(Self { id: file.id, messages, questions: file.questions, split })
    }
}

fn message_from_value(value: &Value) -> std::result::Result<Message, String> {
    let role = value.get("role").and_then(Value::as_str).ok_or("no `role`")?.to_string();
    let blocks = match value.get("content").ok_or("no `content`")? {
        Value::String(text) => vec![Block::Text(text.clone())],
        Value::Array(items) => items.iter().map(block_from_value).collect::<std::result::Result<_, _>>()?,
        other => return Err(format!("`content` must be a string or a list of blocks, got {other}")),
    };
    Ok(Message { role, blocks })
}

fn block_from_value(value: &Value) -> std::result::Result<Block, String> {
    let field = |name: &str| value.get(name).ok_or_else(|| format!("block without `{name}`: {value}"));
    match value.get("type").and_then(Value::as_str) {
        Some("text") => Ok(Block::Text(field("text")?.as_str().unwrap_or_default().to_string())),
        Some("tool_use") => Ok(Block::ToolUse {
            name: field("name")?.as_str().unwrap_or_default().to_string(),
            input: field("input")?.clone(),
        }),
        Some("tool_result") => Ok(Block::ToolResult {
            id: field("tool_use_id")?.as_str().unwrap_or_default().to_string(),
            content: value.get("content").cloned().unwrap_or(Value::String(String::new())),
        }),
        other => Err(format!("unknown block type {other:?}")),
    }
}
