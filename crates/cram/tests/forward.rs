//! The differentiable forward on a small random-weight Qwen2, against two
//! independent implementations (candle-transformers' qwen2 for logits, a
//! naive f64 reference for every layer's K, V and attention), position
//! behaviour, prefix caching and decoding. Gradients: `gradient.rs`.

mod common;

use candle_core::{Tensor, Var, D};
use common::reference::{heads_of, max_diff_3, Reference};
use common::{candle_transformers_logits, cpu, max_abs_diff, write_safetensors_dir};
use cram::{generate, synthetic, KvCache, Logits, Model, ModelSource, RowEntries};

const TOKENS: [u32; 9] = [3, 17, 42, 8, 8, 60, 1, 33, 21];

fn positions(start: f32, n: usize) -> Vec<f32> {
    (0..n).map(|i| start + i as f32).collect()
}

#[test]
fn logits_match_candle_transformers_qwen2() -> anyhow::Result<()> {
    let config = synthetic::tiny_config();
    let weights = synthetic::named_weights(&config, 7, &cpu())?;

    // Ours, loaded through the safetensors-directory path.
    let dir = tempfile::tempdir()?;
    write_safetensors_dir(dir.path(), &config, &weights);
    let ours = Model::load(&ModelSource::safetensors_dir(dir.path()), &cpu())?;
    let embeddings = ours.qwen2.embed(&TOKENS)?;
    let our_logits = ours.qwen2.forward(&embeddings, &positions(0.0, TOKENS.len()), None, Logits::All)?.logits.unwrap();

    let diff = max_abs_diff(&our_logits, &candle_transformers_logits(&config, &weights, &TOKENS));
    assert!(diff <= 1e-4, "max abs logit difference {diff}");
    Ok(())
}

