//! The methods that combine the recipe with selection, on a small random
//! model, each checked against what the test computes itself: the hybrid
//! (verbatim tokens by value uniqueness, virtual tokens fitted with them in
//! context) and compress-then-evict (attention of the span's last tokens);
//! and the registry that builds every method by name.

mod common;

use candle_core::Tensor;
use common::{cpu, max_abs_diff, positions};
use cram::recipe::optimize::optimize;
use cram::registry::{MethodOptions, METHODS};
use cram::{
    budget, synthetic, CompressEvictSettings, CompressThenEvict, CompressedSpan, Compressor, Hybrid, HybridSettings, KvCache, Logits,
    Model, OptimizerConfig, Recipe, Scorer, Session, SpanTargets, ValueUniqueness,
};

const SYSTEM: &str = "t5 t9 t14 t2";
const TURN: &str = "t30 t31 t8 t8 t44 t17 t63 t1 t12 t40 t41 t7";

fn model(seed: u64) -> Model {
    synthetic::full_model(&synthetic::tiny_config(), seed, &cpu()).unwrap()
}

fn quick_recipe(ratio: f64) -> Recipe {
    Recipe { optimizer: OptimizerConfig { lr: 0.05, steps: Some(5), ..OptimizerConfig::default() }, ..Recipe::published(ratio) }
}

/// The span of TURN after the system prompt (4 tokens).
fn span_after_system(model: &Model) -> (KvCache, SpanTargets) {
    let session = Session::new(model, SYSTEM).unwrap();
    let span_ids = model.tokenizer.encode(TURN).unwrap();
    let span = SpanTargets::compute(&model.qwen2, session.cache(), &span_ids, &positions(4, span_ids.len())).unwrap();
    (session.cache().clone(), span)
}

/// Indices (ascending) of the `count` highest scores, ties to the earlier.
fn top(scores: &[f64], count: usize) -> Vec<usize> {
    let mut ranked: Vec<usize> = (0..scores.len()).collect();
    ranked.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut kept = ranked[..count].to_vec();
    kept.sort_unstable();
    kept
}

/// The lowest kept score is strictly above the highest dropped one: the
/// selection is not decided by a tie.
fn assert_clear_cut(scores: &[f64], kept: &[usize]) {
    let least_kept = kept.iter().map(|&i| scores[i]).fold(f64::MAX, f64::min);
    let most_dropped = (0..scores.len()).filter(|i| !kept.contains(i)).map(|i| scores[i]).fold(f64::MIN, f64::max);
    assert!(least_kept > most_dropped, "{scores:?}: {least_kept} vs {most_dropped}");
}

/// Value uniqueness by hand: at each layer, a token's mean L2 distance
/// (over all KV heads) to its previous and next token's V, divided by the
/// layer's mean, summed over layers.
fn value_uniqueness(values: &[Tensor]) -> Vec<f64> {
    let mut total: Vec<f64> = Vec::new();
    for layer in values {
        let heads = layer.squeeze(0).unwrap().to_vec3::<f32>().unwrap(); // [kv][n][d]
        let n = heads[0].len();
        let distance = |a: usize, b: usize| -> f64 {
            heads.iter().flat_map(|h| h[a].iter().zip(&h[b]).map(|(x, y)| ((x - y) as f64).powi(2))).sum::<f64>().sqrt()
        };
        let own: Vec<f64> = (0..n)
            .map(|i| {
                let neighbours: Vec<f64> = [(i > 0).then(|| distance(i - 1, i)), (i + 1 < n).then(|| distance(i, i + 1))].into_iter().flatten().collect();
                neighbours.iter().sum::<f64>() / neighbours.len() as f64
            })
            .collect();
        let mean = own.iter().sum::<f64>() / n as f64;
        total.resize(n, 0.0);
        total.iter_mut().zip(own).for_each(|(t, u)| *t += u / mean);
    }
    total
}

/// Entry `index` of every layer of per-layer (1, kv, n, d) tensors.
fn entry(per_layer: &[Tensor], index: usize) -> Vec<Tensor> {
    per_layer.iter().map(|t| t.narrow(2, index, 1).unwrap()).collect()
}

/// Entries `from..from + count` of every layer.
fn entries(per_layer: &[Tensor], from: usize, count: usize) -> Vec<Tensor> {
    per_layer.iter().map(|t| t.narrow(2, from, count).unwrap()).collect()
}

fn assert_same(a: &[Tensor], b: &[Tensor], bound: f32, what: &str) {
    assert_eq!(a.len(), b.len());
    for (layer, (a, b)) in a.iter().zip(b).enumerate() {
        let diff = max_abs_diff(a, b);
        assert!(diff <= bound, "{what}, layer {layer}: {diff}");
    }
}

