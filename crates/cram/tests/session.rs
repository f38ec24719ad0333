//! Turn-by-turn compression on a small random model: the session, its saved
//! cache, and where a continuation starts after a span that kept fewer
//! entries than positions. The hybrid and compress-then-evict: `methods.rs`.

mod common;

use std::collections::HashMap;

use common::{cpu, max_abs_diff, positions};
use cram::{
    synthetic, AttentionMatching, Compressor, Error, Evict, KvCache, Logits, MatchingSettings, Model, OptimizerConfig, Qwen2, Recipe, Scorer,
    Session, SpanTargets, Truncate,
};

const SYSTEM: &str = "t5 t9 t14 t2";
const TURN_1: &str = "t30 t31 t8 t8 t44 t17 t63 t1 t12 t40 t41 t7";
const TURN_2: &str = "t22 t3 t50 t51 t52 t9";
const QUESTION: &str = "t60 t61 t62";

fn model(seed: u64) -> Model {
    synthetic::full_model(&synthetic::tiny_config(), seed, &cpu()).unwrap()
}

fn quick_recipe(ratio: f64) -> Recipe {
    let mut recipe = Recipe::published(ratio);
    recipe.optimizer = OptimizerConfig { steps: Some(3), ..OptimizerConfig::default() };
    recipe
}

fn ids(model: &Model, text: &str) -> Vec<u32> {
    model.tokenizer.encode(text).unwrap()
}

#[test]
fn a_session_of_verbatim_turns_equals_one_forward_over_the_whole_text() {
    let model = model(1);
    let mut session = Session::new(&model, SYSTEM).unwrap();
    session.push_verbatim(TURN_1).unwrap();
    session.push_verbatim(TURN_2).unwrap();

    let all: Vec<u32> = [SYSTEM, TURN_1, TURN_2].iter().flat_map(|t| ids(&model, t)).collect();
    let whole = model.qwen2.forward(&model.qwen2.embed(&all).unwrap(), &positions(0, all.len()), None, Logits::None).unwrap();
    let cache = session.cache();
    assert_eq!(cache.positions(), positions(0, all.len()).as_slice());
    assert_eq!(session.next_position(), all.len() as f32);
    for layer in 0..cache.num_layers() {
        let (keys, values) = cache.layer(layer).unwrap();
        assert!(max_abs_diff(keys, &whole.keys[layer]) < 1e-5, "layer {layer} keys");
        assert!(max_abs_diff(values, &whole.values[layer]) < 1e-5, "layer {layer} values");
    }
}

#[test]
fn turns_after_a_compressed_turn_continue_at_the_original_positions() {
    let model = model(1);
    let mut session = Session::new(&model, SYSTEM).unwrap();
    let report = session.push_compressed(TURN_1, &quick_recipe(3.0), &mut |_, _| {}).unwrap();
    assert_eq!((report.n_tokens, report.n_kept), (12, 4));
    // Physical length: 4 prefix + 4 virtual entries; logical: 4 + 12 positions.
    assert_eq!(session.cache().len(), 8);
    assert_eq!(session.next_position(), 16.0);
    assert!(session.cache().positions()[4..].iter().all(|&p| (4.0..=15.0).contains(&p)));

    session.push_verbatim(TURN_2).unwrap();
    assert_eq!(&session.cache().positions()[8..], positions(16, 6).as_slice());
    let turns: Vec<(usize, usize)> = session.turns().iter().map(|t| (t.n_tokens, t.n_kept)).collect();
    assert_eq!(turns, vec![(4, 4), (12, 4), (6, 6)]);

    // A second compressed turn is fitted against the first's virtual tokens.
    session.push_compressed(QUESTION, &quick_recipe(1.5), &mut |_, _| {}).unwrap();
    assert_eq!(session.cache().len(), 16);
    assert_eq!(session.next_position(), 25.0);
}

#[test]
fn a_truncated_turn_keeps_nothing_but_its_positions() {
    let model = model(1);
    let mut session = Session::new(&model, SYSTEM).unwrap();
    session.push_compressed(TURN_1, &Truncate, &mut |_, _| {}).unwrap();
    assert_eq!(session.cache().len(), 4);
    assert_eq!(session.next_position(), 16.0);
}

