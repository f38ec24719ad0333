//! Attention matching and KVzip on a small random model: logit biases
//! through the forward, the session and the cache file, each checked
//! against what the test computes itself.

mod common;

use candle_core::{DType, Tensor};
use common::{cpu, max_abs_diff, positions};
use cram::matching::queries::attention_over_span;
use cram::matching::{compacted, head_matrix, HeadChoice};
use cram::{synthetic, Anchors, AttentionMatching, Compressor, KvCache, KvZip, Logits, MatchedKeys, MatchingSettings, Model, Session, SpanTargets};

const SYSTEM: &str = "t5 t9 t14 t2";
const TURN: &str = "t30 t31 t8 t8 t44 t17 t63 t1 t12 t40 t41 t7 t22 t23 t50 t3 t36 t36 t11 t60";
const QUESTION: &str = "t6 t7 t61 t33";

fn model(seed: u64) -> Model {
    synthetic::full_model(&synthetic::tiny_config(), seed, &cpu()).unwrap()
}

/// The span of TURN after the system prompt (4 tokens).
fn span_after_system(model: &Model) -> (KvCache, SpanTargets) {
    let session = Session::new(model, SYSTEM).unwrap();
    let span_ids = model.tokenizer.encode(TURN).unwrap();
    let span = SpanTargets::compute(&model.qwen2, session.cache(), &span_ids, &positions(4, span_ids.len())).unwrap();
    (session.cache().clone(), span)
}

/// The plain fit: `n / ratio` entries in every head (the default spreads
/// the same total unevenly).
fn uniform() -> MatchingSettings {
    MatchingSettings { budgets: cram::matching::budgets::Budgets::Uniform, ..MatchingSettings::default() }
}

/// The question's forward (K, V and logits) after `cache`.
fn question_after(model: &Model, cache: &KvCache) -> cram::ForwardOutput {
    let ids = model.tokenizer.encode(QUESTION).unwrap();
    let at = positions(cache.next_position() as usize, ids.len());
    model.qwen2.forward(&model.qwen2.embed(&ids).unwrap(), &at, Some(cache), Logits::All).unwrap()
}

