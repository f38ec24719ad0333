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
"""

import argparse
import copy
import json
import os
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import DynamicCache


class StopAfterLastValue(Exception):
    """Raised by the last layer's v_proj hook: nothing after it is needed."""


def load(gguf_path):
    directory, name = os.path.split(os.path.abspath(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, tokenizer


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
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        shaped = [v.view(v.shape[0], v.shape[1], kv_heads, head_dim).transpose(1, 2) for v in self.values]
        self.values = []
        return shaped


def run(model, embeds, positions, cache):
    position_ids = torch.tensor([positions], dtype=torch.float32 if any(p != int(p) for p in positions) else torch.long)
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
        embeds = model.model.embed_tokens(torch.tensor([prefix_ids]))
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


def value_loss(values, targets):
    return sum(((v - t) ** 2).mean() / (t**2).mean() for v, t in zip(values, targets))


def optimize(model, capture, cache, init, positions, targets, steps, lr, on_step):
    prefix_length = cache.get_seq_length()
    embeds = init.clone().requires_grad_(True)
    adam = torch.optim.Adam([embeds], lr=lr)
    capture.stop = True
    losses, step_seconds = [], []
    for step in range(steps):
        started = time.perf_counter()
        adam.zero_grad()
        try:
            run(model, embeds, positions, cache)
        except StopAfterLastValue:
            pass
        truncate(cache, prefix_length)
        loss = value_loss(capture.per_layer(), targets)
        loss.backward()
        adam.step()
        step_seconds.append(time.perf_counter() - started)
        losses.append(loss.item())
        on_step(step, losses[-1])
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--ratio", type=float, default=3.2)
    parser.add_argument("--pooling", choices=["surprisal", "uniform"], default="surprisal")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--time-only", action="store_true", help="only time the optimization steps")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

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
    positions = [int(p) for p in np.round(np.linspace(start, start + n - 1, n_virtual))]

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
