"""Decoding speed of GPT-2 124M (or SmolLM2-135M's Llama architecture): KV cache vs no cache vs `transformers`.

One process builds the model with random weights (speed does not depend on what the weights
say), copies the same weights into `transformers`' class for it (`GPT2LMHeadModel`, or
`LlamaForCausalLM` with `--model smollm2-135m`: 30 layers, 9 query and 3 key/value heads,
SwiGLU, RoPE), and decodes greedily `--new-tokens` tokens after a short prompt with:

    minigpt, cache      minigpt.generation.generate(..., use_cache=True)   (the default)
    minigpt, no cache   the same with use_cache=False: the whole text goes through every step
    transformers        GPT2LMHeadModel.generate(do_sample=False), its own KV cache

`transformers` gets the model the way users get one: minigpt's export, loaded with
`AutoModelForCausalLM.from_pretrained`; neither side has an end-of-text id, so both produce every
token asked for.
The runs alternate (cache, transformers, then transformers, cache, ...) so that a busy
neighbour slows both alike, and the table reports medians; the slow no-cache run goes once per
length. All three must produce the same tokens, which the script checks.

    python benchmarks/bench_generate.py                       # 128 and 512 tokens, 1 thread, 5 repeats
    python benchmarks/bench_generate.py --threads 2 --new-tokens 128 --device cuda
    python benchmarks/bench_generate.py --model smollm2-135m --new-tokens 128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# SmolLM2-135M's config.json, as published (HuggingFaceTB/SmolLM2-135M).
SMOLLM2_135M = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
                "tie_word_embeddings": True}


def build_models(device: str, model: str = "gpt2"):
    """The architecture as a `GPTModel` with random weights, and the same weights in `transformers`,
    read the way users get a hub model: written as a folder (minigpt's export) and loaded with
    `AutoModelForCausalLM.from_pretrained`, which picks its attention kernel and dtype there."""
    import tempfile

    import torch
    import transformers

    from minigpt.config import model_config
    from minigpt.model import GPTModel, config_from_hf, save_hf_model

    torch.manual_seed(0)
    cfg = config_from_hf(SMOLLM2_135M) if model == "smollm2-135m" else \
        model_config("gpt2-small", qkv_bias=True, tie_weights=True, drop_rate=0.0)
    ours = GPTModel(cfg)
    with tempfile.TemporaryDirectory() as folder:
        save_hf_model(ours, folder)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(folder)
    for config in (theirs.config, theirs.generation_config):  # decode every one of the tokens asked for
        config.eos_token_id = config.bos_token_id = None
    return ours.to(device).eval(), theirs.to(device).eval()


def timed(fn, device: str):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def decode_race(ours, theirs, prompt, n: int, args) -> list[str]:
    """Greedy decoding of `n` tokens: minigpt's cache and `transformers` alternated, then (unless
    skipped) minigpt without its cache once; a table row each, and the per-pair ratios."""
    import torch

    from minigpt.generation import generate

    def minigpt_cached():
        return generate(ours, prompt, n)

    def minigpt_uncached():
        return generate(ours, prompt, n, use_cache=False)

    def hf_greedy():
        with torch.no_grad():
            return theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                   do_sample=False, pad_token_id=0)  # no end-of-text id: all n tokens

    minigpt_cached(), hf_greedy()  # warm-up: allocator, kernels, lazy imports
    times = {"minigpt, KV cache": [], "transformers generate": []}
    outputs = {}
    for repeat in range(args.repeats):
        pair = (("minigpt, KV cache", minigpt_cached), ("transformers generate", hf_greedy))
        for name, fn in (pair if repeat % 2 == 0 else pair[::-1]):
            seconds, outputs[name] = timed(fn, args.device)
            times[name].append(seconds)
            print(f"  {n} tokens, run {repeat + 1}: {name}: {seconds:.2f} s", flush=True)
    if not args.skip_no_cache:
        seconds, outputs["minigpt, no cache"] = timed(minigpt_uncached, args.device)
        times["minigpt, no cache"] = [seconds]
        print(f"  {n} tokens: minigpt, no cache: {seconds:.2f} s", flush=True)
        longest = outputs["minigpt, KV cache"][:, :-1]  # what the last step reads
        with torch.no_grad():
            every, _ = timed(lambda: ours(longest), args.device)
            last, _ = timed(lambda: ours(longest, last_only=True), args.device)
        print(f"  the last uncached step ({longest.shape[1]} tokens in): output head on every position "
              f"{every:.2f} s, on the last only {last:.2f} s ({every / last:.2f}x)", flush=True)
    reference = outputs["minigpt, KV cache"]
    cached = statistics.median(times["minigpt, KV cache"])
    ratios = [h / c for h, c in zip(times["transformers generate"], times["minigpt, KV cache"])]
    rows = []
    for name, runs in times.items():
        seconds = statistics.median(runs)
        if name == "minigpt, KV cache":
            versus = "—"
        elif name == "transformers generate":
            versus = f"{seconds / cached:.2f}× (per pair {min(ratios):.2f}–{max(ratios):.2f}×)"
        else:
            versus = f"{seconds / cached:.2f}×"
        same = "yes" if torch.equal(outputs[name], reference) else "NO"
        label = f"{seconds:.2f} s" + (f" (median of {len(runs)})" if len(runs) > 1 else "")
        rows.append(f"| {n} | {name} | {label} | {n / seconds:.1f} | {versus} | {same} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=lambda text: [int(x) for x in text.split(",")], default=[128, 512],
                        help="comma-separated lengths to decode (default 128,512)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=["gpt2", "smollm2-135m"], default="gpt2",
                        help="the architecture: GPT-2 124M, or SmolLM2-135M's (Llama: RMSNorm, RoPE, SwiGLU, GQA)")
    parser.add_argument("--skip-no-cache", action="store_true", help="leave out the slow uncached runs")
    args = parser.parse_args()

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    ours, theirs = build_models(args.device, args.model)
    prompt = torch.randint(0, ours.cfg.vocab_size, (1, args.prompt_tokens), device=args.device)
    title = "GPT-2 124M" if args.model == "gpt2" else "SmolLM2-135M's architecture (Llama)"
    print(f"{title} (random weights, {ours.num_parameters():,} parameters), greedy, batch 1, "
          f"{args.prompt_tokens}-token prompt | device {args.device}, {args.threads} thread(s), "
          f"torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
    rows = [row for n in args.new_tokens for row in decode_race(ours, theirs, prompt, n, args)]
    print()
    print("| new tokens | decoding | time | tokens/s | time ÷ minigpt's cached time | same tokens |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nmedians of {args.repeats} runs, minigpt and transformers alternating (the order swapped each "
          "round); above 1.00x, minigpt's cached decoding is faster.")


if __name__ == "__main__":
    main()
