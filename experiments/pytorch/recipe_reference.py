"""The published recipe in PyTorch + transformers, on exactly cram's tokens.

Written for two comparisons (issues 3 and 6): whether cram's results match an
independent implementation of the same method on the same tokens, and how
long one optimization step takes in each.

Input: the JSON written by cram's `case_tokens` example (prefix, span,
suffix and question ids). The model is the same GGUF cram loads,
dequantised to f32 by transformers.

    python recipe_reference.py --tokens t8.json --gguf MODEL.gguf --ratio 3.2 \
        --out t8-3.2.json [--steps N] [--threads 1] [--time-only]

The step is cram's: forward of the virtual embeddings over the prefix cache,
stopped at the last layer's V projection, loss = sum over layers of
MSE(V, target) / mean(target^2), Adam (no weight decay) on the embeddings.

Synthetic mode times that same step at a real model's shapes with random
weights, beside `cram bench --synthetic`: no GGUF, no tokens, one JSON line
per virtual-token count appended to --out as soon as that size is done.

    python recipe_reference.py --synthetic qwen2.5-coder-1.5b \
        --virtual 64,128,256,512,1024 [--prefix 140] [--steps 8] \
        [--device cuda] [--dtype bf16] [--out bench-torch.jsonl]

(`--synthetic tiny` is a 2-layer model for a CPU smoke test.)
"""

import argparse
import copy
import json
import math
import os
import statistics
import time

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
from transformers.cache_utils import DynamicCache

# Qwen2Config fields of the models cram is measured on (their config.json),
# plus a toy one for a CPU smoke test. All share rope_theta 1e6, eps 1e-6.
SHAPES = {
    "qwen2.5-coder-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-coder-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-coder-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                             num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True),
}
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}


class StopAfterLastValue(Exception):
    """Raised by the last layer's v_proj hook: nothing after it is needed."""


