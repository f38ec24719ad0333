//! The tool outputs a generated span is made of: the files and command
//! outputs coding agents really read, each built from entries (a manifest's
//! dependency lines, a log's lines, a schema's tables), so a planted fact is
//! one entry among filler entries of the same kind.

use super::rng::Rng;

/// A kind of tool output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocKind {
    PackageJson,
    Pyproject,
    CargoToml,
    GoMod,
    Compose,
    EnvFile,
    SqlSchema,
    AppLog,
    TestOutput,
    StackTrace,
    GitLog,
    CliHelp,
    PythonSource,
}

/// Every kind, for filler documents.
pub const ALL_DOCS: [DocKind; 13] = [
    DocKind::PackageJson,
    DocKind::Pyproject,
    DocKind::CargoToml,
    DocKind::GoMod,
    DocKind::Compose,
    DocKind::EnvFile,
    DocKind::SqlSchema,
    DocKind::AppLog,
    DocKind::TestOutput,
    DocKind::StackTrace,
    DocKind::GitLog,
    DocKind::CliHelp,
    DocKind::PythonSource,
];

/// A document: how the agent got it, and its entries.
#[derive(Debug, Clone)]
pub struct Document {
    pub kind: DocKind,
    /// The tool call's name and its arguments (a path or a command).
    pub tool: &'static str,
    pub argument: String,
    /// Entries planted so far, each with its relative place (0 to 1) among
    /// the filler that [`super::fill`] adds around them.
    pub planted: Vec<(f64, String)>,
    /// The finished document's entries, filler and planted, in order.
    pub entries: Vec<String>,
}

impl Document {
    /// An empty document of `kind`, named at random.
    pub fn new(kind: DocKind, rng: &mut Rng) -> Self {
        let (tool, argument) = match kind {
            DocKind::PackageJson => ("read_file", format!("{}package.json", rng.choose(&["", "api/", "web/", "services/worker/"]))),
            DocKind::Pyproject => ("read_file", format!("{}pyproject.toml", rng.choose(&["", "backend/", "tools/"]))),
            DocKind::CargoToml => ("read_file", format!("{}Cargo.toml", rng.choose(&["", "crates/core/", "crates/server/"]))),
            DocKind::GoMod => ("read_file", "go.mod".to_string()),
            DocKind::Compose => ("read_file", rng.choose(&["docker-compose.yml", "compose.yaml", "deploy/compose.dev.yml"]).to_string()),
            DocKind::EnvFile => ("read_file", rng.choose(&[".env", ".env.development", "config/.env.local"]).to_string()),
            DocKind::SqlSchema => ("read_file", rng.choose(&["db/schema.sql", "migrations/0007_init.sql", "sql/tables.sql"]).to_string()),
            DocKind::AppLog => ("run_command", rng.choose(&["tail -n 40 logs/app.log", "docker compose logs --tail 40 api", "journalctl -u api -n 40"]).to_string()),
            DocKind::TestOutput => ("run_command", rng.choose(&["npm test", "pytest -q", "go test ./...", "cargo test"]).to_string()),
            DocKind::StackTrace => ("run_command", rng.choose(&["python -m app.jobs.nightly", "python manage.py sync_ledger", "python -m worker.main"]).to_string()),
            DocKind::GitLog => ("run_command", "git log --oneline -n 20".to_string()),
            DocKind::CliHelp => ("run_command", rng.choose(&["./bin/ctl --help", "make help", "invctl serve --help"]).to_string()),
            DocKind::PythonSource => ("read_file", format!("app/{}.py", rng.choose(&["settings", "jobs/cleanup", "api/routes", "services/billing"]))),
        };
        Self { kind, tool, argument, planted: Vec::new(), entries: Vec::new() }
    }

    /// Characters of its call and its output as the chat template renders
    /// them (the template's markers and the tool-response wrapper included).
    pub fn size(&self) -> usize {
        const TEMPLATE_CHARS: usize = 95;
        self.call().len() + self.render().len() + TEMPLATE_CHARS
    }

    /// The tool call as the assistant writes it.
    pub fn call(&self) -> String {
        let key = if self.tool == "read_file" { "path" } else { "command" };
        let arguments = serde_json::json!({ key: self.argument });
        format!("<tool_call>{}</tool_call>", serde_json::json!({ "name": self.tool, "arguments": arguments }))
    }

    /// The tool's output: the entries inside the document's frame.
    pub fn render(&self) -> String {
        let body = |separator: &str| self.entries.join(separator);
        match self.kind {
            DocKind::PackageJson => format!(
                "{{\n  \"name\": \"app\",\n  \"private\": true,\n  \"type\": \"module\",\n  \"dependencies\": {{\n{}\n  }}\n}}",
                body(",\n")
            ),
            DocKind::Pyproject => format!("[project]\nname = \"app\"\nrequires-python = \">=3.11\"\ndependencies = [\n{}\n]", body(",\n")),
            DocKind::CargoToml => format!("[package]\nname = \"app\"\nedition = \"2021\"\n\n[dependencies]\n{}", body("\n")),
            DocKind::GoMod => format!("module example.com/app\n\ngo 1.22\n\nrequire (\n{}\n)", body("\n")),
            DocKind::Compose => format!("services:\n  api:\n    build: .\n    environment:\n{}", body("\n")),
            DocKind::StackTrace => format!("Traceback (most recent call last):\n{}", body("\n")),
            DocKind::TestOutput => format!("{}\n", body("\n")),
            DocKind::CliHelp => format!("Usage: ctl [OPTIONS] COMMAND\n\nOptions:\n{}", body("\n")),
            _ => body("\n"),
        }
    }
}

