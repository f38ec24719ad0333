//! Load a Qwen2 model, put a context into a KV cache, and answer a question
//! over it with greedy decoding: the crate's basic API end to end.
//!
//! cargo run --release -p cram --example answer -- ~/.cache/cram/models/qwen2.5-coder-0.5b-instruct.gguf

use candle_core::Device;
use cram::{generate, KvCache, Logits, Model, ModelSource};

fn main() -> cram::Result<()> {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: answer MODEL.gguf|SAFETENSORS_DIR");
        std::process::exit(2);
    };
    let source = if path.ends_with(".gguf") { ModelSource::gguf(&path) } else { ModelSource::safetensors_dir(&path) };
    let model = Model::load(&source, &Device::Cpu)?;

    // The context: a system prompt and one fact, prefilled into the cache.
    let context = "<|im_start|>system\nYou are a coding agent.<|im_end|>\n\
                   <|im_start|>user\nOur API listens on port 6390.<|im_end|>\n";
    let ids = model.tokenizer.encode(context)?;
    let positions: Vec<f32> = (0..ids.len()).map(|i| i as f32).collect();
    let prefill = model.qwen2.forward(&model.qwen2.embed(&ids)?, &positions, None, Logits::None)?;
    let mut cache = KvCache::new();
    cache.append(&prefill.keys, &prefill.values, &positions)?;

    // The question continues at the next position.
    let question = model.tokenizer.encode("<|im_start|>user\nWhich port does the API use?<|im_end|>\n<|im_start|>assistant\n")?;
    let first = cache.next_position();
    let answer = generate::greedy(&model.qwen2, &mut cache, &question, first, 32, &model.tokenizer.stop_ids())?;
    println!("{}", model.tokenizer.decode(&answer)?);
    Ok(())
}
