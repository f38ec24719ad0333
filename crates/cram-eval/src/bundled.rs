//! The published cases and the reproduce configs, built into the binary, so
//! that `cram check` and `cram reproduce` work from any directory (say,
//! after `cargo install --path crates/cram-cli`). A file on disk always
//! wins; the built-in copy answers only for a path that does not exist,
//! under the name it has in the repository (`eval/...`, `configs/...`).

use std::path::{Component, Path};

/// (path in the repository, contents)
const FILES: &[(&str, &str)] = &[
    ("eval/bearing/bearing-questions.json", include_str!("../../../eval/bearing/bearing-questions.json")),
    ("eval/bearing/bearing-transcript.jsonl", include_str!("../../../eval/bearing/bearing-transcript.jsonl")),
    ("eval/fastapi-inventory/fastapi-inventory-questions.json", include_str!("../../../eval/fastapi-inventory/fastapi-inventory-questions.json")),
    ("eval/fastapi-inventory/fastapi-inventory-transcript.jsonl", include_str!("../../../eval/fastapi-inventory/fastapi-inventory-transcript.jsonl")),
    ("eval/go-ledger/go-ledger-questions.json", include_str!("../../../eval/go-ledger/go-ledger-questions.json")),
    ("eval/go-ledger/go-ledger-transcript.jsonl", include_str!("../../../eval/go-ledger/go-ledger-transcript.jsonl")),
    ("configs/reproduce-quick.toml", include_str!("../../../configs/reproduce-quick.toml")),
    ("configs/reproduce-full.toml", include_str!("../../../configs/reproduce-full.toml")),
];

/// The built-in copy of `path` (relative, as in the repository), if any.
fn built_in(path: &Path) -> Option<&'static str> {
    // `./eval/x` and `eval/y/../x` name the same file as `eval/x`.
    let mut parts: Vec<&str> = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => parts.push(part.to_str()?),
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    let name = parts.join("/");
    FILES.iter().find(|(file, _)| *file == name).map(|(_, text)| *text)
}

/// The text of `path`: the file on disk, or the built-in copy of a file
/// that is not there.
pub fn read_to_string(path: &Path) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => built_in(path).map(str::to_string).ok_or(e),
        other => other,
    }
}

/// Whether `path` exists on disk or built in.
pub fn exists(path: &Path) -> bool {
    path.exists() || built_in(path).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The built-in copies are the repository's files, byte for byte.
    #[test]
    fn built_in_copies_are_the_files() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        for (name, text) in FILES {
            assert_eq!(std::fs::read_to_string(root.join(name)).unwrap(), *text, "{name}");
        }
        assert_eq!(built_in(Path::new("./eval/bearing/../bearing/bearing-questions.json")), Some(FILES[0].1));
        assert!(built_in(Path::new("eval/nothing.json")).is_none() && built_in(Path::new("/eval/bearing/bearing-questions.json")).is_none());
    }
}
