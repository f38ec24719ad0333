//! Planted facts: a value the span states once, in an entry of the kind of
//! document that would hold it, and a question whose no-context answer is
//! wrong by construction (the value is drawn at random, or is the less
//! usual of two libraries that do the same job).

use serde::{Deserialize, Serialize};

use super::documents::{hex, version, DocKind};
use super::rng::Rng;

/// What a planted fact is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FactKind {
    /// A library chosen over its better-known default (bcryptjs over bcrypt).
    Dependency,
    Port,
    EnvVar,
    Path,
    /// A table, queue or function name.
    Identifier,
    Version,
    HexId,
    /// A numeric setting.
    Setting,
}

/// Every kind, the default mix.
pub const ALL_KINDS: [FactKind; 8] =
    [FactKind::Dependency, FactKind::Port, FactKind::EnvVar, FactKind::Path, FactKind::Identifier, FactKind::Version, FactKind::HexId, FactKind::Setting];

impl FactKind {
    pub fn name(self) -> &'static str {
        match self {
            FactKind::Dependency => "dependency",
            FactKind::Port => "port",
            FactKind::EnvVar => "env-var",
            FactKind::Path => "path",
            FactKind::Identifier => "identifier",
            FactKind::Version => "version",
            FactKind::HexId => "hex-id",
            FactKind::Setting => "setting",
        }
    }
}

/// A fact to plant: the question, the answer, and where it goes.
#[derive(Debug, Clone)]
pub struct PlantedFact {
    pub kind: FactKind,
    /// Which template made it: a case never asks two facts of one template.
    pub template: &'static str,
    pub question: String,
    pub answer: String,
    /// Answers that are wrong however the rest reads: the confusable
    /// default, a near-miss distractor (never a part of `answer`).
    pub reject: Vec<String>,
    pub wrong_default: Option<String>,
    /// The document kind that holds the fact, and its entry there.
    pub host: DocKind,
    pub entry: String,
    /// A near miss planted in another document, when distractors are asked for.
    pub distractor: Option<Distractor>,
}

/// A near-miss value (`5434` beside an asked `5433`) in an entry of its own.
#[derive(Debug, Clone)]
pub struct Distractor {
    pub host: DocKind,
    pub entry: String,
    pub value: String,
}

/// Project names the random parts of values are made from.
const PROJECT_WORDS: [&str; 12] = ["kestrel", "harbor", "juniper", "quartz", "tundra", "marlin", "cobalt", "saffron", "pylon", "ember", "lattice", "osprey"];

impl PlantedFact {
    /// A fact of `kind` from one of its templates not in `used`; `None`
    /// when every template of the kind is used.
    pub fn draw(kind: FactKind, used: &[&'static str], distractor: bool, rng: &mut Rng) -> Option<Self> {
        let mut fact = match kind {
            FactKind::Dependency => dependency(used, rng)?,
            FactKind::Port => port(used, rng)?,
            FactKind::EnvVar => env_var(used, rng)?,
            FactKind::Path => path(used, rng)?,
            FactKind::Identifier => identifier(used, rng)?,
            FactKind::Version => pinned_version(used, rng)?,
            FactKind::HexId => commit(used, rng)?,
            FactKind::Setting => setting(used, rng)?,
        };
        if !distractor {
            fact.distractor = None;
        }
        if let Some(near_miss) = &fact.distractor {
            fact.reject.push(near_miss.value.clone());
        }
        // A reject string inside the answer would fail every correct answer.
        let answer = fact.answer.to_lowercase();
        fact.reject.retain(|reject| !answer.contains(&reject.to_lowercase()));
        Some(fact)
    }
}

/// A template of `templates` (by name) not yet used, at random.
fn unused<'t, T>(templates: &'t [(&'static str, T)], used: &[&'static str], rng: &mut Rng) -> Option<&'t (&'static str, T)> {
    let free: Vec<&(&'static str, T)> = templates.iter().filter(|(name, _)| !used.contains(name)).collect();
    (!free.is_empty()).then(|| free[rng.below(free.len())])
}

fn project(rng: &mut Rng) -> &'static str {
    *rng.choose(&PROJECT_WORDS)
}