def load(gguf_path):
    directory, name = os.path.split(os.path.abspath(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return freeze(model), tokenizer


def freeze(model):
    """Only the virtual embeddings are optimized: backward then computes no
    weight gradients, as in cram."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def synthetic_model(shape, device, dtype):
    """A Qwen2 at `shape` with random weights, allocated on `device` in
    `dtype` from the start: the 7B is 15 GB in bf16, and building it in host
    f32 first would cost 30 GB and minutes of CPU init before the copy."""
    config = Qwen2Config(**SHAPES[shape], rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768,
                         attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return freeze(model)


class ValueCapture:
    """Forward hooks on every layer's v_proj; optionally stops the forward
    after the last one."""

    def __init__(self, model):
        self.layers = model.model.layers
        self.config = model.config
        self.values = []
        self.stop = False
        for index, layer in enumerate(self.layers):
            layer.self_attn.v_proj.register_forward_hook(self._hook(index))

    def _hook(self, index):
        def hook(_module, _inputs, output):
            self.values.append(output)
            if self.stop and index == len(self.layers) - 1:
                raise StopAfterLastValue()

        return hook

    def per_layer(self):
        """Per layer (1, kv_heads, n, head_dim), like cram's."""
        kv_heads = self.config.num_key_value_heads
        shaped = [v.view(v.shape[0], v.shape[1], kv_heads, head_dim(self.config)).transpose(1, 2) for v in self.values]
        self.values = []
        return shaped


def head_dim(config):
    return config.hidden_size // config.num_attention_heads


def run(model, embeds, positions, cache):
    position_ids = torch.tensor([positions], dtype=torch.float32 if any(p != int(p) for p in positions) else torch.long,
                                device=embeds.device)
    return model(inputs_embeds=embeds, position_ids=position_ids, past_key_values=cache, use_cache=True)


def truncate(cache, length):
    """Every layer back to `length` entries (after an early-stopped forward
    the last layer holds fewer than the others)."""
    for layer in cache.layers:
        if layer.is_initialized:
            layer.keys = layer.keys[..., :length, :].detach()
            layer.values = layer.values[..., :length, :].detach()


def prefix_cache(model, prefix_ids):
    cache = DynamicCache()
    if prefix_ids:
        embeds = model.model.embed_tokens(torch.tensor([prefix_ids], device=model.device))
        with torch.no_grad():
            run(model, embeds, list(range(len(prefix_ids))), cache)
    return cache


def targets_and_surprisal(model, capture, cache, span_ids, start):
    embeds = model.model.embed_tokens(torch.tensor([span_ids]))
    with torch.no_grad():
        out = run(model, embeds, list(range(start, start + len(span_ids))), cache)
    values = capture.per_layer()
    log_probs = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)
    picked = log_probs.gather(1, torch.tensor(span_ids[1:]).unsqueeze(1)).squeeze(1)
    surprisal = torch.cat([torch.zeros(1), -picked])
    truncate(cache, start)
    return embeds, values, surprisal


def pooling_matrices(surprisal, n_virtual, pooling):
    n = len(surprisal)
    bounds = np.linspace(0, n, n_virtual + 1).astype(int)
    target = torch.zeros(n_virtual, n)
    mean = torch.zeros(n_virtual, n)
    for j in range(n_virtual):
        a, b = bounds[j], bounds[j + 1]
        weights = torch.softmax(surprisal[a:b], 0) if pooling == "surprisal" else torch.full((b - a,), 1.0 / (b - a))
        target[j, a:b] = weights
        mean[j, a:b] = 1.0 / (b - a)
    return target, mean


def virtual_positions(start, n, n_virtual):
    """The virtual tokens spread evenly over the span's positions."""
    return [int(p) for p in np.round(np.linspace(start, start + n - 1, n_virtual))]


def value_loss(values, targets):
    """In f32 whatever the model's dtype (a no-op for an f32 model): the
    normalised MSE of bf16 V's would round away the small differences."""
    return sum(((v.float() - t.float()) ** 2).mean() / (t.float() ** 2).mean() for v, t in zip(values, targets))


def synchronize(device):
    """Waits for the GPU's queued work, so a wall-clock interval covers it;
    nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(model, capture, cache, prefix_length, embeds, positions, targets, adam):
    """One optimization step; the loss comes back as a tensor, not yet read,
    so the caller decides when to wait for it."""
    adam.zero_grad()
    try:
        # The embeddings and Adam's moments stay f32, as cram keeps them;
        # the model sees them in its own dtype.
        run(model, embeds.to(model.dtype), positions, cache)
    except StopAfterLastValue:
        pass
    truncate(cache, prefix_length)
    loss = value_loss(capture.per_layer(), targets)
    loss.backward()
    adam.step()
    return loss


def optimize(model, capture, cache, init, positions, targets, steps, lr, on_step):
    prefix_length = cache.get_seq_length()
    embeds = init.clone().requires_grad_(True)
    adam = torch.optim.Adam([embeds], lr=lr)
    capture.stop = True
    losses, step_seconds = [], []
    for index in range(steps):
        synchronize(embeds.device)
        started = time.perf_counter()
        loss = step(model, capture, cache, prefix_length, embeds, positions, targets, adam)
        synchronize(embeds.device)
        step_seconds.append(time.perf_counter() - started)
        losses.append(loss.item())
        on_step(index, losses[-1])
    capture.stop = False
    return embeds.detach(), losses, step_seconds


def greedy(model, cache, ids, first_position, max_new_tokens, stop_ids):
    generated = []
    position = first_position
    next_ids = ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            positions = list(range(position, position + len(next_ids)))
            out = model(input_ids=torch.tensor([next_ids]), position_ids=torch.tensor([positions]), past_key_values=cache, use_cache=True)
            position += len(next_ids)
            token = int(out.logits[0, -1].argmax())
            if token in stop_ids:
                break
            generated.append(token)
            next_ids = [token]
    return generated


def recalled(fact, answer):
    answer = answer.lower()
    groups = fact["expect"]
    return bool(groups) and all(any(s.lower() in answer for s in group) for group in groups) and not any(
        s.lower() in answer for s in fact["reject_any"]
    )


def synthetic_inputs(model, n_virtual, generator, embed_std):
    """Init embeddings and V targets for one size. The targets are random
    normal, not the V of a span: a step's time does not depend on their
    values, and real ones would need the span's forward with logits over the
    whole vocabulary, which the step never runs."""
    config = model.config
    init = (torch.randn(1, n_virtual, config.hidden_size, generator=generator) * embed_std).to(model.device, torch.float32)
    shape = (1, config.num_key_value_heads, n_virtual, head_dim(config))
    targets = [torch.randn(shape, generator=generator).to(model.device, model.dtype) for _ in range(config.num_hidden_layers)]
    return init, targets


def measure_size(model, capture, cache, n_virtual, args, generator, embed_std):
    """Times `args.steps` steps at one size; the first half warms up (the
    allocator and the kernels' autotuning settle) and is not counted."""
    device = model.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    prefix_length = cache.get_seq_length()
    span_tokens = int(math.floor(n_virtual * args.ratio + 0.5))  # Rust's f64::round, as cram's bench
    positions = virtual_positions(prefix_length, span_tokens, n_virtual)
    init, targets = synthetic_inputs(model, n_virtual, generator, embed_std)
    _, losses, step_seconds = optimize(model, capture, cache, init, positions, targets, args.steps, args.lr, lambda *_: None)
    timed = step_seconds[args.steps // 2:]
    record = {
        "shape": args.synthetic,
        "n_virtual": n_virtual,
        "prefix_tokens": prefix_length,
        "span_tokens": span_tokens,
        "ratio": args.ratio,
        "dtype": args.dtype,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn_implementation": model.config._attn_implementation,
        "steps": args.steps,
        "warm_up_steps": args.steps // 2,
        "step_seconds": statistics.median(timed),
        "step_seconds_all": step_seconds,
        "losses": losses,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        record["peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        record["device_used_mib"] = (total - free) / 2**20
    return record


def synthetic(args):
    """Times the step at each of `args.virtual` sizes on one random model;
    each size's line is appended and flushed as soon as it is measured, so a
    later size running out of memory keeps the earlier ones."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model = synthetic_model(args.synthetic, device, dtype)
    synchronize(device)
    weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(f"{args.synthetic}: {weights_mib:.0f} MiB of {args.dtype} weights on {device}, built in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    capture = ValueCapture(model)
    generator = torch.Generator().manual_seed(args.seed)
    embed_std = model.model.embed_tokens.weight.float().std().item()
    prefix = torch.randint(model.config.vocab_size, (args.prefix,), generator=generator).tolist()
    cache = prefix_cache(model, prefix)
    capture.per_layer()
    print(f"{'n_virtual':>9} {'span':>5} {'step_s':>9} {'peak_MiB':>9} {'used_MiB':>9}  loss", flush=True)
    out = open(args.out, "a") if args.out else None
    for n_virtual in args.virtual:
        try:
            record = measure_size(model, capture, cache, n_virtual, args, generator, embed_std)
        except torch.cuda.OutOfMemoryError as error:
            record = {"shape": args.synthetic, "n_virtual": n_virtual, "dtype": args.dtype, "error": f"out of memory: {error}"}
        record["weights_mib"] = weights_mib
        if out:
            out.write(json.dumps(record) + "\n")
            out.flush()
            os.fsync(out.fileno())
        if "error" in record:
            print(f"{n_virtual:>9} out of memory; larger sizes skipped", flush=True)
            break
        print(f"{n_virtual:>9} {record['span_tokens']:>5} {record['step_seconds']:>9.4f} "
              f"{record.get('peak_allocated_mib', float('nan')):>9.0f} {record.get('device_used_mib', float('nan')):>9.0f}  "
              f"{record['losses'][0]:.4f} -> {record['losses'][-1]:.4f}", flush=True)


def size_list(text):
    return [int(part) for part in text.split(",") if part]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", help="real mode: cram's case_tokens JSON")
    parser.add_argument("--gguf", help="real mode: the model cram loads")
    parser.add_argument("--ratio", type=float, default=3.2)
    parser.add_argument("--pooling", choices=["surprisal", "uniform"], default="surprisal")
    parser.add_argument("--steps", type=int, default=None,
                        help="real mode: default from the span length; synthetic: 8 per size, the first half warm-up")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--time-only", action="store_true", help="only time the optimization steps")
    parser.add_argument("--out", help="real mode: result JSON (required); synthetic: JSON lines appended")
    parser.add_argument("--synthetic", choices=list(SHAPES), help="time the step on random weights at this shape")
    parser.add_argument("--virtual", type=size_list, default=[64, 128, 256, 512, 1024],
                        help="synthetic: comma-separated virtual token counts")
    parser.add_argument("--prefix", type=int, default=140, help="synthetic: verbatim prefix tokens")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="synthetic: default bf16 on cuda, f32 on cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.synthetic:
        args.steps = 8 if args.steps is None else args.steps
        if args.steps < 2:
            parser.error("--steps: at least 2 in synthetic mode (half are warm-up)")
        if args.dtype is None:
            args.dtype = "bf16" if torch.device(args.device).type == "cuda" else "f32"
        synthetic(args)
        return
    missing = [flag for flag in ("tokens", "gguf", "out") if getattr(args, flag) is None]
    if missing:
        parser.error("without --synthetic these are required: " + ", ".join("--" + flag for flag in missing))
    reference(args)


def reference(args):
    """The real mode: cram's tokens on the GGUF model, then the questions."""
    tokens = json.load(open(args.tokens))
    model, tokenizer = load(args.gguf)
    capture = ValueCapture(model)
    prefix, span, suffix = tokens["prefix"], tokens["span"], tokens["suffix"]
    n = len(span)
    n_virtual = max(int(np.round(n / args.ratio)), 1)
    steps = args.steps if args.steps is not None else max(int(np.round(300 * n / 250)), 100)

    cache = prefix_cache(model, prefix)
    capture.per_layer()
    start = len(prefix)
    span_embeds, span_values, surprisal = targets_and_surprisal(model, capture, cache, span, start)
    target_matrix, mean_matrix = pooling_matrices(surprisal, n_virtual, args.pooling)
    targets = [torch.matmul(target_matrix, v) for v in span_values]
    init = torch.matmul(mean_matrix, span_embeds[0]).unsqueeze(0)
    positions = virtual_positions(start, n, n_virtual)

    def on_step(step, loss):
        if step % 25 == 0:
            print(f"step {step} loss {loss:.4f}", flush=True)

    started = time.perf_counter()
    embeds, losses, step_seconds = optimize(model, capture, cache, init, positions, targets, steps, args.lr, on_step)
    optimize_seconds = time.perf_counter() - started
    result = {
        "case": tokens["case"],
        "ratio": args.ratio,
        "pooling": args.pooling,
        "n_tokens": n,
        "n_virtual": n_virtual,
        "prefix_tokens": len(prefix),
        "steps": steps,
        "threads": args.threads,
        "torch": torch.__version__,
        "seconds_per_step_median": float(np.median(step_seconds)),
        "seconds_per_step_mean_after_first": float(np.mean(step_seconds[1:])) if steps > 1 else step_seconds[0],
        "optimize_seconds": optimize_seconds,
        "loss_curve": losses,
        "surprisal": surprisal.tolist(),
        "hf_tokenizer_agrees": None,
    }
    if not args.time_only:
        # The virtual tokens' K/V join the prefix cache; their loss once more.
        with torch.no_grad():
            run(model, embeds, positions, cache)
        result["loss_final"] = value_loss(capture.per_layer(), targets).item()
        suffix_start = start + n
        if suffix:
            with torch.no_grad():
                model(input_ids=torch.tensor([suffix]), position_ids=torch.tensor([list(range(suffix_start, suffix_start + len(suffix)))]), past_key_values=cache, use_cache=True)
        first_question_position = suffix_start + len(suffix)
        answers, correct, total = [], 0, 0
        for question in tokens["questions"]:
            asked = copy.deepcopy(cache)
            ids = greedy(model, asked, question["ids"], first_question_position, args.max_new_tokens, set(tokens["stop"]))
            answer = tokenizer.decode(ids)
            facts = {fact["id"]: recalled(fact, answer) for fact in question["facts"]}
            correct += sum(facts.values())
            total += len(facts)
            answers.append({"id": question["id"], "answer": answer, "facts": facts})
            print(question["id"], facts, repr(answer[:160]), flush=True)
        result.update({"answers": answers, "facts_correct": correct, "facts_total": total})
        text = tokenizer.decode(prefix + span)
        result["hf_tokenizer_agrees"] = tokenizer(text, add_special_tokens=False)["input_ids"] == prefix + span
    json.dump(result, open(args.out, "w"), indent=1)
    print(f"{args.out}: {result.get('facts_correct')}/{result.get('facts_total')} facts, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
          f"{result['seconds_per_step_median']:.3f} s/step (median)")



if __name__ == "__main__":
    main()
