//! Rendering a transcript into the text the model reads.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::transcript::{Block, Message};

/// How messages become text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rendering {
    /// Qwen2.5's chat template: `<|im_start|>{role}\n{content}<|im_end|>\n`.
    Chatml,
    /// The published experiments' `=== TURN {n} ({role}) ===` markers.
    TurnMarkers,
}

impl Rendering {
    /// The text of message `index` (0-based over the whole log).
    pub fn message(self, index: usize, message: &Message) -> String {
        match self {
            Rendering::Chatml => chatml_message(message),
            Rendering::TurnMarkers => {
                let content: Vec<String> = message.blocks.iter().map(turn_markers_block).collect();
                format!("=== TURN {} ({}) ===\n{}\n", index + 1, message.role, content.join("\n"))
            }
        }
    }

    /// The text of the given messages, in order.
    pub fn messages(self, all: &[Message], indices: &[usize]) -> String {
        indices.iter().map(|&i| self.message(i, &all[i])).collect()
    }

    /// The question and the opening of the answer.
    pub fn question(self, question: &str) -> String {
        match self {
            Rendering::Chatml => format!("<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"),
            Rendering::TurnMarkers => format!("\n\nQuestion: {question}\nAnswer:"),
        }
    }
}

fn chatml_message(message: &Message) -> String {
    let role = if message.role == "tool" { "user" } else { message.role.as_str() };
    let mut parts = Vec::new();
    for block in &message.blocks {
        parts.push(match block {
            Block::Text(text) if message.role == "tool" => format!("<tool_response>\n{text}\n</tool_response>"),
            Block::Text(text) => text.clone(),
            Block::ToolUse { name, input } => {
                let call = format!("{{\"name\": {}, \"arguments\": {}}}", python_json(&Value::String(name.clone()), false), python_json(input, false));
                format!("<tool_call>\n{call}\n</tool_call>")
            }
            Block::ToolResult { content, .. } => format!("<tool_response>\n{}\n</tool_response>", result_text(content)),
        });
    }
    format!("<|im_start|>{role}\n{}<|im_end|>\n", parts.join("\n"))
}

/// A tool result's text: a string as is, a list of text blocks joined.
fn result_text(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(items) => items
            .iter()
            .map(|item| item.get("text").and_then(Value::as_str).map_or_else(|| item.to_string(), String::from))
            .collect::<Vec<_>>()
            .join("\n"),
        other => other.to_string(),
    }
}

fn turn_markers_block(block: &Block) -> String {
    match block {
        Block::Text(text) => text.clone(),
        Block::ToolUse { name, input } => format!("[tool_use {name}] {}", python_json(input, true)),
        Block::ToolResult { id, content } => format!("[tool_result {id}] {}", python_json(content, true)),
    }
}

/// JSON as Python's `json.dumps` writes it (`", "` and `": "` separators;
/// with `ascii_only`, non-ASCII escaped as `\uXXXX`), so renderings match the
/// published experiments byte for byte.
pub fn python_json(value: &Value, ascii_only: bool) -> String {
    let mut out = String::new();
    write_python_json(value, ascii_only, &mut out);
    out
}

fn write_python_json(value: &Value, ascii_only: bool, out: &mut String) {
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) => out.push_str(&value.to_string()),
        Value::String(text) => write_python_string(text, ascii_only, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_python_json(item, ascii_only, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_python_string(key, ascii_only, out);
                out.push_str(": ");
                write_python_json(item, ascii_only, out);
            }
            out.push('}');
        }
    }
}

fn write_python_string(text: &str, ascii_only: bool, out: &mut String) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ascii_only && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}