/// (question's purpose, chosen library, its usual default, reject the default, manifest)
type Library = (&'static str, &'static str, &'static str, bool, DocKind);

fn dependency(used: &[&'static str], rng: &mut Rng) -> Option<PlantedFact> {
    // Every purpose names its language: a long span holds manifests of
    // several, and a question that named none could be answered from
    // another language's manifest (undici asked, httpx beside it).
    // The default is rejected only where no correct answer would contain
    // it: "logging" or "requests" can sit in a right answer's sentence.
    const LIBRARIES: [(&str, Library); 16] = [
        ("npm-hash", ("hash passwords in Node.js", "bcryptjs", "bcrypt", false, DocKind::PackageJson)),
        ("npm-test", ("run its JavaScript tests", "vitest", "Jest", true, DocKind::PackageJson)),
        ("npm-log", ("write its logs in Node.js", "pino", "winston", true, DocKind::PackageJson)),
        ("npm-http", ("serve HTTP in Node.js", "fastify", "Express", true, DocKind::PackageJson)),
        ("npm-validate", ("validate request bodies in Node.js", "zod", "Joi", false, DocKind::PackageJson)),
        ("npm-dates", ("format dates in JavaScript", "dayjs", "Moment", true, DocKind::PackageJson)),
        ("npm-client", ("make outgoing HTTP requests in Node.js", "undici", "axios", true, DocKind::PackageJson)),
        ("npm-sql", ("build SQL queries in Node.js", "kysely", "Knex", true, DocKind::PackageJson)),
        ("py-log", ("write its logs in Python", "loguru", "logging", false, DocKind::Pyproject)),
        ("py-http", ("make HTTP requests in Python", "httpx", "requests", false, DocKind::Pyproject)),
        ("py-json", ("serialise JSON in Python", "orjson", "json", false, DocKind::Pyproject)),
        ("py-frames", ("handle data frames in Python", "polars", "pandas", true, DocKind::Pyproject)),
        ("py-lint", ("lint its Python code", "ruff", "flake8", true, DocKind::Pyproject)),
        ("rust-tls", ("handle TLS in Rust", "rustls", "openssl", true, DocKind::CargoToml)),
        ("rust-db", ("talk to the database from Rust", "sqlx", "diesel", true, DocKind::CargoToml)),
        ("go-log", ("write its logs in Go", "zerolog", "logrus", true, DocKind::GoMod)),
    ];
    let (template, (purpose, chosen, default, reject_default, host)) = *unused(&LIBRARIES, used, rng)?;
    let entry = match host {
        DocKind::PackageJson => format!("    \"{chosen}\": \"^{}\"", version(rng)),
        DocKind::Pyproject => format!("  \"{chosen}>={}\"", version(rng)),
        DocKind::CargoToml => format!("{chosen} = \"{}\"", version(rng)),
        _ => format!("\tgithub.com/rs/{chosen} v{}", version(rng)),
    };
    Some(PlantedFact {
        kind: FactKind::Dependency,
        template,
        question: format!("Which library does the project use to {purpose}?"),
        answer: chosen.to_string(),
        reject: if reject_default { vec![default.to_string()] } else { Vec::new() },
        wrong_default: Some(default.to_string()),
        host,
        entry,
        distractor: None,
    })
}

/// A four-digit number in `low..high`, away from the usual ports.
fn unusual_number(rng: &mut Rng, low: usize, high: usize) -> usize {
    loop {
        let n = low + rng.below(high - low);
        if ![3000, 5000, 5432, 6379, 8000, 8080, 8443, 9000, 9090].contains(&n) && n % 100 != 0 {
            return n;
        }
    }
}

fn port(used: &[&'static str], rng: &mut Rng) -> Option<PlantedFact> {
    const SERVICES: [(&str, (&str, &str, &str)); 5] = [
        ("port-api", ("orders API", "ORDERS_API_PORT", "8080")),
        ("port-admin", ("admin dashboard", "ADMIN_PORT", "3000")),
        ("port-db", ("Postgres database", "PGPORT", "5432")),
        ("port-cache", ("Redis cache", "REDIS_PORT", "6379")),
        ("port-webhooks", ("webhook receiver", "WEBHOOK_PORT", "8000")),
    ];
    let (template, (service, variable, default)) = *unused(&SERVICES, used, rng)?;
    let value = unusual_number(rng, 2001, 9899);
    let (host, entry) = match rng.below(3) {
        0 => (DocKind::EnvFile, format!("{variable}={value}")),
        1 => (DocKind::Compose, format!("      - {variable}={value}")),
        _ => (DocKind::AppLog, format!("2026-03-02T09:14:07Z INFO {service} listening on 0.0.0.0:{value}")),
    };
    let near_miss = (value + 1).to_string();
    Some(PlantedFact {
        kind: FactKind::Port,
        template,
        question: format!("Which port does the {service} listen on?"),
        answer: value.to_string(),
        reject: vec![default.to_string()],
        wrong_default: Some(default.to_string()),
        host,
        entry,
        distractor: Some(Distractor { host: DocKind::EnvFile, entry: format!("METRICS_SIDECAR_PORT={near_miss}"), value: near_miss }),
    })
}

fn env_var(used: &[&'static str], rng: &mut Rng) -> Option<PlantedFact> {
    const PURPOSES: [(&str, (&str, &str, &str, &str)); 5] = [
        ("env-db", ("database connection string", "DB_DSN", "DATABASE_URL", "postgres://app:app@db:5432/app")),
        ("env-cache", ("Redis connection URL", "CACHE_URL", "REDIS_URL", "redis://cache:6379/0")),
        ("env-cookie", ("secret that signs session cookies", "COOKIE_SIGNING_KEY", "SECRET_KEY", "change-me")),
        ("env-payments", ("payment provider's API token", "PAYMENTS_TOKEN", "STRIPE_API_KEY", "sk_test_placeholder")),
        ("env-bucket", ("bucket that stores uploads", "UPLOADS_BUCKET", "S3_BUCKET", "uploads-dev")),
    ];
    let (template, (purpose, suffix, default, value)) = *unused(&PURPOSES, used, rng)?;
    let name = format!("{}_{suffix}", project(rng).to_uppercase());
    Some(PlantedFact {
        kind: FactKind::EnvVar,
        template,
        question: format!("Which environment variable holds the {purpose}?"),
        answer: name.clone(),
        reject: vec![default.to_string()],
        wrong_default: Some(default.to_string()),
        host: DocKind::EnvFile,
        entry: format!("{name}={value}"),
        distractor: Some(Distractor { host: DocKind::Compose, entry: format!("      - LEGACY_{suffix}={value}"), value: format!("LEGACY_{suffix}") }),
    })
}

fn path(used: &[&'static str], rng: &mut Rng) -> Option<PlantedFact> {
    const FILES: [(&str, (&str, &str, &str)); 4] = [
        ("path-settings", ("production settings", "config/deploy/{}.prod.yaml", "config/settings.yaml")),
        ("path-flags", ("feature flag definitions", "config/flags/{}-flags.toml", "config/flags.json")),
        ("path-cert", ("TLS certificate", "certs/{}-fullchain.pem", "certs/server.crt")),
        ("path-seed", ("database seed data", "db/seeds/{}_seed.sql", "db/seeds.sql")),
    ];
    let (template, (purpose, pattern, default)) = *unused(&FILES, used, rng)?;
    let value = pattern.replace("{}", project(rng));
    Some(PlantedFact {
        kind: FactKind::Path,
        template,
        question: format!("Which file holds the {purpose}?"),
        answer: value.clone(),
        reject: Vec::new(),
        wrong_default: Some(default.to_string()),
        host: DocKind::AppLog,
        entry: format!("2026-03-02T09:14:05Z INFO loaded {purpose} from {value}"),
        distractor: None,
    })
}

fn identifier(used: &[&'static str], rng: &mut Rng) -> Option<PlantedFact> {
    const NAMES: [(&str, (&str, &str)); 5] = [
        ("table-moves", ("table", "stock movements")),
        ("table-retries", ("table", "invoices waiting to be retried")),
        ("queue-invoices", ("queue", "invoice mailer")),
        ("queue-exports", ("queue", "CSV export")),
        ("function-reconcile", ("function", "LedgerMismatch error")),
    ];
    let (template, (what, about)) = *unused(&NAMES, used, rng)?;
    let word = project(rng);
    let (question, answer, host, entry) = match what {
        "table" => {
            let name = format!("{word}_{}", if template == "table-moves" { "stock_moves" } else { "invoice_retries" });
            let entry = format!("CREATE TABLE {name} (\n  id BIGSERIAL PRIMARY KEY,\n  payload JSONB NOT NULL,\n  created_at TIMESTAMPTZ NOT NULL DEFAULT now()\n);");
            (format!("Which table stores the {about}?"), name, DocKind::SqlSchema, entry)
        }
        "queue" => {
            let name = format!("{word}.{}.v{}", if template == "queue-invoices" { "invoice-mail" } else { "csv-export" }, rng.below(8) + 2);
            let entry = format!("2026-03-02T09:14:06Z INFO {about} consumer subscribed to queue {name}");
            (format!("Which queue does the {about} consumer subscribe to?"), name, DocKind::AppLog, entry)
        }
        _ => {
            let name = format!("reconcile_{word}_batch");
            let entry = format!("  File \"app/ledger/{word}.py\", line {}, in {name}\nLedgerMismatch: totals differ by 0.02", rng.below(200) + 20);
            (format!("In which function was the {about} raised?"), name, DocKind::StackTrace, entry)
        }
    };
    Some(PlantedFact { kind: FactKind::Identifier, template, question, answer, reject: Vec::new(), wrong_default: None, host, entry, distractor: None })
}

fn pinned_version(used: &[&'static str], rng: &mut Rng) -> Option<PlantedFact> {
    const PACKAGES: [(&str, (&str, DocKind)); 4] = [
        // Not a library a dependency question asks for (express serves HTTP).
        ("version-react", ("react", DocKind::PackageJson)),
        ("version-typescript", ("typescript", DocKind::PackageJson)),
        ("version-django", ("django", DocKind::Pyproject)),
        ("version-celery", ("celery", DocKind::Pyproject)),
    ];
    let (template, (package, host)) = *unused(&PACKAGES, used, rng)?;
    let value = format!("{}.{}.{}", rng.below(6) + 2, rng.below(20) + 10, rng.below(20) + 10);
    let entry = match host {
        DocKind::PackageJson => format!("    \"{package}\": \"{value}\""),
        _ => format!("  \"{package}=={value}\""),
    };
    Some(PlantedFact {
        kind: FactKind::Version,
        template,
        question: format!("Which exact version of {package} does the project pin?"),
        answer: value,
        reject: Vec::new(),
        wrong_default: None,
        host,
        entry,
        distractor: None,
    })
}

fn commit(used: &[&'static str], rng: &mut Rng) -> Option<PlantedFact> {
    const MESSAGES: [(&str, &str); 3] = [
        ("commit-race", "Fix race in the invoice retry worker"),
        ("commit-index", "Add index on orders.created_at"),
        ("commit-endpoint", "Remove the legacy sync endpoint"),
    ];
    let (template, message) = *unused(&MESSAGES, used, rng)?;
    let value = hex(rng, 7);
    // The same hash but its last digit: a near miss a model can confuse.
    let last = value.chars().last().expect("seven digits").to_digit(16).expect("a hex digit");
    let near_miss = format!("{}{}", &value[..6], char::from_digit((last + 1) % 16, 16).expect("a hex digit"));
    Some(PlantedFact {
        kind: FactKind::HexId,
        template,
        question: format!("What is the short hash of the commit \"{message}\"?"),
        answer: value.clone(),
        reject: Vec::new(),
        wrong_default: None,
        host: DocKind::GitLog,
        entry: format!("{value} {message}"),
        distractor: Some(Distractor { host: DocKind::GitLog, entry: format!("{near_miss} Revert \"{message}\""), value: near_miss }),
    })
}

fn setting(used: &[&'static str], rng: &mut Rng) -> Option<PlantedFact> {
    const SETTINGS: [(&str, (&str, &str, usize, usize, &str)); 4] = [
        ("setting-timeout", ("request timeout in milliseconds", "REQUEST_TIMEOUT_MS", 1250, 9750, "30000")),
        ("setting-upload", ("maximum upload size in kilobytes", "MAX_UPLOAD_KB", 2100, 9900, "10240")),
        ("setting-ttl", ("session lifetime in seconds", "SESSION_TTL_SECONDS", 1100, 7100, "3600")),
        ("setting-batch", ("import batch size", "IMPORT_BATCH_SIZE", 1100, 4900, "1000")),
    ];
    let (template, (purpose, variable, low, high, default)) = *unused(&SETTINGS, used, rng)?;
    let value = unusual_number(rng, low, high);
    let near_miss = (value + 10).to_string();
    let (host, entry) = if rng.below(2) == 0 { (DocKind::EnvFile, format!("{variable}={value}")) } else { (DocKind::Compose, format!("      - {variable}={value}")) };
    Some(PlantedFact {
        kind: FactKind::Setting,
        template,
        question: format!("What is the {purpose} set to?"),
        answer: value.to_string(),
        reject: vec![default.to_string()],
        wrong_default: Some(default.to_string()),
        host,
        entry,
        distractor: Some(Distractor { host: DocKind::AppLog, entry: format!("2026-03-02T09:14:08Z WARN upstream retry budget {near_miss}"), value: near_miss }),
    })
}