/// Zero biases are no biases: the same numbers, bit for bit.
#[test]
fn zero_biases_change_nothing() {
    let model = model(71);
    let (prefix, span) = span_after_system(&model);
    let mut plain = prefix.clone();
    plain.append(&span.keys, &span.values, &span.positions).unwrap();
    let zeros: Vec<Tensor> = span.keys.iter().map(|k| Tensor::zeros(&k.dims()[..3], DType::F32, &cpu()).unwrap()).collect();
    let mut biased = prefix.clone();
    biased.append_biased(&span.keys, &span.values, Some(&zeros), &span.positions).unwrap();
    assert!(biased.biases().is_some() && plain.biases().is_none());
    let (a, b) = (question_after(&model, &plain), question_after(&model, &biased));
    assert_eq!(a.logits.unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.logits.unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
    for (x, y) in a.values.iter().zip(&b.values) {
        assert!(max_abs_diff(x, y) == 0.0);
    }
}

/// A bias on one entry of one KV head reweights that entry for every query
/// head of the group, and for no other head: p' = p e^b / sum(p e^b),
/// computed here from the unbiased probabilities.
#[test]
fn a_bias_is_shared_by_the_query_heads_of_its_kv_head() {
    let model = model(73);
    let (prefix, span) = span_after_system(&model);
    let mut plain = prefix.clone();
    plain.append(&span.keys, &span.values, &span.positions).unwrap();
    let n_cached = plain.len();
    let (entry, bias) = (6, 1.7f32);
    let mut biased = KvCache::new();
    let layers = plain.keys().len();
    let biases: Vec<Tensor> = (0..layers)
        .map(|_| {
            let mut b = vec![0.0f32; 2 * n_cached];
            b[entry] = bias; // KV head 0 only
            Tensor::from_vec(b, (1, 2, n_cached), &cpu()).unwrap()
        })
        .collect();
    biased.append_biased(plain.keys(), plain.values(), Some(&biases), plain.positions()).unwrap();
    let ids = model.tokenizer.encode(QUESTION).unwrap();
    let at = positions(n_cached, ids.len());
    let embeddings = model.qwen2.embed(&ids).unwrap();
    let before = model.qwen2.attention_probabilities(&embeddings, &at, Some(&plain)).unwrap();
    let after = model.qwen2.attention_probabilities(&embeddings, &at, Some(&biased)).unwrap();
    let groups = model.qwen2.config().num_attention_heads / model.qwen2.config().num_key_value_heads;
    // Layer 0 sees the same hidden states either way: compare there.
    let (p, q) = (before[0].squeeze(0).unwrap().to_vec3::<f32>().unwrap(), after[0].squeeze(0).unwrap().to_vec3::<f32>().unwrap());
    for head in 0..p.len() {
        for (row_p, row_q) in p[head].iter().zip(&q[head]) {
            let weight = |j: usize| if head / groups == 0 && j == entry { bias.exp() } else { 1.0 };
            let total: f32 = row_p.iter().enumerate().map(|(j, x)| x * weight(j)).sum();
            for (j, (x, y)) in row_p.iter().zip(row_q).enumerate() {
                assert!((x * weight(j) / total - y).abs() < 1e-6, "head {head} entry {j}: {} vs {y}", x * weight(j) / total);
            }
        }
    }
}

/// Keeping every entry with the fit reproduces the span: the question after
/// it computes what it computes after the span itself (the fitted values
/// and biases of a full selection are the span's own, to rounding).
#[test]
fn keeping_every_entry_reproduces_the_span() {
    let model = model(79);
    let (prefix, span) = span_after_system(&model);
    let method = AttentionMatching { settings: MatchingSettings { ridge: 0.0, ..MatchingSettings::default() }, ratio: 2.0 };
    let (choices, error) = method.choices(&model, &prefix, &span, span.len()).unwrap();
    assert!(error < 1e-4, "output error {error}");
    let full = compacted("attention-matching".into(), &span, &choices).unwrap();
    let (mut compacted_cache, mut original) = (prefix.clone(), prefix.clone());
    full.append_to(&mut compacted_cache).unwrap();
    original.append(&span.keys, &span.values, &span.positions).unwrap();
    let (a, b) = (question_after(&model, &compacted_cache), question_after(&model, &original));
    for (x, y) in a.values.iter().zip(&b.values) {
        assert!(max_abs_diff(x, y) < 1e-4, "{}", max_abs_diff(x, y));
    }
    let (la, lb) = (a.logits.unwrap(), b.logits.unwrap());
    assert!(max_abs_diff(&la, &lb) < 1e-3);
    assert_eq!(la.argmax(2).unwrap().to_vec2::<u32>().unwrap(), lb.argmax(2).unwrap().to_vec2::<u32>().unwrap(), "the same next tokens");
}

/// At a real ratio: n / ratio entries per head, the span's own keys (with
/// their RoPE), finite biases in bounds, and the prefix untouched.
#[test]
fn attention_matching_keeps_the_budget_with_the_spans_keys() {
    let model = model(83);
    let (prefix, span) = span_after_system(&model);
    let compressed = AttentionMatching { settings: uniform(), ratio: 4.0 }.compress(&model, &prefix, &span, &mut |_, _| {}).unwrap();
    assert_eq!(compressed.len(), 5);
    assert!(compressed.report.fit_error.is_some_and(|e| e.is_finite()));
    let biases = compressed.biases.as_ref().unwrap();
    for (layer, keys) in compressed.keys.iter().enumerate() {
        let bias: Vec<f32> = biases[layer].flatten_all().unwrap().to_vec1().unwrap();
        assert!(bias.iter().all(|b| (-3.0..=3.0).contains(b)), "{bias:?}");
        for head in 0..keys.dim(1).unwrap() {
            let span_keys = head_matrix(&span.keys[layer], head).unwrap();
            let kept = head_matrix(keys, head).unwrap();
            for row in kept.row_iter() {
                assert!(span_keys.row_iter().any(|original| (original - row).norm() == 0.0), "a kept key is a span key");
            }
        }
    }
    let mut cache = prefix.clone();
    compressed.append_to(&mut cache).unwrap();
    assert_eq!(cache.len(), prefix.len() + 5);
    assert_eq!(cache.next_position(), span.next_position());
    assert!(max_abs_diff(&cache.keys()[1].narrow(2, 0, prefix.len()).unwrap(), &prefix.keys()[1]) == 0.0);
    let prefix_biases: Vec<f32> = cache.biases().unwrap()[0].narrow(2, 0, prefix.len()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert!(prefix_biases.iter().all(|&b| b == 0.0), "the prefix keeps bias 0");
}

/// KVzip keeps n / ratio entries per head, each the one the repeat queries
/// attend to most, with their own values and no bias; the prefix stays.
#[test]
fn kvzip_keeps_the_budget_per_head_and_never_the_prefix() {
    let model = model(89);
    let (prefix, span) = span_after_system(&model);
    for ratio in [2.0, 3.2, 6.4] {
        let compressed = KvZip { settings: Default::default(), ratio }.compress(&model, &prefix, &span, &mut |_, _| {}).unwrap();
        let t = cram::budget(span.len(), ratio).unwrap();
        assert_eq!(compressed.len(), t);
        assert!(compressed.biases.is_none());
        for (layer, (keys, values)) in compressed.keys.iter().zip(&compressed.values).enumerate() {
            assert_eq!(keys.dim(2).unwrap(), t);
            for head in 0..keys.dim(1).unwrap() {
                let (span_keys, span_values) = (head_matrix(&span.keys[layer], head).unwrap(), head_matrix(&span.values[layer], head).unwrap());
                let (kept_keys, kept_values) = (head_matrix(keys, head).unwrap(), head_matrix(values, head).unwrap());
                for (key, value) in kept_keys.row_iter().zip(kept_values.row_iter()) {
                    let at = span_keys.row_iter().position(|original| (original - key).norm() == 0.0).expect("a span key");
                    assert!((span_values.row(at) - value).norm() == 0.0, "with its own value");
                }
            }
        }
        let mut cache = prefix.clone();
        compressed.append_to(&mut cache).unwrap();
        assert!(max_abs_diff(&cache.values()[0].narrow(2, 0, prefix.len()).unwrap(), &prefix.values()[0]) == 0.0);
    }
}

/// A session with a compacted turn, saved and loaded, answers the same bit
/// for bit, biases included; a file without biases loads with none.
#[test]
fn a_saved_session_keeps_its_biases() {
    let model = model(97);
    let mut session = Session::new(&model, SYSTEM).unwrap();
    session.push_compressed(TURN, &AttentionMatching { settings: MatchingSettings::default(), ratio: 3.0 }, &mut |_, _| {}).unwrap();
    session.push_verbatim("t4 t5").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("session.safetensors");
    session.save(&path).unwrap();
    let loaded = Session::load(&model, &path).unwrap();
    let (saved, restored) = (session.cache().biases().unwrap(), loaded.cache().biases().unwrap());
    for (a, b) in saved.iter().zip(restored) {
        assert!(max_abs_diff(a, b) == 0.0);
    }
    assert_eq!(session.ask(QUESTION, 6).unwrap(), loaded.ask(QUESTION, 6).unwrap());
    let biased_logits = question_after(&model, session.cache()).logits.unwrap();
    let restored_logits = question_after(&model, loaded.cache()).logits.unwrap();
    assert!(max_abs_diff(&biased_logits, &restored_logits) == 0.0);

    let plain = Session::new(&model, SYSTEM).unwrap();
    plain.save(&path).unwrap();
    assert!(Session::load(&model, &path).unwrap().cache().biases().is_none());
}

/// The per-head selection is what each head chose: a head's kept keys are
/// the span keys at its indices.
#[test]
fn compacted_entries_follow_each_heads_choice() {
    let model = model(101);
    let (_, span) = span_after_system(&model);
    let choices: Vec<Vec<HeadChoice>> = (0..span.keys.len())
        .map(|layer| (0..2).map(|head| HeadChoice { kept: vec![layer + head, 10 + head], values: None, biases: None }).collect())
        .collect();
    let entries = compacted("test".into(), &span, &choices).unwrap();
    for (layer, keys) in entries.keys.iter().enumerate() {
        for head in 0..2 {
            let expected = span.keys[layer].narrow(1, head, 1).unwrap().index_select(&Tensor::new(&[(layer + head) as u32, (10 + head) as u32], &cpu()).unwrap(), 2).unwrap();
            assert!(max_abs_diff(&keys.narrow(1, head, 1).unwrap(), &expected) == 0.0);
        }
    }
}

/// The recipe with fitted values keeps the recipe's keys and positions bit
/// for bit (the same optimisation) and replaces its values and biases.
#[test]
fn the_fitted_recipe_keeps_the_recipes_keys_and_refits_the_values() {
    let model = model(103);
    let (prefix, span) = span_after_system(&model);
    let recipe = cram::Recipe { optimizer: cram::OptimizerConfig { lr: 0.05, steps: Some(3), ..Default::default() }, ..cram::Recipe::published(4.0) };
    let plain = recipe.compress(&model, &prefix, &span, &mut |_, _| {}).unwrap();
    let fitted = cram::FittedRecipe { settings: MatchingSettings::default(), recipe }.compress(&model, &prefix, &span, &mut |_, _| {}).unwrap();
    assert_eq!(fitted.report.method, "fitted-recipe");
    assert_eq!(fitted.positions, plain.positions);
    for (a, b) in fitted.keys.iter().zip(&plain.keys) {
        assert!(max_abs_diff(a, b) == 0.0, "the recipe's keys");
    }
    assert!(fitted.values.iter().zip(&plain.values).any(|(a, b)| max_abs_diff(a, b) > 1e-3), "refitted values");
    assert!(fitted.biases.is_some() && fitted.report.fit_error.is_some_and(|e| e.is_finite() && e < 1.0));
    let mut cache = prefix.clone();
    fitted.append_to(&mut cache).unwrap();
    assert!(question_after(&model, &cache).logits.unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|x| x.is_finite()));
}

/// The reverse start: the recipe's virtual tokens start at the tokens that
/// the most heads' attention-matching fits keep (votes counted here from
/// the fit's own choices), and the fitted recipe keeps them there.
#[test]
fn the_reverse_start_anchors_the_recipe_at_the_tokens_most_heads_keep() {
    let model = model(116);
    let (prefix, span) = span_after_system(&model);
    let t = cram::budget(span.len(), 4.0).unwrap();
    let anchors = MatchedKeys::default().anchors(&model, &prefix, &span, t).unwrap();
    assert_eq!(anchors.len(), t);
    assert!(anchors.windows(2).all(|pair| pair[0] < pair[1]));
    let (choices, _) = AttentionMatching { settings: MatchingSettings::default(), ratio: 4.0 }.choices(&model, &prefix, &span, t).unwrap();
    let votes = |token: usize| choices.iter().flatten().filter(|choice| choice.kept.contains(&token)).count();
    let least_kept = anchors.iter().map(|&i| votes(i)).min().unwrap();
    let most_left = (0..span.len()).filter(|i| !anchors.contains(i)).map(votes).max().unwrap();
    assert!(least_kept >= most_left, "an anchor with {least_kept} votes, a token left out with {most_left}");

    let init = cram::registry::init("attention-matching", 0).unwrap();
    let recipe = cram::Recipe { init, optimizer: cram::OptimizerConfig { lr: 0.05, steps: Some(3), ..Default::default() }, ..cram::Recipe::published(4.0) };
    let fitted = cram::FittedRecipe { settings: MatchingSettings::default(), recipe }.compress(&model, &prefix, &span, &mut |_, _| {}).unwrap();
    assert_eq!(fitted.report.method, "fitted-recipe+attention-matching-spread-init");
    assert_eq!(fitted.positions, anchors.iter().map(|&i| span.positions[i]).collect::<Vec<_>>());
    assert!(fitted.biases.is_some() && fitted.report.fit_error.is_some_and(|e| e.is_finite()));
}

/// Targets without the surprisal (no logits) have the span's K and V bit
/// for bit; only the recipe reads the surprisal, so only it asks for it.
#[test]
fn targets_without_surprisal_keep_the_keys_and_values() {
    let model = model(107);
    let (prefix, span) = span_after_system(&model);
    let ids = model.tokenizer.encode(TURN).unwrap();
    let bare = SpanTargets::compute_without_surprisal(&model.qwen2, &prefix, &ids, &span.positions).unwrap();
    assert!(bare.surprisal.iter().all(|&s| s == 0.0) && span.surprisal.iter().any(|&s| s > 0.0));
    for (a, b) in bare.keys.iter().zip(&span.keys).chain(bare.values.iter().zip(&span.values)) {
        assert!(max_abs_diff(a, b) == 0.0);
    }
    assert!(!AttentionMatching { settings: MatchingSettings::default(), ratio: 2.0 }.needs_surprisal() && cram::Recipe::published(2.0).needs_surprisal());
}

/// Settings the fit cannot run with are errors naming the method, not
/// panics (a reversed clamp range would panic deep in the fit).
#[test]
fn impossible_matching_settings_are_clear_errors() {
    let build = |method: &str, knobs: serde_json::Value| {
        let options = cram::registry::MethodOptions { knobs, ..cram::registry::MethodOptions::new(3.2) };
        cram::registry::method(method).unwrap().build(&options).err().map(|e| e.to_string()).unwrap_or_default()
    };
    for method in ["attention-matching", "fitted-recipe"] {
        let err = build(method, serde_json::json!({ "bias_bounds": [3.0, -3.0] }));
        assert!(err.contains(&format!("method {method}")) && err.contains("lower bound first"), "{err}");
    }
    assert!(build("attention-matching", serde_json::json!({ "query_cap": 0 })).contains("query_cap must be >= 1"));
    assert!(build("attention-matching", serde_json::json!({ "ridge": -1.0 })).contains("ridge -1"));
    // Built directly, the library refuses them too.
    let model = model(109);
    let (prefix, span) = span_after_system(&model);
    let bad = MatchingSettings { bias_bounds: (1.0, 0.0), ..MatchingSettings::default() };
    let err = AttentionMatching { settings: bad, ratio: 2.0 }.compress(&model, &prefix, &span, &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("lower bound first"), "{err}");
}

/// Heads that keep different numbers of entries are padded with slots no
/// query sees: the question's logits do not change when the padding's keys
/// and values are replaced by random ones, and every padded slot carries a
/// bias of minus infinity.
#[test]
fn padded_slots_of_uneven_heads_are_never_attended() {
    let model = model(107);
    let (prefix, span) = span_after_system(&model);
    let choices: Vec<Vec<HeadChoice>> = (0..span.keys.len())
        .map(|layer| vec![HeadChoice { kept: vec![layer, 9], values: None, biases: None }, HeadChoice { kept: vec![1, 4, 12, 19], values: None, biases: None }])
        .collect();
    let entries = compacted("uneven".into(), &span, &choices).unwrap();
    assert_eq!((entries.len(), entries.report.n_kept), (4, 3), "4 slots, 3 real entries per head on average");
    let biases = entries.biases.as_ref().unwrap();
    for bias in biases {
        let bias: Vec<f32> = bias.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(bias, vec![0.0, 0.0, f32::NEG_INFINITY, f32::NEG_INFINITY, 0.0, 0.0, 0.0, 0.0]);
    }
    let mut garbage = entries.clone();
    let scramble = |t: &Tensor| -> Tensor {
        let head0 = t.narrow(1, 0, 1).unwrap();
        let noise = Tensor::randn(0f32, 3.0, (1, 1, 2, t.dim(3).unwrap()), &cpu()).unwrap();
        let head0 = Tensor::cat(&[&head0.narrow(2, 0, 2).unwrap(), &noise], 2).unwrap();
        Tensor::cat(&[&head0, &t.narrow(1, 1, 1).unwrap()], 1).unwrap()
    };
    garbage.keys = garbage.keys.iter().map(scramble).collect();
    garbage.values = garbage.values.iter().map(scramble).collect();
    let logits = |entries: &cram::CompressedSpan| -> Vec<f32> {
        let mut cache = prefix.clone();
        entries.append_to(&mut cache).unwrap();
        question_after(&model, &cache).logits.unwrap().flatten_all().unwrap().to_vec1().unwrap()
    };
    let (clean, scrambled) = (logits(&entries), logits(&garbage));
    assert!(clean.iter().all(|x| x.is_finite()));
    assert_eq!(clean, scrambled);
}

/// Spread budgets (the default) keep the same total as uniform ones (n / ratio per head
/// on average), at least one real entry a head, no more than the span.
#[test]
fn spread_budgets_keep_the_uniform_total() {
    let model = model(109);
    let (prefix, span) = span_after_system(&model);
    let settings = MatchingSettings::default();
    let method = AttentionMatching { settings, ratio: 4.0 };
    assert_eq!(method.name(), "attention-matching-spread");
    let compressed = method.compress(&model, &prefix, &span, &mut |_, _| {}).unwrap();
    assert_eq!(compressed.report.n_kept, 5);
    let heads_total: usize = compressed.keys.iter().map(|k| k.dim(1).unwrap()).sum();
    let mut real = 0;
    for bias in compressed.biases.as_ref().unwrap() {
        let (_, heads, slots) = bias.dims3().unwrap();
        assert!(slots <= span.len());
        for head in 0..heads {
            let row: Vec<f32> = bias.narrow(1, head, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let count = row.iter().filter(|b| b.is_finite()).count();
            assert!(count >= 1, "every head keeps an entry");
            assert!(row[..count].iter().all(|b| b.is_finite()) && row[count..].iter().all(|b| *b == f32::NEG_INFINITY), "padding last");
            real += count;
        }
    }
    assert_eq!(real, 5 * heads_total);
    assert!(compressed.report.fit_error.is_some_and(|e| e.is_finite()));
}

/// Per (layer, KV head): the effective keys of the head's mean attention
/// to the queries of `source`, counted from each head's own f64 problem.
fn head_weights_by_hand(model: &Model, prefix: &KvCache, span: &SpanTargets, source: cram::matching::queries::QuerySource) -> Vec<f64> {
    let settings = MatchingSettings { queries: source, ..MatchingSettings::default() };
    let queries = settings.reference_queries(model, prefix, span).unwrap();
    let problems = settings.head_problems(model, span, &queries).unwrap();
    problems
        .iter()
        .flatten()
        .map(|problem| {
            let attention = problem.attention();
            cram::matching::budgets::effective_keys(&(0..attention.ncols()).map(|key| attention.column(key).mean()).collect::<Vec<_>>())
        })
        .collect()
}

/// Spread budgets weighed by the span's own queries (`budget_weights =
/// "context"`, on-policy): each head keeps the entries that the D'Hondt
/// share of its context queries' effective keys gives it, counted here
/// from each head's own f64 attention; budgets weigh spread heads only.
#[test]
fn budgets_by_context_queries_follow_the_context_attention() {
    use cram::matching::budgets::{allocate, BudgetWeights, Budgets};
    use cram::matching::queries::QuerySource;
    // Layer 0's queries scaled up: its heads attend to few keys, the others
    // (random weights) to nearly all, so the shares differ.
    let config = synthetic::tiny_config();
    let mut weights = synthetic::named_weights(&config, 114, &cpu()).unwrap();
    let sharp = (weights["model.layers.0.self_attn.q_proj.weight"].clone() * 12.0).unwrap();
    weights.insert("model.layers.0.self_attn.q_proj.weight".into(), sharp);
    let model = synthetic::with_word_tokenizer(synthetic::model_from_weights(&config, &weights, &cpu(), DType::F32).unwrap(), "sharp-layer-0").unwrap();
    let (prefix, plain_span) = span_after_system(&model);
    let span = SpanTargets::compute_for(&model.qwen2, &prefix, &plain_span.ids, &plain_span.positions, false, true).unwrap();
    let settings = MatchingSettings { on_policy: true, budget_weights: Some(BudgetWeights::Queries(QuerySource::Context)), ..MatchingSettings::default() };
    // 7 of the span's 20 tokens a head, where the two query sets' shares differ.
    let t = 7;
    let method = AttentionMatching { settings, ratio: span.len() as f64 / t as f64 };
    assert_eq!(method.name(), "attention-matching-spread-by-context-on-policy");
    assert!(method.needs_span_queries());
    // Each head's share of `t` per head by the effective keys of its
    // mean attention to the queries of `source`.
    let shares = |source: QuerySource, t: usize| {
        let head_weights = head_weights_by_hand(&model, &prefix, &span, source);
        allocate(t * head_weights.len(), &head_weights, span.len()).unwrap()
    };
    let expected = shares(QuerySource::Context, t);
    assert_ne!(expected, shares(QuerySource::Repeat, t), "repeat queries must share the entries otherwise for this test to tell");
    let (choices, _) = method.choices(&model, &prefix, &span, t).unwrap();
    let kept: Vec<usize> = choices.iter().flatten().map(|choice| choice.kept.len()).collect();
    assert_eq!(kept, expected);
    let uniform_by_context = MatchingSettings { budgets: Budgets::Uniform, budget_weights: Some(BudgetWeights::Queries(QuerySource::Context)), ..MatchingSettings::default() };
    assert!(uniform_by_context.validate().is_err());
}

/// A profile of budget weights is what the heads are weighed by, and a
/// span's head shares are its heads' weights counted by hand: given
/// the span's own weights (scaled, since only proportions count), the
/// fit keeps exactly what the default fit keeps; on-policy, each head
/// keeps its D'Hondt share of an uneven profile. A profile for another
/// model's head count, or with a negative weight, is refused.
#[test]
fn a_budget_profile_weighs_the_heads() {
    use cram::matching::budgets::{allocate, BudgetWeights};
    let model = model(115);
    let (prefix, span) = span_after_system(&model);
    let t = 7;
    let default = AttentionMatching { settings: MatchingSettings::default(), ratio: span.len() as f64 / t as f64 };
    let queries = default.settings.reference_queries(&model, &prefix, &span).unwrap();
    let own: Vec<f64> = cram::methods::attention_matching::head_weights(&model, &span, &queries).unwrap().iter().map(|w| 3.0 * w).collect();
    // A span's shares (what a profile averages) are its heads' weights counted by hand, summing to 1.
    let by_hand = head_weights_by_hand(&model, &prefix, &span, cram::matching::queries::QuerySource::Repeat);
    let total: f64 = by_hand.iter().sum();
    for (share, weight) in default.settings.head_shares(&model, &prefix, &span).unwrap().iter().zip(&by_hand) {
        assert!((share - weight / total).abs() < 1e-6 * share, "{share} against {}", weight / total);
    }
    let profiled = |weights: Vec<f64>, on_policy: bool| AttentionMatching {
        settings: MatchingSettings { budget_weights: Some(BudgetWeights::Profile(weights)), on_policy, ..MatchingSettings::default() },
        ratio: default.ratio,
    };
    let with_own = profiled(own.clone(), false);
    assert_eq!(with_own.name(), "attention-matching-spread-by-profile");
    let (expected, _) = default.choices(&model, &prefix, &span, t).unwrap();
    let (got, _) = with_own.choices(&model, &prefix, &span, t).unwrap();
    for (a, b) in expected.iter().flatten().zip(got.iter().flatten()) {
        assert_eq!((&a.kept, &a.values, &a.biases), (&b.kept, &b.values, &b.biases));
    }
    let uneven: Vec<f64> = (0..own.len()).map(|head| 1.0 + head as f64).collect();
    for on_policy in [false, true] {
        let (choices, _) = profiled(uneven.clone(), on_policy).choices(&model, &prefix, &span, t).unwrap();
        let kept: Vec<usize> = choices.iter().flatten().map(|choice| choice.kept.len()).collect();
        assert_eq!(kept, allocate(t * uneven.len(), &uneven, span.len()).unwrap(), "on_policy {on_policy}");
    }
    assert!(profiled(vec![1.0; own.len() + 1], false).choices(&model, &prefix, &span, t).is_err());
    assert!(profiled(vec![-1.0; own.len()], false).settings.validate().is_err());
    assert!(profiled(vec![0.0; own.len()], false).settings.validate().is_err());
    // A config spells a profile as a list, a query set as its name; the knob's old name is refused.
    let read = |text: &str| serde_json::from_str::<MatchingSettings>(text).map(|settings| settings.budget_weights);
    assert_eq!(read(r#"{"budget_weights": "context"}"#).unwrap(), Some(BudgetWeights::Queries(cram::matching::queries::QuerySource::Context)));
    assert_eq!(read(r#"{"budget_weights": [1, 2.5]}"#).unwrap(), Some(BudgetWeights::Profile(vec![1.0, 2.5])));
    assert!(read(r#"{"budget_weights": "contxt"}"#).is_err() && read(r#"{"budget_queries": "context"}"#).is_err());
}

/// The span attention that spread budgets weigh heads by (candle, f32,
/// all heads of a layer at once) is the f64 attention each head's fit
/// problem computes on its own.
#[test]
fn span_attention_in_f32_matches_each_heads_f64_problem() {
    let model = model(110);
    let (prefix, span) = span_after_system(&model);
    let settings = MatchingSettings::default();
    let queries = settings.reference_queries(&model, &prefix, &span).unwrap();
    let problems = settings.head_problems(&model, &span, &queries).unwrap();
    for (layer, heads) in problems.iter().enumerate() {
        let attention = attention_over_span(&queries[layer], &span.keys[layer], heads[0].scale).unwrap();
        for (head, problem) in heads.iter().enumerate() {
            let ours: Vec<Vec<f32>> = attention.get(head).unwrap().to_vec2().unwrap();
            let reference = problem.attention();
            assert_eq!((ours.len(), ours[0].len()), reference.shape());
            let worst = ours.iter().enumerate().flat_map(|(i, row)| row.iter().enumerate().map(move |(j, &p)| (i, j, p))).fold(0.0f64, |worst, (i, j, p)| worst.max((p as f64 - reference[(i, j)]).abs()));
            assert!(worst < 1e-5, "layer {layer} head {head}: {worst}");
        }
    }
}

/// The heads fitted in parallel come back in (layer, head) order: each
/// choice is what that head's own problem fits to on its own.
#[test]
fn heads_fitted_in_parallel_keep_their_order() {
    let model = model(111);
    let (prefix, span) = span_after_system(&model);
    let method = AttentionMatching { settings: uniform(), ratio: 3.0 };
    let t = cram::budget(span.len(), 3.0).unwrap();
    let (choices, _) = method.choices(&model, &prefix, &span, t).unwrap();
    let queries = method.settings.reference_queries(&model, &prefix, &span).unwrap();
    for (layer, heads) in method.settings.head_problems(&model, &span, &queries).unwrap().iter().enumerate() {
        for (head, problem) in heads.iter().enumerate() {
            let alone = problem.fit(t, &method.settings.fit()).unwrap();
            assert_eq!(choices[layer][head].kept, alone.kept, "layer {layer} head {head}");
            assert_eq!(choices[layer][head].values.as_ref(), Some(&alone.values));
        }
    }
}

/// Context-prefill queries taken from the targets' own forward are the
/// queries a second forward of the span computes, and fit the same
/// compaction; repeat-only methods do not ask for them.
#[test]
fn context_queries_from_the_targets_forward_equal_a_second_forward() {
    let model = model(112);
    let (prefix, span) = span_after_system(&model);
    let with_queries = SpanTargets::compute_for(&model.qwen2, &prefix, &span.ids, &span.positions, false, true).unwrap();
    let recomputed = model.qwen2.queries(&span.embeddings, &span.positions, Some(&prefix)).unwrap();
    for (kept, again) in with_queries.queries.as_ref().unwrap().iter().zip(&recomputed) {
        assert_eq!(max_abs_diff(kept, again), 0.0);
    }
    assert!(span.queries.is_none(), "targets keep no queries unless asked");
    let context = AttentionMatching { settings: MatchingSettings { queries: cram::matching::queries::QuerySource::Context, ..MatchingSettings::default() }, ratio: 3.0 };
    assert!(context.needs_span_queries() && !AttentionMatching { settings: MatchingSettings::default(), ratio: 3.0 }.needs_span_queries());
    let fitted = |span: &SpanTargets| context.compress(&model, &prefix, span, &mut |_, _| {}).unwrap();
    let (from_targets, from_second_forward) = (fitted(&with_queries), fitted(&span));
    for (a, b) in from_targets.values.iter().zip(&from_second_forward.values) {
        assert_eq!(max_abs_diff(a, b), 0.0);
    }
}

/// Per layer, the repeat pass's pooled queries (as `method` samples them)
/// computed by a plain forward over the prefix and `method`'s whole
/// compaction of the span: what each layer's on-policy queries must be,
/// since layer l's queries read only the layers below.
fn repeat_queries_over_compaction(model: &Model, prefix: &KvCache, span: &SpanTargets, method: &AttentionMatching) -> Vec<Tensor> {
    use cram::matching::queries::{QuerySample, RepeatPass};
    let mut compacted_cache = prefix.clone();
    method.compress(model, prefix, span, &mut |_, _| {}).unwrap().append_to(&mut compacted_cache).unwrap();
    let repeat = RepeatPass::new(model, prefix, span).unwrap();
    let raw = model.qwen2.queries(&repeat.embeddings, &repeat.positions, Some(&compacted_cache)).unwrap();
    let sample = QuerySample::new(model, repeat.positions.len(), method.settings.query_cap, method.settings.seed, &cpu()).unwrap();
    raw.iter().map(|layer| sample.pool(&[layer]).unwrap()).collect()
}

/// On-policy fits against an independent reconstruction: every layer's
/// on-policy queries are what a plain forward of the repeat pass computes
/// over the final compacted cache (layer l's queries read only the layers
/// below, which that cache holds as the on-policy pass left them). Fitted
/// to those queries, every head keeps the same entries and values. Layer 0
/// reads no cache, so its fit is the off-policy one; and keeping every
/// entry keeps the span, so the whole fit is the off-policy one.
#[test]
fn on_policy_fits_the_queries_of_the_compacted_layers_below() {
    use cram::matching::queries::QuerySource;
    let model = model(113);
    let (prefix, span) = span_after_system(&model);
    let on_policy = AttentionMatching { settings: MatchingSettings { on_policy: true, ..uniform() }, ratio: 3.0 };
    let off_policy = AttentionMatching { settings: uniform(), ratio: 3.0 };
    assert_eq!(on_policy.name(), "attention-matching-on-policy");
    let t = cram::budget(span.len(), 3.0).unwrap();
    let (choices, _) = on_policy.choices(&model, &prefix, &span, t).unwrap();

    let queries = repeat_queries_over_compaction(&model, &prefix, &span, &on_policy);
    let (reconstructed, _) = off_policy.fit_heads(&model, &span, &queries, t).unwrap();
    let (off, _) = off_policy.choices(&model, &prefix, &span, t).unwrap();
    for (layer, heads) in choices.iter().enumerate() {
        for (head, choice) in heads.iter().enumerate() {
            let again = &reconstructed[layer][head];
            assert_eq!(choice.kept, again.kept, "layer {layer} head {head}");
            let (ours, theirs) = (choice.values.as_ref().unwrap(), again.values.as_ref().unwrap());
            assert!((ours - theirs).norm() <= 1e-4 * theirs.norm(), "layer {layer} head {head}");
        }
    }
    assert_eq!(choices[0][0].kept, off[0][0].kept);
    assert!(choices.iter().zip(&off).skip(1).any(|(on, off)| on.iter().zip(off).any(|(a, b)| a.kept != b.kept || (a.values.as_ref().unwrap() - b.values.as_ref().unwrap()).norm() > 1e-3)), "on-policy changed nothing past layer 0");

    let (all_on, _) = on_policy.choices(&model, &prefix, &span, span.len()).unwrap();
    let (all_off, _) = off_policy.choices(&model, &prefix, &span, span.len()).unwrap();
    for (on, off) in all_on.iter().flatten().zip(all_off.iter().flatten()) {
        assert_eq!(on.kept, off.kept);
        assert!((on.values.as_ref().unwrap() - off.values.as_ref().unwrap()).norm() <= 1e-4 * off.values.as_ref().unwrap().norm());
    }

    let context_only = MatchingSettings { on_policy: true, queries: QuerySource::Context, ..MatchingSettings::default() };
    assert!(context_only.validate().is_err());
}

/// With a share of the entries kept verbatim, every head keeps the span's
/// last tokens with their own keys and values and bias 0 at the end of its
/// own entries, and fits the older tokens into the rest of its budget:
/// with uniform and spread budgets, off-policy and on-policy.
#[test]
fn recent_tokens_are_kept_verbatim_in_every_head() {
    use cram::matching::budgets::Budgets;
    let model = model(114);
    let (prefix, span) = span_after_system(&model);
    let (n, t) = (span.len(), cram::budget(span.len(), 2.0).unwrap());
    for budgets in [Budgets::Uniform, Budgets::Spread] {
        for on_policy in [false, true] {
            let method = AttentionMatching { settings: MatchingSettings { recent_share: 0.5, on_policy, budgets, ..MatchingSettings::default() }, ratio: 2.0 };
            let recent = method.settings.recent_tokens(t, n);
            assert_eq!(recent, t / 2);
            let (choices, _) = method.choices(&model, &prefix, &span, t).unwrap();
            let total: usize = choices.iter().flatten().map(|choice| choice.kept.len()).sum();
            assert_eq!(total, t * choices.iter().flatten().count(), "{}: t entries a head on average", method.name());
            let compressed = method.compress(&model, &prefix, &span, &mut |_, _| {}).unwrap();
            for (layer, heads) in choices.iter().enumerate() {
                for (head, choice) in heads.iter().enumerate() {
                    let count = choice.kept.len();
                    assert!(budgets == Budgets::Spread || count == t);
                    assert!(choice.kept[..count - recent].iter().all(|&i| i < n - recent), "fitted entries come from the older tokens");
                    assert_eq!(choice.kept[count - recent..], (n - recent..n).collect::<Vec<_>>()[..]);
                    let tail = |tensor: &Tensor, len: usize| tensor.narrow(1, head, 1).unwrap().narrow(2, len - recent, recent).unwrap();
                    assert_eq!(max_abs_diff(&tail(&compressed.keys[layer], count), &tail(&span.keys[layer], n)), 0.0);
                    assert_eq!(max_abs_diff(&tail(&compressed.values[layer], count), &tail(&span.values[layer], n)), 0.0);
                    let biases = tail(&compressed.biases.as_ref().unwrap()[layer], count);
                    assert!(biases.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|&b| b == 0.0));
                }
            }
        }
    }
    assert!(MatchingSettings { recent_share: 1.0, ..MatchingSettings::default() }.validate().is_err());
}

/// On-policy with a verbatim tail, against an independent reconstruction
/// at every layer: the off-policy fit of the older tokens to the queries a
/// plain forward computes over the final compaction (whose lower layers
/// hold their tails), then the tail. Moving the tail after the layers
/// above have read a layer would change them.
#[test]
fn on_policy_layers_read_the_tails_of_the_layers_below() {
    let model = model(115);
    let (prefix, span) = span_after_system(&model);
    let (n, t) = (span.len(), cram::budget(span.len(), 2.0).unwrap());
    let on_policy = AttentionMatching { settings: MatchingSettings { recent_share: 0.5, on_policy: true, ..uniform() }, ratio: 2.0 };
    assert_eq!(on_policy.name(), "attention-matching-on-policy-recent0.5");
    let recent = on_policy.settings.recent_tokens(t, n);
    let (choices, _) = on_policy.choices(&model, &prefix, &span, t).unwrap();
    let queries = repeat_queries_over_compaction(&model, &prefix, &span, &on_policy);
    let older = span.select(&(0..n - recent).collect::<Vec<_>>()).unwrap();
    let (reconstructed, _) = AttentionMatching { settings: uniform(), ratio: 2.0 }.fit_heads(&model, &older, &queries, t - recent).unwrap();
    for (layer, heads) in choices.iter().enumerate() {
        for (head, choice) in heads.iter().enumerate() {
            let again = &reconstructed[layer][head];
            assert_eq!(choice.kept[..t - recent], again.kept[..], "layer {layer} head {head}");
            let (ours, theirs) = (choice.values.as_ref().unwrap().rows(0, t - recent).into_owned(), again.values.as_ref().unwrap());
            assert!((&ours - theirs).norm() <= 1e-4 * theirs.norm(), "layer {layer} head {head}");
        }
    }
}
