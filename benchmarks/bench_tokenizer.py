"""BPE training and encoding speed: minigpt's trainer against the naive algorithm, HF
`tokenizers` (Rust) when installed, and tiktoken for encoding.

Training, for each vocabulary size:
- minigpt's fast trainer (`BPETokenizer.train`: chunk-frequency table, incremental pair
  counts, a heap) on the whole corpus, and on a slice of it;
- the naive trainer (`BPETokenizer.train(..., algorithm="naive")`, the readable reference
  that recounts every pair after every merge, the algorithm of the best-known readable BPE)
  on the same slice, since on the whole corpus it takes many minutes (`--naive-full` does it);
  the two must learn identical merges, and the benchmark checks that they do;
- HF `tokenizers`' byte-level BPE trainer (GPT-2's pre-tokenization, Rust), if installed.
Each time includes pre-tokenization. Encoding: MB/s of GPT-2's vocabulary through minigpt's
BPE (cold: a fresh tokenizer, so its chunk cache starts empty; warm: the cache filled by a
first pass) against tiktoken's, on the whole corpus, checking that the ids are identical.

Everything runs on one thread (HF's trainer is told so through RAYON_NUM_THREADS).

    python benchmarks/bench_tokenizer.py                          # Tiny Shakespeare, vocab 512, 1024, 4096
    python benchmarks/bench_tokenizer.py --naive-chars 200000 --repeats 5
    python benchmarks/bench_tokenizer.py --vocab-sizes 512,1024 --naive-full   # slow: minutes
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before tokenizers loads: one thread, like the rest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"

from minigpt.tokenizer import END_OF_TEXT, BPETokenizer, gpt2_files  # noqa: E402


def seconds(function, repeats: int = 1) -> tuple[float, object]:
    """Median wall time of `repeats` calls, and the last call's result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def train_hf(text: str, vocab_size: int):
    """HF tokenizers' byte-level BPE with GPT-2's pre-tokenization, or None if not installed."""
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    except ImportError:
        return None
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([text], trainer)
    return tokenizer


def load_corpus(path: str | None) -> tuple[str, str]:
    if path is None:
        candidate = SHARED_DATA / "tinyshakespeare.txt"
        if not candidate.is_file():
            sys.exit(f"no corpus: {candidate} is missing; pass --data PATH (e.g. Tiny Shakespeare).")
        path = str(candidate)
    return Path(path).name, Path(path).read_text(encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="UTF-8 corpus (default: ../shared/data/tinyshakespeare.txt)")
    parser.add_argument("--vocab-sizes", default="512,1024,4096")
    parser.add_argument("--naive-chars", type=int, default=100_000,
                        help="characters of the corpus the naive trainer runs on (default 100,000)")
    parser.add_argument("--naive-full", action="store_true", help="run the naive trainer on the whole corpus")
    parser.add_argument("--repeats", type=int, default=3, help="runs per fast/HF/encode timing (median)")
    args = parser.parse_args()

    name, text = load_corpus(args.data)
    sizes = [int(v) for v in args.vocab_sizes.split(",")]
    naive_text = text if args.naive_full else text[:args.naive_chars]
    mb = len(text.encode("utf-8")) / 1e6
    have_hf = train_hf("warm up", 300) is not None
    print(f"Python {sys.version.split()[0]}, 1 thread; corpus {name}: {len(text):,} characters ({mb:.2f} MB); "
          f"HF tokenizers {'installed' if have_hf else 'not installed'}")

    print(f"\nBPE training, seconds (fast and HF: median of {args.repeats}; naive: 1 run)")
    print(f"{'vocab':>6} {'input':>18} {'minigpt fast':>12} {'naive':>9} {'fast vs naive':>13} "
          f"{'same merges':>11} {'HF tokenizers':>13} {'fast vs HF':>10}")
    inputs = [("whole corpus", text)]
    if len(naive_text) < len(text):
        inputs.append((f"first {len(naive_text):,} ch", naive_text))
    for vocab_size in sizes:
        for label, corpus in inputs:
            fast_s, fast = seconds(lambda: BPETokenizer.train(corpus, vocab_size, progress=False), args.repeats)
            naive_cells = f"{'-':>9} {'-':>13} {'-':>11}"
            if corpus is naive_text:
                naive_s, naive = seconds(lambda: BPETokenizer.train(corpus, vocab_size, algorithm="naive"))
                same = "yes" if list(naive.merges.items()) == list(fast.merges.items()) else "NO"
                naive_cells = f"{naive_s:>9.2f} {naive_s / fast_s:>12.0f}x {same:>11}"
            hf_cells = f"{'-':>13} {'-':>10}"
            if have_hf:
                hf_s, _ = seconds(lambda: train_hf(corpus, vocab_size), args.repeats)
                hf_cells = f"{hf_s:>13.2f} {hf_s / fast_s:>9.2f}x"
            print(f"{vocab_size:>6} {label:>18} {fast_s:>12.2f} {naive_cells} {hf_cells}")
    print("'fast vs naive' = naive time / fast time on the same input; 'fast vs HF' = HF time / fast time "
          "(below 1: HF is faster).")

    print(f"\nencoding the whole corpus with GPT-2's vocabulary (50,257 tokens), median of {args.repeats}")
    import tiktoken

    reference = tiktoken.get_encoding("gpt2")
    files = gpt2_files()
    tiktoken_s, expected = seconds(lambda: reference.encode(text), args.repeats)
    fresh = iter([BPETokenizer.from_gpt2(*files) for _ in range(args.repeats)])  # loaded outside the timing
    cold_s, cold_ids = seconds(lambda: next(fresh).encode(text), args.repeats)
    warm = BPETokenizer.from_gpt2(*files)
    warm.encode(text)
    warm_s, warm_ids = seconds(lambda: warm.encode(text), args.repeats)
    print(f"{'encoder':<32} {'MB/s':>7} {'vs tiktoken':>11} {'same ids':>8}")
    for label, elapsed, ids in (("tiktoken gpt2 (Rust)", tiktoken_s, expected),
                                ("minigpt BPE, cold chunk cache", cold_s, cold_ids),
                                ("minigpt BPE, warm chunk cache", warm_s, warm_ids)):
        same = "yes" if ids == expected else "NO"
        print(f"{label:<32} {mb / elapsed:>7.2f} {tiktoken_s / elapsed:>10.2f}x {same:>8}")


if __name__ == "__main__":
    main()
