//! Stamps the binary with the commit it was built from, so that every results
//! line can say which build's arithmetic produced it: two builds can differ in
//! the last bits of a loss curve, and with them in an answer.

use std::path::Path;
use std::process::Command;

fn main() {
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let build = match git(&["rev-parse", "--show-toplevel"]) {
        Some(top) => {
            watch_tree(Path::new(&top));
            let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "no-commit".into());
            // Only what is compiled counts: notes and results may change freely.
            let changed = git(&["status", "--porcelain", "--", ":/crates", ":/Cargo.toml", ":/Cargo.lock"]).is_some_and(|s| !s.is_empty());
            format!("{version}+{commit}{}", if changed { "-dirty" } else { "" })
        }
        // A copy outside git (a published crate): the version is all there is.
        None => version,
    };
    println!("cargo:rustc-env=CRAM_BUILD={build}");
}

/// Reruns this script when a commit, a checkout, staging or an edit of the
/// compiled sources may have changed what the stamp should say.
fn watch_tree(top: &Path) {
    let mut watched = vec![top.join("crates"), top.join("Cargo.toml"), top.join("Cargo.lock")];
    if let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        let git_dir = Path::new(&git_dir);
        watched.extend(["HEAD", "index", "refs", "packed-refs"].map(|name| git_dir.join(name)));
    }
    // A path that does not exist would make Cargo rerun the script on every build.
    for path in watched.iter().filter(|path| path.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

/// The trimmed output of a git command, if it succeeded (Cargo runs build
/// scripts in their package's directory).
fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
}