/// Filler entries of `kind`: plausible lines of the same kind that state
/// nothing a question asks. No filler library does a job a dependency
/// question asks about (serving HTTP, tests, dates, SQL, validation...):
/// a 1,000-token span holds several manifests, and `fastapi` in a
/// pyproject answered "which library serves HTTP?" as well as the planted
/// `fastify` (experiments/benchmark/README.md, facts8-1000).
pub fn filler_entry(kind: DocKind, rng: &mut Rng) -> String {
    match kind {
        DocKind::PackageJson => {
            let name = rng.choose(&["cors", "dotenv", "helmet", "uuid", "lodash", "compression", "cookie-parser", "nanoid", "ms", "chalk", "yargs", "semver"]);
            format!("    \"{name}\": \"^{}\"", version(rng))
        }
        DocKind::Pyproject => {
            let name = rng.choose(&["attrs", "packaging", "alembic", "platformdirs", "typing-extensions", "tenacity", "click", "rich", "jinja2", "python-dotenv"]);
            format!("  \"{name}>={}\"", version(rng))
        }
        DocKind::CargoToml => {
            let name = rng.choose(&["serde", "serde_json", "tokio", "clap", "thiserror", "regex", "once_cell", "itertools", "uuid", "bytes"]);
            format!("{name} = \"{}\"", version(rng))
        }
        DocKind::GoMod => {
            let name = rng.choose(&["github.com/google/uuid", "github.com/spf13/cobra", "golang.org/x/sync", "github.com/pkg/errors", "gopkg.in/yaml.v3"]);
            format!("\t{name} v{}", version(rng))
        }
        DocKind::Compose => {
            let (key, value) = rng.choose(&[("TZ", "UTC"), ("LOG_FORMAT", "json"), ("NODE_ENV", "development"), ("FEATURE_FLAGS", "search,export"), ("WORKERS", "2")]);
            format!("      - {key}={value}")
        }
        DocKind::EnvFile => {
            let (key, value) = rng.choose(&[("LOG_LEVEL", "info"), ("APP_ENV", "development"), ("SENTRY_ENVIRONMENT", "dev"), ("CORS_ORIGINS", "http://localhost:5173"), ("TZ", "UTC"), ("ENABLE_METRICS", "true")]);
            format!("{key}={value}")
        }
        DocKind::SqlSchema => {
            let table = rng.choose(&["users", "sessions", "api_keys", "tags", "settings", "webhooks"]);
            format!("CREATE TABLE {table} (\n  id BIGSERIAL PRIMARY KEY,\n  created_at TIMESTAMPTZ NOT NULL DEFAULT now()\n);")
        }
        DocKind::AppLog => {
            let message = rng.choose(&[
                "GET /healthz 200 2ms",
                "cache warmed (412 keys)",
                "POST /api/items 201 14ms",
                "scheduler tick: 0 jobs due",
                "GET /api/items?page=2 200 9ms",
                "connection pool ready",
                "request finished in 31ms",
            ]);
            format!("{} {} {message}", timestamp(rng), rng.choose(&["INFO", "INFO", "DEBUG", "WARN"]))
        }
        DocKind::TestOutput => {
            let name = rng.choose(&["creates an item", "rejects a bad payload", "lists items by page", "updates the stock", "returns 404 for a missing item", "paginates results"]);
            format!("  ✓ {name} ({} ms)", rng.below(90) + 3)
        }
        DocKind::StackTrace => {
            let (file, function) = rng.choose(&[("app/jobs/runner.py", "run"), ("app/db/session.py", "execute"), ("app/core/retry.py", "wrapper"), ("lib/python3.12/asyncio/runners.py", "run")]);
            format!("  File \"{file}\", line {}, in {function}", rng.below(300) + 10)
        }
        DocKind::GitLog => {
            let message = rng.choose(&["Update README", "Bump dependencies", "Fix typo in docs", "Add pagination tests", "Refactor settings loading", "Tidy imports"]);
            format!("{} {message}", hex(rng, 7))
        }
        DocKind::CliHelp => {
            let (flag, help) = rng.choose(&[
                ("--verbose", "Print more output"),
                ("--config PATH", "Read settings from PATH"),
                ("--dry-run", "Show what would change"),
                ("--json", "Print machine-readable output"),
                ("--workers N", "Run N workers"),
                ("--log-level LEVEL", "One of error, warn, info, debug"),
                ("--no-color", "Disable colored output"),
                ("--since DATE", "Only consider records after DATE"),
            ]);
            format!("  {flag:<24} {help}")
        }
        DocKind::PythonSource => {
            let noun = rng.choose(&["items", "orders", "users", "reports", "invoices", "sessions", "exports", "tags"]);
            let verb = rng.choose(&["load", "list", "count", "purge", "refresh", "archive"]);
            format!("def {verb}_{noun}(db, limit={}):\n    return db.query(\"{noun}\").limit(limit).all()\n", 10 * (rng.below(20) + 1))
        }
    }
}

/// A plausible dependency version, `MAJOR.MINOR.PATCH`.
pub fn version(rng: &mut Rng) -> String {
    format!("{}.{}.{}", rng.below(9) + 1, rng.below(30), rng.below(20))
}

/// `n` lowercase hex digits.
pub fn hex(rng: &mut Rng, n: usize) -> String {
    (0..n).map(|_| char::from_digit(rng.below(16) as u32, 16).expect("a hex digit")).collect()
}

fn timestamp(rng: &mut Rng) -> String {
    format!("2026-03-{:02}T{:02}:{:02}:{:02}Z", rng.below(28) + 1, rng.below(24), rng.below(60), rng.below(60))
}