#[test]
fn a_saved_session_answers_the_same_bit_for_bit() {
    let model = model(1);
    let mut session = Session::new(&model, SYSTEM).unwrap();
    session.push_compressed(TURN_1, &quick_recipe(3.0), &mut |_, _| {}).unwrap();
    session.push_verbatim(TURN_2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("session.safetensors");
    session.save(&path).unwrap();

    let loaded = Session::load(&model, &path).unwrap();
    assert_eq!(loaded.cache().positions(), session.cache().positions());
    assert_eq!(loaded.next_position(), session.next_position());
    assert_eq!(loaded.turns().len(), 3);
    for layer in 0..session.cache().num_layers() {
        let (keys, values) = session.cache().layer(layer).unwrap();
        let (loaded_keys, loaded_values) = loaded.cache().layer(layer).unwrap();
        assert_eq!(max_abs_diff(keys, loaded_keys), 0.0);
        assert_eq!(max_abs_diff(values, loaded_values), 0.0);
    }
    let answer = session.ask(QUESTION, 8).unwrap();
    assert!(!answer.is_empty());
    assert_eq!(loaded.ask(QUESTION, 8).unwrap(), answer);
}

#[test]
fn a_cache_saved_by_another_model_or_not_a_cache_is_refused() {
    let (model, other) = (model(1), model(2));
    let session = Session::new(&model, SYSTEM).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("session.safetensors");
    session.save(&path).unwrap();
    let error = Session::load(&other, &path).unwrap_err();
    assert!(matches!(error, Error::WrongModel { .. }), "{error}");
    assert!(matches!(Session::load(&model, &dir.path().join("absent")).unwrap_err(), Error::MissingFile(_)));
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"not a safetensors file").unwrap();
    let error = Session::load(&model, &garbage).unwrap_err();
    assert!(matches!(error, Error::Invalid(_)) && error.to_string().contains("garbage.safetensors"), "{error}");
}

/// The span of TURN_1 after the system prompt.
fn span_after_system(model: &Model) -> (KvCache, SpanTargets) {
    let session = Session::new(model, SYSTEM).unwrap();
    let span_ids = ids(model, TURN_1);
    let span = SpanTargets::compute(&model.qwen2, session.cache(), &span_ids, &positions(4, span_ids.len())).unwrap();
    (session.cache().clone(), span)
}

/// Keeps the earliest tokens: an eviction that always drops the span's last.
#[derive(Debug)]
struct Earliest;

impl Scorer for Earliest {
    fn name(&self) -> String {
        "earliest".into()
    }

    fn score(&self, _model: &Qwen2, _prefix: &KvCache, span: &SpanTargets, _budget: usize) -> cram::Result<Vec<f32>> {
        Ok((0..span.len()).map(|i| -(i as f32)).collect())
    }
}

/// Saves and loads `cache`; the loaded next position.
fn next_position_after_save_and_load(cache: &KvCache) -> f32 {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache.safetensors");
    cache.save(&path, HashMap::new()).unwrap();
    let (loaded, _) = KvCache::load(&path, &cpu(), candle_core::DType::F32).unwrap();
    assert_eq!(loaded.positions(), cache.positions());
    loaded.next_position()
}

#[test]
fn after_a_dropped_or_cut_span_the_cache_continues_after_the_span() {
    let model = model(1);
    let (prefix, span) = span_after_system(&model);
    let after_span = 4.0 + 12.0;
    assert_eq!(prefix.next_position(), 4.0);

    let mut dropped = prefix.clone();
    Truncate.compress(&model, &prefix, &span, &mut |_, _| {}).unwrap().append_to(&mut dropped).unwrap();
    assert_eq!((dropped.len(), dropped.next_position()), (4, after_span));
    assert_eq!(next_position_after_save_and_load(&dropped), after_span);

    let evicted = Evict::new(Earliest, 3.0).compress(&model, &prefix, &span, &mut |_, _| {}).unwrap();
    assert_eq!(evicted.positions, positions(4, 4), "the span's first 4 entries, its last dropped");
    let mut cut = prefix.clone();
    evicted.append_to(&mut cut).unwrap();
    assert_eq!((cut.len(), cut.next_position()), (8, after_span));
    assert_eq!(next_position_after_save_and_load(&cut), after_span);

    // What follows goes on from there, in a session as in a bare cache.
    let mut session = Session::new(&model, SYSTEM).unwrap();
    session.push_compressed(TURN_1, &Evict::new(Earliest, 3.0), &mut |_, _| {}).unwrap();
    assert_eq!(session.next_position(), after_span);
    session.push_verbatim(TURN_2).unwrap();
    assert_eq!(&session.cache().positions()[8..], positions(16, 6).as_slice());
}