/// Every layer's K and V, stopping after the last K/V projection (no
/// logits) or running to the logits, against the naive reference; the
/// logits too. Fractional positions with gaps, as virtual tokens have.
#[test]
fn every_layer_matches_a_naive_reference() -> anyhow::Result<()> {
    let config = synthetic::tiny_config();
    let weights = synthetic::named_weights(&config, 9, &cpu())?;
    let model = synthetic::model(&config, 9, &cpu())?;
    let reference = Reference::new(&config, &weights);
    let at = [0.0f32, 1.0, 2.5, 4.0, 4.5, 9.0, 10.0, 11.25, 30.0];
    let expected = reference.forward(&TOKENS, &at);
    for logits in [Logits::None, Logits::All] {
        let output = model.forward(&model.embed(&TOKENS)?, &at, None, logits)?;
        assert_eq!(output.logits.is_some(), logits == Logits::All);
        for layer in 0..config.num_hidden_layers {
            let key_diff = max_diff_3(&heads_of(&output.keys[layer]), &expected.keys[layer], 0);
            let value_diff = max_diff_3(&heads_of(&output.values[layer]), &expected.values[layer], 0);
            assert!(key_diff <= 1e-4 && value_diff <= 1e-4, "{logits:?} layer {layer}: K {key_diff}, V {value_diff}");
        }
        if let Some(ours) = output.logits {
            let ours = ours.squeeze(0)?.to_dtype(candle_core::DType::F64)?.to_vec2::<f64>()?;
            let diff = ours.iter().flatten().zip(expected.logits.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            assert!(diff <= 1e-4, "logits differ by {diff}");
        }
    }
    Ok(())
}

/// The cache a forward without logits leaves (its last layer stops at the
/// K/V projections) is what the model needs to go on: continued over it,
/// the next tokens' logits are candle-transformers' over the whole sequence.
#[test]
fn a_cache_filled_without_logits_continues_as_candle_transformers_does() -> anyhow::Result<()> {
    let config = synthetic::tiny_config();
    let weights = synthetic::named_weights(&config, 11, &cpu())?;
    let model = synthetic::model(&config, 11, &cpu())?;
    let split = 5;
    let prefix = model.forward(&model.embed(&TOKENS[..split])?, &positions(0.0, split), None, Logits::None)?;
    assert!(prefix.logits.is_none());
    let mut cache = KvCache::new();
    cache.append(&prefix.keys, &prefix.values, &positions(0.0, split))?;
    let rest = &TOKENS[split..];
    let continued = model.forward(&model.embed(rest)?, &positions(split as f32, rest.len()), Some(&cache), Logits::All)?;
    let expected = candle_transformers_logits(&config, &weights, &TOKENS).narrow(1, split, rest.len())?;
    let diff = max_abs_diff(&continued.logits.unwrap(), &expected);
    assert!(diff <= 1e-4, "max abs logit difference {diff}");
    Ok(())
}

/// Each layer's attention rows of new tokens over a prefix cache against
/// the reference's softmax over the whole sequence (cache columns first):
/// distributions, causal, and the right ones.
#[test]
fn attention_probabilities_are_the_reference_softmax_rows() -> anyhow::Result<()> {
    let config = synthetic::tiny_config();
    let weights = synthetic::named_weights(&config, 13, &cpu())?;
    let model = synthetic::model(&config, 13, &cpu())?;
    let at = [0.0f32, 1.0, 2.0, 3.0, 4.0, 5.5, 7.0, 9.25, 10.0];
    let split = 4;
    let prefix = model.forward(&model.embed(&TOKENS[..split])?, &at[..split], None, Logits::None)?;
    let mut cache = KvCache::new();
    cache.append(&prefix.keys, &prefix.values, &at[..split])?;
    let probabilities = model.attention_probabilities(&model.embed(&TOKENS[split..])?, &at[split..], Some(&cache))?;
    let expected = Reference::new(&config, &weights).forward(&TOKENS, &at).probabilities;
    assert_eq!(probabilities.len(), config.num_hidden_layers);
    for (layer, ours) in probabilities.iter().enumerate() {
        assert_eq!(ours.dims(), &[1, config.num_attention_heads, TOKENS.len() - split, TOKENS.len()]);
        let ours = heads_of(ours);
        let diff = max_diff_3(&ours, &expected[layer], split);
        assert!(diff <= 1e-5, "layer {layer}: {diff}");
        for (head, rows) in ours.iter().enumerate() {
            for (i, row) in rows.iter().enumerate() {
                assert!((row.iter().sum::<f64>() - 1.0).abs() <= 1e-5, "layer {layer} head {head} row {i}");
                assert!(row[split + i + 1..].iter().all(|&p| p == 0.0), "row {i} sees the future");
            }
        }
    }
    Ok(())
}

#[test]
fn shifting_positions_keeps_values_and_moves_keys() -> anyhow::Result<()> {
    let model = synthetic::model(&synthetic::tiny_config(), 3, &cpu())?;
    let embeddings = model.embed(&TOKENS)?;
    let at_zero = model.forward(&embeddings, &positions(0.0, TOKENS.len()), None, Logits::None)?;
    let shifted = model.forward(&embeddings, &positions(37.5, TOKENS.len()), None, Logits::None)?;
    for layer in 0..model.config().num_hidden_layers {
        let value_diff = max_abs_diff(&at_zero.values[layer], &shifted.values[layer]);
        let key_diff = max_abs_diff(&at_zero.keys[layer], &shifted.keys[layer]);
        assert!(value_diff <= 1e-5, "layer {layer}: V moved by {value_diff}");
        assert!(key_diff > 1e-2, "layer {layer}: K did not move ({key_diff})");
    }
    Ok(())
}

#[test]
fn forward_over_a_prefix_cache_equals_one_forward_over_the_whole() -> anyhow::Result<()> {
    let model = synthetic::model(&synthetic::tiny_config(), 5, &cpu())?;
    let split = 4;
    let whole = model.forward(&model.embed(&TOKENS)?, &positions(0.0, TOKENS.len()), None, Logits::All)?;

    let prefix = model.forward(&model.embed(&TOKENS[..split])?, &positions(0.0, split), None, Logits::All)?;
    let mut cache = KvCache::new();
    cache.append(&prefix.keys, &prefix.values, &positions(0.0, split))?;
    let rest = &TOKENS[split..];
    let continued =
        model.forward(&model.embed(rest)?, &positions(split as f32, rest.len()), Some(&cache), Logits::All)?;

    for layer in 0..model.config().num_hidden_layers {
        let whole_keys = whole.keys[layer].narrow(2, split, rest.len())?;
        let whole_values = whole.values[layer].narrow(2, split, rest.len())?;
        assert!(max_abs_diff(&whole_keys, &continued.keys[layer]) <= 1e-5);
        assert!(max_abs_diff(&whole_values, &continued.values[layer]) <= 1e-5);
    }
    let whole_logits = whole.logits.unwrap().narrow(1, split, rest.len())?;
    assert!(max_abs_diff(&whole_logits, &continued.logits.unwrap()) <= 1e-4);
    Ok(())
}

#[test]
fn stock_candle_softmax_drops_the_gradient_that_ours_keeps() -> anyhow::Result<()> {
    // Why crate::ops exists: the fused op has no backward here.
    let x = Var::new(&[[0.3f32, -1.2, 2.0]], &cpu())?;
    let weights = Tensor::new(&[[1.0f32, 2.0, 3.0]], &cpu())?;
    let stock = candle_nn::ops::softmax_last_dim(x.as_tensor())?.mul(&weights)?.sum_all()?;
    let stock_grad = stock.backward().map(|g| g.get(x.as_tensor()).is_some()).unwrap_or(false);
    let ours = cram::model::ops::softmax_last_dim(x.as_tensor())?.mul(&weights)?.sum_all()?;
    let our_grad = ours.backward()?.get(x.as_tensor()).unwrap().sqr()?.sum_all()?.to_scalar::<f32>()?;
    assert!(!stock_grad, "stock softmax now backpropagates; crate::ops may be simplified");
    assert!(our_grad > 0.0);
    Ok(())
}

#[test]
fn greedy_decoding_over_the_cache_matches_recomputing_from_scratch() -> anyhow::Result<()> {
    let model = synthetic::model(&synthetic::tiny_config(), 13, &cpu())?;
    let mut cache = KvCache::new();
    let answer = generate::greedy(&model, &mut cache, &TOKENS, 0.0, 6, &[])?;
    assert_eq!(answer.len(), 6);
    assert_eq!(cache.len(), TOKENS.len() + 5, "the last token is decoded, not fed");

    let mut sequence = TOKENS.to_vec();
    for expected in &answer {
        let output = model.forward(&model.embed(&sequence)?, &positions(0.0, sequence.len()), None, Logits::Last)?;
        let next = output.logits.unwrap().squeeze(0)?.squeeze(0)?.argmax(D::Minus1)?.to_scalar::<u32>()?;
        assert_eq!(next, *expected);
        sequence.push(next);
    }
    let stopped = generate::greedy(&model, &mut KvCache::new(), &TOKENS, 0.0, 6, &[answer[0]])?;
    assert!(stopped.is_empty(), "a stop token ends decoding before it is emitted");
    Ok(())
}

/// A cache of `TOKENS`, its entries carrying random logit biases if
/// `biased`, and that cache followed by each prompt, as decoding several
/// answers starts.
fn shared_and_prompted(model: &cram::Qwen2, prompts: &[Vec<u32>], biased: bool) -> anyhow::Result<(KvCache, Vec<KvCache>)> {
    let output = model.forward(&model.embed(&TOKENS)?, &positions(0.0, TOKENS.len()), None, Logits::None)?;
    let kv_heads = output.keys[0].dim(1)?;
    let biases = (0..output.keys.len())
        .map(|_| Tensor::randn(0f32, 1.0, (1, kv_heads, TOKENS.len()), &cpu()))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut shared = KvCache::new();
    shared.append_biased(&output.keys, &output.values, biased.then_some(biases.as_slice()), &positions(0.0, TOKENS.len()))?;
    let prompted = prompts
        .iter()
        .map(|prompt| {
            let mut own = shared.clone();
            let at = positions(shared.next_position(), prompt.len());
            let output = model.forward(&model.embed(prompt)?, &at, Some(&shared), Logits::None)?;
            own.append(&output.keys, &output.values, &at)?;
            Ok(own)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((shared, prompted))
}

/// The rows' own entries (each prompted cache past the shared one)
/// stacked, the shorter rows padded with noise (not zeros: only the padding
/// mask may hide them).
fn own_entries_padded_with_noise(shared: &KvCache, prompted: &[KvCache]) -> anyhow::Result<RowEntries> {
    let entries = prompted.iter().map(|cache| cache.len() - shared.len()).max().unwrap();
    let own_part = |tensor: &Tensor| -> anyhow::Result<Tensor> {
        let (_, kv_heads, held, head_dim) = tensor.dims4()?;
        let own = tensor.narrow(2, shared.len(), held - shared.len())?;
        if own.dim(2)? == entries {
            return Ok(own);
        }
        let noise = Tensor::randn(0f32, 3.0, (1, kv_heads, entries - own.dim(2)?, head_dim), &cpu())?;
        Ok(Tensor::cat(&[&own, &noise], 2)?)
    };
    let stack = |part: fn(&KvCache) -> &[Tensor], layer: usize| -> anyhow::Result<Tensor> {
        Ok(Tensor::cat(&prompted.iter().map(|c| own_part(&part(c)[layer])).collect::<anyhow::Result<Vec<_>>>()?, 0)?)
    };
    let layers = shared.num_layers();
    let padding: Vec<f32> = prompted
        .iter()
        .flat_map(|c| (0..entries).map(move |e| if e < c.len() - shared.len() { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Ok(RowEntries::new(
        (0..layers).map(|l| stack(KvCache::keys, l)).collect::<anyhow::Result<_>>()?,
        (0..layers).map(|l| stack(KvCache::values, l)).collect::<anyhow::Result<_>>()?,
        Tensor::from_vec(padding, (prompted.len(), entries), &cpu())?,
    )?)
}

/// Rows of different lengths, each at its own position, in one forward:
/// each row's logits and new K/V are those of its own forward alone, the
/// shared cache read once for all rows (with and without logit biases on
/// its entries), the other rows' entries and the padding unseen.
#[test]
fn rows_decoded_together_match_each_row_alone() -> anyhow::Result<()> {
    let model = synthetic::model(&synthetic::tiny_config(), 13, &cpu())?;
    let prompts = vec![vec![5, 6, 7, 8, 9], vec![11, 12], vec![20, 21, 22, 23, 24, 25, 26]];
    for biased in [true, false] {
        let (shared, prompted) = shared_and_prompted(&model, &prompts, biased)?;
        let own = own_entries_padded_with_noise(&shared, &prompted)?;
        let next_tokens = [4u32, 9, 31];
        let row_positions: Vec<f32> = prompts.iter().map(|p| shared.next_position() + p.len() as f32 + 0.5).collect();

        let embeddings = model.embed(&next_tokens)?.transpose(0, 1)?.contiguous()?;
        let together = model.forward_rows(&embeddings, &row_positions, Some(&shared), &own, Logits::Last)?;
        for (row, own) in prompted.iter().enumerate() {
            let alone = model.forward(&model.embed(&next_tokens[row..=row])?, &row_positions[row..=row], Some(own), Logits::Last)?;
            let logits_diff = max_abs_diff(&together.logits.as_ref().unwrap().narrow(0, row, 1)?, alone.logits.as_ref().unwrap());
            assert!(logits_diff <= 1e-4, "biased {biased}, row {row}: logits differ by {logits_diff}");
            for (layer, (keys, alone_keys)) in together.keys.iter().zip(&alone.keys).enumerate() {
                let diff = max_abs_diff(&keys.narrow(0, row, 1)?, alone_keys);
                assert!(diff <= 1e-4, "biased {biased}, row {row}, layer {layer}: new key differs by {diff}");
            }
        }
    }
    Ok(())
}

/// A layer's logit biases must cover its cached entries exactly: one
/// short would bias the wrong columns.
#[test]
fn biases_of_another_length_than_the_cache_are_an_error() -> anyhow::Result<()> {
    let model = synthetic::model(&synthetic::tiny_config(), 13, &cpu())?;
    let cached = model.forward(&model.embed(&TOKENS)?, &positions(0.0, TOKENS.len()), None, Logits::None)?;
    let kv_heads = cached.keys[0].dim(1)?;
    let result = model.forward_layer_by_layer(&model.embed(&[3, 4])?, &positions(TOKENS.len() as f32, 2), TOKENS.len(), |layer, _| {
        let short_bias = Tensor::zeros((1, kv_heads, TOKENS.len() - 1), candle_core::DType::F32, &cpu())?;
        Ok((cached.keys[layer].clone(), cached.values[layer].clone(), Some(short_bias)))
    });
    let error = result.expect_err("a bias one short of the cache must be refused").to_string();
    assert!(error.contains("logit biases"), "{error}");
    Ok(())
}

/// `answer` up to (not including) its first token in `stop`.
fn cut_at_stop(answer: &[u32], stop: &[u32]) -> Vec<u32> {
    answer.iter().take_while(|token| !stop.contains(token)).copied().collect()
}

/// Two stop tokens, the first token of one answer and a token met later in
/// another, chosen from the unstopped answers so that one row stops at once,
/// one mid-way and one runs to the cap of `cap` tokens. Chosen, not fixed,
/// because which tokens a random model repeats depends on its weights.
fn stops_ending_rows_at_different_steps(unstopped: &[Vec<u32>], cap: usize) -> Option<[u32; 2]> {
    let at_once = unstopped.iter().filter_map(|answer| answer.first().copied());
    let later: Vec<u32> = unstopped.iter().flat_map(|answer| answer.iter().skip(1).copied()).collect();
    at_once
        .flat_map(|first| later.iter().map(move |&mid| [first, mid]))
        .find(|stop| {
            let lengths: Vec<usize> = unstopped.iter().map(|answer| cut_at_stop(answer, stop).len()).collect();
            lengths.contains(&0) && lengths.contains(&cap) && lengths.iter().any(|length| (1..cap).contains(length))
        })
}

/// Answers decoded together are the answers decoded one at a time (in
/// f64, where summation order cannot flip a token), rows finishing at
/// different steps: at a stop token, at the length cap, or at once.
#[test]
fn answers_decoded_together_are_those_decoded_one_at_a_time() -> anyhow::Result<()> {
    let config = synthetic::tiny_config();
    let model = synthetic::model_from_weights(&config, &synthetic::named_weights(&config, 13, &cpu())?, &cpu(), candle_core::DType::F64)?;
    let prompts = vec![vec![5, 6, 7, 8, 9], vec![11, 12], vec![20, 21, 22, 23, 24, 25, 26], vec![40]];
    let (shared, _) = shared_and_prompted(&model, &prompts, true)?;
    let first = shared.next_position();
    let one_at_a_time = |stop: &[u32]| -> anyhow::Result<Vec<Vec<u32>>> {
        prompts.iter().map(|p| Ok(generate::greedy(&model, &mut shared.clone(), p, first, 8, stop)?)).collect()
    };
    let unstopped = one_at_a_time(&[])?;
    let stop = stops_ending_rows_at_different_steps(&unstopped, 8)
        .unwrap_or_else(|| panic!("no two stop tokens end one row at once, one mid-way and leave one to the cap: {unstopped:?}"));
    let alone = one_at_a_time(&stop)?;
    assert_eq!(alone, unstopped.iter().map(|answer| cut_at_stop(answer, &stop)).collect::<Vec<_>>(), "stop tokens {stop:?}");
    let together = generate::greedy_together(&model, &shared, &prompts, first, 8, &stop)?;
    assert_eq!(together, alone);
    assert_eq!(generate::greedy_together(&model, &shared, &prompts, first, 8, &[])?, unstopped);
    // The edges: no tokens, one token, no prompts, one prompt.
    assert_eq!(generate::greedy_together(&model, &shared, &prompts, first, 0, &[])?, vec![Vec::<u32>::new(); prompts.len()]);
    let first_tokens: Vec<Vec<u32>> = unstopped.iter().map(|answer| answer[..1].to_vec()).collect();
    assert_eq!(generate::greedy_together(&model, &shared, &prompts, first, 1, &[])?, first_tokens);
    assert!(generate::greedy_together(&model, &shared, &[], first, 8, &[])?.is_empty());
    assert_eq!(generate::greedy_together(&model, &shared, &prompts[1..2], first, 8, &stop)?, alone[1..2].to_vec());
    // No shared cache: each row attends to its own entries only.
    let empty = KvCache::new();
    let without_cache = prompts.iter().map(|p| generate::greedy(&model, &mut empty.clone(), p, 0.0, 8, &[])).collect::<Result<Vec<_>, _>>()?;
    assert_eq!(generate::greedy_together(&model, &empty, &prompts, 0.0, 8, &[])?, without_cache);
    Ok(())
}