#[test]
fn value_uniqueness_ranks_a_token_unlike_its_neighbours_first() {
    let model = model(1);
    // One layer, one head, 5 tokens of dim 2; token 2 stands out.
    let values = Tensor::new(&[[[[0f32, 0.], [0., 0.1], [5., 5.], [0., 0.1], [0., 0.]]]], &cpu()).unwrap();
    let span = SpanTargets {
        ids: vec![1; 5],
        embeddings: model.qwen2.embed(&[1; 5]).unwrap(),
        positions: positions(0, 5),
        keys: vec![values.clone()],
        values: vec![values.clone()],
        surprisal: vec![0.0; 5],
        queries: None,
    };
    let scores = ValueUniqueness {}.score(&model.qwen2, &KvCache::new(), &span, 1).unwrap();
    let by_hand = value_uniqueness(&[values]);
    assert!(scores.iter().zip(&by_hand).all(|(a, b)| (*a as f64 - b).abs() <= 1e-5), "{scores:?} vs {by_hand:?}");
    assert_eq!(ValueUniqueness {}.keep(&model.qwen2, &KvCache::new(), &span, 1).unwrap(), vec![2]);
}

#[test]
fn the_hybrid_keeps_the_most_distinctive_tokens_and_fits_the_rest_around_them() {
    let model = model(3);
    let (prefix, span) = span_after_system(&model);
    let hybrid = Hybrid { settings: HybridSettings { verbatim_share: 0.25 }, recipe: quick_recipe(2.0) };

    // The verbatim tokens: the 3 (25% of 12) with the most distinctive
    // Values, by the test's own count.
    let uniqueness = value_uniqueness(&span.values);
    let verbatim = top(&uniqueness, 3);
    assert_clear_cut(&uniqueness, &verbatim);
    assert_eq!(hybrid.verbatim_tokens(&model, &prefix, &span).unwrap(), verbatim);

    let compressed = hybrid.compress(&model, &prefix, &span, &mut |_, _| {}).unwrap();
    assert_eq!(compressed.len(), budget(12, 2.0).unwrap());
    assert_eq!((compressed.report.n_kept, compressed.report.method.as_str()), (6, "hybrid"));
    assert_eq!(compressed.report.optimization.as_ref().unwrap().steps, 5);
    assert_eq!(compressed.next_position, 16.0);
    // First the chosen tokens' own entries, at their own positions.
    for (slot, &token) in verbatim.iter().enumerate() {
        assert_eq!(compressed.positions[slot], span.positions[token]);
        assert_same(&entry(&compressed.keys, slot), &entry(&span.keys, token), 0.0, "verbatim key");
        assert_same(&entry(&compressed.values, slot), &entry(&span.values, token), 0.0, "verbatim value");
    }

    // Then the other 9 tokens' 3 virtual tokens, fitted after the prefix
    // *and* the verbatim entries: rerun that optimization here, over a
    // context the test builds itself.
    let mut context = prefix.clone();
    let pick = |per_layer: &[Tensor]| -> Vec<Tensor> {
        (0..per_layer.len())
            .map(|layer| Tensor::cat(&verbatim.iter().map(|&i| entry(per_layer, i)[layer].clone()).collect::<Vec<_>>(), 2).unwrap())
            .collect()
    };
    let verbatim_positions: Vec<f32> = verbatim.iter().map(|&i| span.positions[i]).collect();
    context.append(&pick(&span.keys), &pick(&span.values), &verbatim_positions).unwrap();
    let rest: Vec<usize> = (0..12).filter(|i| !verbatim.contains(i)).collect();
    let rest_span = span.select(&rest).unwrap();
    let fit = |after: &KvCache| {
        let start = hybrid.recipe.virtual_start_sized(&model, after, &rest_span, 3).unwrap();
        let optimized = optimize(&model.qwen2, start.objective(after), &start.init, &hybrid.recipe.optimizer, 5, &mut |_, _| {}).unwrap();
        (start.positions, optimized)
    };
    let (virtual_positions, optimized) = fit(&context);
    assert_eq!(&compressed.positions[3..], virtual_positions.as_slice());
    assert!(virtual_positions.iter().all(|p| (span.positions[rest[0]]..=span.positions[rest[8]]).contains(p)));
    let (virtual_keys, virtual_values) = (entries(&compressed.keys, 3, 3), entries(&compressed.values, 3, 3));
    assert_same(&virtual_keys, &optimized.keys, 1e-5, "virtual keys");
    assert_same(&virtual_values, &optimized.values, 1e-5, "virtual values");
    // They are their optimized embeddings' K/V over prefix + verbatim entries...
    let over_context = model.qwen2.forward(&optimized.embeddings, &virtual_positions, Some(&context), Logits::None).unwrap();
    assert_same(&virtual_keys, &over_context.keys, 1e-5, "K over prefix + verbatim");
    assert_same(&virtual_values, &over_context.values, 1e-5, "V over prefix + verbatim");
    // ...not over the prefix alone, and fitted over the prefix alone they
    // would have come out otherwise.
    let over_prefix = model.qwen2.forward(&optimized.embeddings, &virtual_positions, Some(&prefix), Logits::None).unwrap();
    let (_, alone) = fit(&prefix);
    for layer in 1..over_prefix.values.len() {
        assert!(max_abs_diff(&virtual_values[layer], &over_prefix.values[layer]) > 1e-3, "layer {layer}: context made no difference");
        assert!(max_abs_diff(&virtual_values[layer], &alone.values[layer]) > 1e-3, "layer {layer}: fitted as if alone");
    }
}