#[test]
fn a_cache_file_without_a_next_position_continues_after_its_last_entry() {
    let model = model(1);
    let (prefix, _) = span_after_system(&model);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.safetensors");
    let mut tensors: HashMap<String, candle_core::Tensor> = HashMap::new();
    for layer in 0..prefix.num_layers() {
        let (keys, values) = prefix.layer(layer).unwrap();
        tensors.insert(format!("keys.{layer}"), keys.clone());
        tensors.insert(format!("values.{layer}"), values.clone());
    }
    tensors.insert("positions".into(), candle_core::Tensor::new(&[0.0f32, 1.0, 2.0, 7.0], &cpu()).unwrap());
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let (loaded, metadata) = KvCache::load(&path, &cpu(), candle_core::DType::F32).unwrap();
    assert!(metadata.is_empty());
    assert_eq!(loaded.next_position(), 8.0);
}

/// A turn's targets computed once serve several compressors, each on its
/// own copy of the session, and give each the cache its own
/// `push_compressed` gives, bit for bit; targets that do not fit the
/// session, or lack what a compressor reads, are refused.
#[test]
fn targets_computed_once_compress_a_turn_as_each_compressor_alone_would() {
    let model = model(1);
    let session = Session::new(&model, SYSTEM).unwrap();
    let targets = session.turn_targets(TURN_1, false, false).unwrap();
    let evict = Evict::new(Earliest, 3.0);
    let matching = AttentionMatching { settings: MatchingSettings::default(), ratio: 3.0 };
    assert!(!matching.needs_span_queries() && !matching.needs_surprisal(), "the default fit reads the targets computed here");
    let compressors: [&dyn Compressor; 3] = [&Truncate, &evict, &matching];
    for compressor in compressors {
        let mut alone = session.clone();
        alone.push_compressed(TURN_1, compressor, &mut |_, _| {}).unwrap();
        let mut shared = session.clone();
        let report = shared.push_compressed_targets(&targets, compressor, &mut |_, _| {}).unwrap();
        assert_eq!(report.n_kept, alone.turns()[1].n_kept);
        assert_eq!((shared.cache().positions(), shared.next_position()), (alone.cache().positions(), alone.next_position()));
        for layer in 0..alone.cache().num_layers() {
            let ((keys, values), (alone_keys, alone_values)) = (shared.cache().layer(layer).unwrap(), alone.cache().layer(layer).unwrap());
            assert_eq!((max_abs_diff(keys, alone_keys), max_abs_diff(values, alone_values)), (0.0, 0.0), "{}", compressor.name());
        }
    }
    let mut moved_on = session.clone();
    moved_on.push_verbatim(TURN_2).unwrap();
    let error = moved_on.push_compressed_targets(&targets, &Truncate, &mut |_, _| {}).unwrap_err();
    assert!(error.to_string().contains("targets computed after 4 entries"), "{error}");
    let error = session.clone().push_compressed_targets(&targets, &quick_recipe(3.0), &mut |_, _| {}).unwrap_err();
    assert!(error.to_string().contains("needs targets with surprisal"), "{error}");
    let with_queries = session.turn_targets(TURN_1, false, true).unwrap();
    let error = session.clone().push_compressed_targets(&with_queries, &Truncate, &mut |_, _| {}).unwrap_err();
    assert!(error.to_string().contains("computed without surprisal and with queries"), "{error}");
}
