//! The case generator: deterministic, leak-free, facts placed where asked,
//! confusable defaults never scored as recalled; and sweeps that generate.

use cram_eval::generator::facts::{FactKind, ALL_KINDS};
use cram_eval::generator::{generate, GeneratorSettings, Placement, CHARS_PER_TOKEN};
use cram_eval::render::Rendering;
use cram_eval::sweep::SweepConfig;

fn settings(seed: u64, placement: Placement) -> GeneratorSettings {
    GeneratorSettings { seed, count: 12, span_tokens: 400, facts: 4, placement, distractors: true, ..Default::default() }
}

#[test]
fn the_same_seed_gives_byte_identical_cases_and_another_seed_others() {
    let text = |seed| {
        generate(&settings(seed, Placement::Mixed)).unwrap().iter().map(|case| serde_json::to_string(&case.json).unwrap()).collect::<Vec<_>>()
    };
    assert_eq!(text(7), text(7));
    assert_ne!(text(7), text(8));
}

#[test]
fn every_generated_case_loads_and_passes_the_leak_check_in_both_renderings() {
    for placement in [Placement::Early, Placement::Spread, Placement::Mixed] {
        for generated in generate(&settings(3, placement)).unwrap() {
            let case = generated.to_case().unwrap();
            assert_eq!(case.questions.len(), 4, "{}", generated.id);
            for rendering in [Rendering::Chatml, Rendering::TurnMarkers] {
                case.check_leaks(rendering, true).unwrap();
                case.check_leaks(rendering, false).unwrap();
            }
        }
    }
}

#[test]
fn the_answer_is_recalled_and_neither_the_default_nor_a_distractor_is() {
    let mut distractors = 0;
    for generated in generate(&GeneratorSettings { count: 40, kinds: ALL_KINDS.to_vec(), ..settings(11, Placement::Mixed) }).unwrap() {
        let case = generated.to_case().unwrap();
        let span = Rendering::Chatml.messages(&case.transcript.messages, &case.split.compress);
        for fact in case.questions.iter().flat_map(|question| &question.facts) {
            let answer = &fact.expect_any[0];
            assert!(span.contains(answer.as_str()), "{}: {answer} is not in the span", generated.id);
            assert!(fact.is_recalled(&format!("It is {answer}.")), "{}: the right answer {answer} is not recalled", generated.id);
            if let Some(default) = &fact.wrong_default {
                assert!(!fact.is_recalled(&format!("It is {default}.")), "{}: the default {default} counts as {answer}", generated.id);
            }
            for rejected in &fact.reject_any {
                assert!(!fact.is_recalled(&format!("It is {rejected}.")));
                distractors += usize::from(span.contains(rejected.as_str()));
            }
        }
    }
    assert!(distractors > 0, "no near-miss distractor was planted in 40 cases");
}

/// Libraries by the job a dependency question names and their language
/// (this test's own list, not the generator's).
const SAME_JOB: [(&str, &str, &[&str]); 24] = [
    ("tests", "js", &["jest", "vitest", "mocha", "ava", "jasmine"]),
    ("tests", "py", &["pytest", "nose"]),
    ("tests", "go", &["testify", "ginkgo"]),
    ("serve HTTP", "js", &["express", "fastify", "koa", "hapi"]),
    ("serve HTTP", "py", &["fastapi", "flask", "django", "uvicorn"]),
    ("serve HTTP", "rust", &["axum", "actix-web"]),
    ("serve HTTP", "go", &["gin", "echo"]),
    ("dates", "js", &["moment", "dayjs", "date-fns", "luxon"]),
    ("dates", "py", &["arrow", "pendulum"]),
    ("dates", "rust", &["chrono"]),
    ("SQL", "js", &["knex", "kysely", "sequelize", "prisma", "typeorm"]),
    ("SQL", "py", &["sqlalchemy"]),
    ("validate", "js", &["joi", "zod", "yup", "ajv"]),
    ("validate", "py", &["pydantic", "pydantic-settings", "marshmallow"]),
    ("logs", "js", &["winston", "pino", "bunyan"]),
    ("logs", "py", &["loguru", "structlog"]),
    ("logs", "go", &["zerolog", "logrus", "zap"]),
    ("HTTP requests", "js", &["axios", "undici", "got", "node-fetch"]),
    ("HTTP requests", "py", &["requests", "httpx", "aiohttp"]),
    ("hash passwords", "js", &["bcrypt", "bcryptjs", "argon2"]),
    ("JSON", "py", &["orjson", "ujson", "simplejson"]),
    ("data frames", "py", &["pandas", "polars"]),
    ("TLS", "rust", &["rustls", "openssl", "native-tls"]),
    ("database", "rust", &["sqlx", "diesel"]),
];

/// The language a question names, if any.
fn language(question: &str) -> Option<&'static str> {
    [("Node.js", "js"), ("JavaScript", "js"), ("Python", "py"), ("Rust", "rust"), (" Go", "go")]
        .into_iter()
        .find_map(|(word, language)| question.contains(word).then_some(language))
}

/// Whether a manifest in `span` lists `library` (package.json, pyproject,
/// Cargo.toml or go.mod entry).
fn lists(span: &str, library: &str) -> bool {
    [format!("\"{library}\""), format!("\"{library}>="), format!("\"{library}=="), format!("\n{library} = "), format!("/{library} v")].iter().any(|entry| span.contains(entry.as_str()))
}

