//! Turn-by-turn compression on a small random model: the session, its saved
//! cache, the hybrid and compress-then-evict.

mod common;

use common::{cpu, max_abs_diff, positions};
use cram::pooling::n_virtual;
use cram::{
    random, CompressThenEvict, Compressor, Error, Hybrid, KvCache, Logits, Model, OptimizerConfig, Recipe, Session,
    SpanTargets, Truncate,
};

const SYSTEM: &str = "t5 t9 t14 t2";
const TURN_1: &str = "t30 t31 t8 t8 t44 t17 t63 t1 t12 t40 t41 t7";
const TURN_2: &str = "t22 t3 t50 t51 t52 t9";
const QUESTION: &str = "t60 t61 t62";

fn model(seed: u64) -> Model {
    random::full_model(&random::tiny_config(), seed, &cpu()).unwrap()
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

#[test]
fn the_hybrid_keeps_the_chosen_tokens_kv_unchanged_and_meets_the_ratio() {
    let model = model(3);
    let (prefix, span) = span_after_system(&model);
    let mut hybrid = Hybrid::new(quick_recipe(2.0));
    hybrid.verbatim_share = 0.25;
    let verbatim = hybrid.verbatim_tokens(&span).unwrap();
    assert_eq!(verbatim.len(), 3); // 25% of 12
    assert!(verbatim.windows(2).all(|w| w[0] < w[1]));

    let compressed = hybrid.compress(&model.qwen2, &prefix, &span, &mut |_, _| {}).unwrap();
    assert_eq!(compressed.len(), n_virtual(12, 2.0).unwrap());
    assert_eq!(compressed.report.n_kept, 6);
    let kept_positions: Vec<f32> = verbatim.iter().map(|&i| span.positions[i]).collect();
    assert_eq!(&compressed.positions[..3], kept_positions.as_slice());
    for layer in 0..span.keys.len() {
        for (entry, &token) in verbatim.iter().enumerate() {
            let kept_key = compressed.keys[layer].narrow(2, entry, 1).unwrap();
            let kept_value = compressed.values[layer].narrow(2, entry, 1).unwrap();
            assert_eq!(max_abs_diff(&kept_key, &span.keys[layer].narrow(2, token, 1).unwrap()), 0.0);
            assert_eq!(max_abs_diff(&kept_value, &span.values[layer].narrow(2, token, 1).unwrap()), 0.0);
        }
    }
    // The virtual tokens sit over the tokens that were not kept.
    let rest: Vec<f32> = (0..12).filter(|i| !verbatim.contains(i)).map(|i| span.positions[i]).collect();
    assert!(compressed.positions[3..].iter().all(|p| (rest[0]..=rest[rest.len() - 1]).contains(p)));
}

#[test]
fn value_uniqueness_ranks_a_token_unlike_its_neighbours_first() {
    let device = cpu();
    // One layer, one head, 5 tokens of dim 2; token 2 stands out.
    let values = candle_core::Tensor::new(&[[[[0f32, 0.], [0., 0.1], [5., 5.], [0., 0.1], [0., 0.]]]], &device).unwrap();
    let uniqueness = cram::hybrid::value_uniqueness(&[values]).unwrap();
    let top = cram::evict::most_important(&uniqueness, 1);
    assert_eq!(top, vec![2]);
}

#[test]
fn compress_then_evict_keeps_n_over_ratio_of_the_virtual_tokens() {
    let model = model(3);
    let (prefix, span) = span_after_system(&model);
    let first = quick_recipe(2.0).compress(&model.qwen2, &prefix, &span, &mut |_, _| {}).unwrap();
    let method = CompressThenEvict { recipe: quick_recipe(2.0), ratio: 4.0, window: 4 };
    let evicted = method.compress(&model.qwen2, &prefix, &span, &mut |_, _| {}).unwrap();
    assert_eq!(evicted.len(), 3);
    assert_eq!(evicted.report.method, "compress-evict");
    assert!(evicted.positions.iter().all(|p| first.positions.contains(p)));
    assert!(evicted.positions.windows(2).all(|w| w[0] < w[1]), "kept in cache order");

    let backwards = CompressThenEvict { recipe: quick_recipe(4.0), ratio: 2.0, window: 4 };
    assert!(backwards.compress(&model.qwen2, &prefix, &span, &mut |_, _| {}).is_err());
}

#[test]
fn attention_probabilities_are_causal_distributions() {
    let model = model(1);
    let (prefix, span) = span_after_system(&model);
    let probabilities = model.qwen2.attention_probabilities(&span.embeddings, &span.positions, Some(&prefix)).unwrap();
    assert_eq!(probabilities.len(), model.qwen2.config().num_hidden_layers);
    let layer = &probabilities[0]; // (1, heads, 12, 4 + 12)
    assert_eq!(layer.dims(), &[1, model.qwen2.config().num_attention_heads, 12, 16]);
    let sums: Vec<f32> = layer.sum(3).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
    // Token 0 of the span sees the prefix and itself only.
    let future: f32 = layer.narrow(2, 0, 1).unwrap().narrow(3, 5, 11).unwrap().sum_all().unwrap().to_scalar().unwrap();
    assert_eq!(future, 0.0);
}
