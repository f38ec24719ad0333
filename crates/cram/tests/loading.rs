//! Model loading from GGUF and safetensors files, and its errors.

mod common;

use common::{cpu, max_abs_diff, write_gguf, write_safetensors_dir};
use cram::{synthetic, Error, Logits, Model, ModelSource};

const TOKENS: [u32; 5] = [2, 9, 31, 4, 50];

fn logits(model: &Model) -> candle_core::Tensor {
    let positions: Vec<f32> = (0..TOKENS.len()).map(|i| i as f32).collect();
    let embeddings = model.qwen2.embed(&TOKENS).unwrap();
    model.qwen2.forward(&embeddings, &positions, None, Logits::All).unwrap().logits.unwrap()
}

#[test]
fn gguf_and_safetensors_give_the_same_model() -> anyhow::Result<()> {
    let config = synthetic::tiny_config();
    let weights = synthetic::named_weights(&config, 21, &cpu())?;
    let dir = tempfile::tempdir()?;
    let gguf_path = dir.path().join("tiny.gguf");
    write_gguf(&gguf_path, &config, &weights, "qwen2");
    write_safetensors_dir(dir.path(), &config, &weights);

    let from_gguf = Model::load(&ModelSource::gguf(&gguf_path), &cpu())?;
    let from_safetensors = Model::load(&ModelSource::safetensors_dir(dir.path()), &cpu())?;
    // GGUF stores floats as f32.
    let mut expected = from_safetensors.qwen2.config().clone();
    expected.rms_norm_eps = expected.rms_norm_eps as f32 as f64;
    assert_eq!(from_gguf.qwen2.config(), &expected);
    assert!(max_abs_diff(&logits(&from_gguf), &logits(&from_safetensors)) <= 1e-5);
    // The GGUF's own vocabulary became the tokenizer.
    assert_eq!(from_gguf.tokenizer.encode("abc")?, vec![26, 2]);
    Ok(())
}

#[test]
fn a_missing_gguf_is_a_clear_error() {
    let err = Model::load(&ModelSource::gguf("/nonexistent/model.gguf"), &cpu()).unwrap_err();
    assert!(matches!(err, Error::MissingFile(_)), "{err}");
}

#[test]
fn a_truncated_gguf_is_refused_before_loading() -> anyhow::Result<()> {
    let config = synthetic::tiny_config();
    let weights = synthetic::named_weights(&config, 1, &cpu())?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("cut.gguf");
    write_gguf(&path, &config, &weights, "qwen2");
    let full_len = std::fs::metadata(&path)?.len();
    std::fs::OpenOptions::new().write(true).open(&path)?.set_len(full_len * 2 / 3)?;
    let err = Model::load(&ModelSource::gguf(&path), &cpu()).unwrap_err();
    assert!(matches!(err, Error::BadGguf { .. }), "{err}");
    assert!(err.to_string().contains("truncated"), "{err}");

    std::fs::write(&path, b"not a gguf at all")?;
    let err = Model::load(&ModelSource::gguf(&path), &cpu()).unwrap_err();
    assert!(matches!(err, Error::BadGguf { .. }), "{err}");
    Ok(())
}

#[test]
fn a_gguf_of_another_architecture_is_refused() -> anyhow::Result<()> {
    let config = synthetic::tiny_config();
    let weights = synthetic::named_weights(&config, 1, &cpu())?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("llama.gguf");
    write_gguf(&path, &config, &weights, "llama");
    let err = Model::load(&ModelSource::gguf(&path), &cpu()).unwrap_err();
    match err {
        Error::UnsupportedArchitecture { found, .. } => assert_eq!(found, "llama"),
        other => panic!("expected an architecture error, got {other}"),
    }
    Ok(())
}

#[test]
fn a_safetensors_dir_missing_a_weight_names_it() -> anyhow::Result<()> {
    let config = synthetic::tiny_config();
    let mut weights = synthetic::named_weights(&config, 1, &cpu())?;
    weights.remove("model.layers.1.mlp.up_proj.weight");
    let dir = tempfile::tempdir()?;
    write_safetensors_dir(dir.path(), &config, &weights);
    let err = Model::load(&ModelSource::safetensors_dir(dir.path()), &cpu()).unwrap_err();
    assert!(matches!(&err, Error::MissingWeight(name) if name == "model.layers.1.mlp.up_proj.weight"), "{err}");
    Ok(())
}

#[test]
fn tied_embeddings_reuse_the_embedding_matrix() -> anyhow::Result<()> {
    let mut config = synthetic::tiny_config();
    config.tie_word_embeddings = true;
    let weights = synthetic::named_weights(&config, 4, &cpu())?;
    assert!(!weights.contains_key("lm_head.weight"));
    let dir = tempfile::tempdir()?;
    write_safetensors_dir(dir.path(), &config, &weights);
    let model = Model::load(&ModelSource::safetensors_dir(dir.path()), &cpu())?;
    let hidden = model.qwen2.forward(&model.qwen2.embed(&TOKENS)?, &[0.0, 1.0, 2.0, 3.0, 4.0], None, Logits::All)?;
    assert_eq!(hidden.logits.unwrap().dims(), &[1, TOKENS.len(), config.vocab_size]);
    Ok(())
}