#[test]
fn compress_then_evict_keeps_the_virtual_tokens_the_span_end_attends_to_most() {
    let model = model(3);
    let (prefix, span) = span_after_system(&model);
    let window = 4;
    let method = CompressThenEvict { settings: CompressEvictSettings { first_ratio: 2.0, window }, recipe: quick_recipe(3.0), ratio: 4.0 };
    let evicted = method.compress(&model, &prefix, &span, &mut |_, _| {}).unwrap();
    assert_eq!(evicted.len(), budget(12, 4.0).unwrap());
    assert_eq!((evicted.report.method.as_str(), evicted.report.n_kept, evicted.next_position), ("compress-evict", 3, 16.0));

    // The first stage: the recipe at 2x (whatever its own ratio).
    let first: CompressedSpan = quick_recipe(2.0).compress(&model, &prefix, &span, &mut |_, _| {}).unwrap();
    assert_eq!(first.len(), 6);
    // The attention the span's last 4 tokens pay each first-stage entry,
    // placed after the prefix and those entries, over layers, heads, rows.
    let mut context = prefix.clone();
    context.append(&first.keys, &first.values, &first.positions).unwrap();
    let observers = span.embeddings.narrow(1, 12 - window, window).unwrap();
    let probabilities = model.qwen2.attention_probabilities(&observers, &span.positions[12 - window..], Some(&context)).unwrap();
    let mut importance = vec![0.0f64; first.len()];
    for layer in &probabilities {
        for head in layer.squeeze(0).unwrap().to_vec3::<f32>().unwrap() {
            for row in head {
                assert_eq!(row.len(), prefix.len() + first.len() + window);
                importance.iter_mut().zip(&row[prefix.len()..prefix.len() + first.len()]).for_each(|(total, p)| *total += *p as f64);
            }
        }
    }
    let kept = top(&importance, 3);
    assert_clear_cut(&importance, &kept);
    let expected_positions: Vec<f32> = kept.iter().map(|&i| first.positions[i]).collect();
    assert_eq!(evicted.positions, expected_positions);
    for (slot, &index) in kept.iter().enumerate() {
        assert_same(&entry(&evicted.keys, slot), &entry(&first.keys, index), 1e-6, "kept key");
        assert_same(&entry(&evicted.values, slot), &entry(&first.values, index), 1e-6, "kept value");
    }

    let backwards = CompressThenEvict { settings: CompressEvictSettings { first_ratio: 4.0, window }, recipe: quick_recipe(2.0), ratio: 2.0 };
    assert!(backwards.compress(&model, &prefix, &span, &mut |_, _| {}).is_err());
}

#[test]
fn every_registered_method_builds_by_name_and_refuses_unknown_knobs() {
    let names: Vec<&str> = METHODS.iter().map(|m| m.name).collect();
    for name in ["surprisal", "uniform", "hybrid", "compress-evict", "snapkv", "key-norm", "streaming", "summary"] {
        assert!(names.contains(&name), "{name} is registered");
    }
    for method in METHODS {
        let built = method.build(&MethodOptions::new(3.2)).unwrap_or_else(|e| panic!("{}: {e}", method.name));
        assert!(built.name().starts_with(method.name), "{} builds {}", method.name, built.name());
        assert_eq!(cram::registry::method(method.name).unwrap().name, method.name);
        assert_eq!(method.recipe(&MethodOptions::new(3.2)).is_some(), ["surprisal", "uniform"].contains(&method.name));

        let options = MethodOptions { knobs: serde_json::json!({ "no_such_knob": 1 }), ..MethodOptions::new(3.2) };
        let error = method.build(&options).err().unwrap_or_else(|| panic!("{} took an unknown knob", method.name));
        let message = error.to_string();
        assert!(message.contains(&format!("method {}", method.name)) && message.contains("no_such_knob"), "{message}");
    }
    // Knobs are the method's own settings, checked.
    let snapkv = cram::registry::method("snapkv").unwrap();
    let options = |knobs| MethodOptions { knobs, ..MethodOptions::new(3.2) };
    assert!(snapkv.build(&options(serde_json::json!({ "window": 8 }))).is_ok());
    let error = snapkv.build(&options(serde_json::json!({ "kernel": 4 }))).err().unwrap().to_string();
    assert!(error.contains("method snapkv") && error.contains("kernel 4"), "{error}");
    let error = cram::registry::method("compress-evict").unwrap().build(&MethodOptions::new(1.5)).err().unwrap().to_string();
    assert!(error.contains("method compress-evict"), "{error}");

    let error = cram::registry::method("no-such-method").err().unwrap().to_string();
    assert!(error.contains("no-such-method") && error.contains("snapkv"), "{error}");
    assert_eq!(cram::registry::init("key-norm", 0).unwrap().name(), "key-norm");
    assert!(cram::registry::init("surprisal", 0).is_err());
}