/// A dependency question has one answer in its span: no other library
/// there does the job it asks about, in the language it names (in any
/// language, where it names none). Long spans hold several manifests.
#[test]
fn no_other_library_in_the_span_answers_a_dependency_question() {
    let mut checked = 0;
    for seed in 0..4 {
        // Libraries (and the versions that name one) only, so that each span holds many.
        let kinds = vec![FactKind::Dependency, FactKind::Version];
        let asked = GeneratorSettings { seed, count: 25, span_tokens: 1000, facts: 8, kinds, ..settings(seed, Placement::Spread) };
        for generated in generate(&asked).unwrap() {
            let case = generated.to_case().unwrap();
            let span = Rendering::Chatml.messages(&case.transcript.messages, &case.split.compress);
            for (question, fact) in case.questions.iter().flat_map(|question| question.facts.iter().map(move |fact| (question, fact))) {
                if fact.kind.as_deref() != Some("dependency") {
                    continue;
                }
                let answer = fact.expect_any[0].as_str();
                let asked_language = language(&question.question);
                for (job, _, libraries) in SAME_JOB.iter().filter(|(job, lang, _)| question.question.contains(job) && asked_language.is_none_or(|l| l == *lang)) {
                    for library in libraries.iter().filter(|library| **library != answer) {
                        assert!(!lists(&span, library), "{}: `{}` ({job}) has {library} beside {answer} in its span", generated.id, question.question);
                    }
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 300, "only {checked} dependency questions checked");
}

/// The answer's offset in the rendered span (characters), independently of
/// the placement the generator records, falls in the third asked for. A
/// third of a 250-token span holds one fact's document; longer spans more.
#[test]
fn facts_sit_in_the_third_of_the_span_they_were_placed_in() {
    for (placement, third) in [(Placement::Early, 0), (Placement::Middle, 1), (Placement::Late, 2)] {
        for (span_tokens, facts) in [(250, 1), (1000, 2), (4000, 4)] {
            let asked = GeneratorSettings { span_tokens, facts, distractors: span_tokens > 250, ..settings(5, placement) };
            for generated in generate(&asked).unwrap() {
                let case = generated.to_case().unwrap();
                let span = Rendering::Chatml.messages(&case.transcript.messages, &case.split.compress);
                for fact in case.questions.iter().flat_map(|question| &question.facts) {
                    let offset = span.find(fact.expect_any[0].as_str()).unwrap() as f64 / span.len() as f64;
                    assert_eq!((offset * 3.0) as usize, third, "{} {}: offset {offset:.2}", generated.id, fact.id);
                    let recorded = ["early", "middle", "late"][third];
                    assert_eq!(fact.placement.as_deref(), Some(recorded));
                }
            }
        }
    }
}

/// Lengths as asked, where the facts leave room: each fact has a tool call
/// and output of its own, about 110 tokens, so a 250-token span holds two.
#[test]
fn spans_have_about_the_length_asked() {
    for (span_tokens, facts) in [(250, 2), (1000, 3), (4000, 6)] {
        for generated in generate(&GeneratorSettings { span_tokens, facts, distractors: false, ..settings(9, Placement::Spread) }).unwrap() {
            let case = generated.to_case().unwrap();
            let chars = Rendering::Chatml.messages(&case.transcript.messages, &case.split.compress).len() as f64;
            let expected = span_tokens as f64 * CHARS_PER_TOKEN;
            assert!((0.75..1.35).contains(&(chars / expected)), "{}: {chars} characters for {span_tokens} tokens", generated.id);
        }
    }
}

#[test]
fn a_sweep_config_generates_its_cases_and_writes_them_beside_its_results() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("gen.toml");
    let text = r#"
        model = "qwen2.5-coder-0.5b-instruct"
        methods = ["snapkv"]
        ratios = [2.0]
        [[cases]]
        generate = { seed = 4, count = 3, span_tokens = 300, facts = 2, placement = "late" }
    "#;
    std::fs::write(&config_path, text).unwrap();
    let config = SweepConfig::load(&config_path).unwrap();
    let cases = config.load_cases(&config_path).unwrap();
    assert_eq!(cases.len(), 3);
    let expected = generate(&GeneratorSettings { seed: 4, count: 3, span_tokens: 300, facts: 2, placement: Placement::Late, ..Default::default() }).unwrap();
    assert_eq!(cases.iter().map(|c| c.id.clone()).collect::<Vec<_>>(), expected.iter().map(|c| c.id.clone()).collect::<Vec<_>>());
    config.write_cases(&config_path, &dir.path().join("cases")).unwrap();
    let written = cram_eval::cases::load_case_file(&dir.path().join("cases").join(format!("{}.json", expected[0].id))).unwrap();
    assert_eq!(written[0].questions, cases[0].questions);

    // A case file the config names is copied beside the generated ones, byte for byte.
    let other = generate(&GeneratorSettings { seed: 5, count: 1, ..Default::default() }).unwrap();
    let files = cram_eval::generator::write_cases(&other, &dir.path().join("source")).unwrap();
    let named = format!("{text}\n[[cases]]\nfile = \"source/{}\"\n", files[0].file_name().unwrap().to_string_lossy());
    std::fs::write(&config_path, &named).unwrap();
    let config = SweepConfig::load(&config_path).unwrap();
    let out = dir.path().join("run-cases");
    config.write_cases(&config_path, &out).unwrap();
    assert_eq!(std::fs::read(out.join(files[0].file_name().unwrap())).unwrap(), std::fs::read(&files[0]).unwrap());
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 4, "three generated cases and the file");

    // A misspelt setting is an error, not a default.
    std::fs::write(&config_path, text.replace("facts = 2", "fact = 2")).unwrap();
    assert!(SweepConfig::load(&config_path).is_err());
}
