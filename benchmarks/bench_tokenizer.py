"""BPE training and encoding speed, minigpt against the real libraries, side by side in one run.

Training: minigpt's `BPETokenizer.train(text, vocab_size)` against Hugging Face `tokenizers`'
byte-level BPE trainer as its documentation sets it up (GPT-2's ByteLevel pre-tokenizer, a
`BpeTrainer`, `train_from_iterator`), on the-verdict (20 KB) and Tiny Shakespeare (1.1 MB).
Both times include pre-tokenization. The merges are checked: minigpt's equal its readable
naive trainer's (`algorithm="naive"`, on the 20 KB text, where it takes seconds), and the
column "= HF" counts the first merges that equal HF's, in order (the two break ties between
equally frequent pairs differently: HF takes the smaller pair, minigpt the greater bytes).

Encoding: `encode_ordinary` of the whole text with GPT-2's vocabulary, minigpt's BPE (cold: a
fresh tokenizer, its chunk cache empty; warm: the cache filled by an earlier pass) against
tiktoken's "gpt2", checking that the ids are identical.

The timings alternate (minigpt, peer, peer, minigpt, ...) so that both see the same noise, and
each figure is a median. Everything runs on one thread: HF's trainer with
TOKENIZERS_PARALLELISM=false (its one-thread path; RAYON_NUM_THREADS=1 alone still hands the
work to a pool thread, slower on a busy machine).

    python benchmarks/bench_tokenizer.py                  # both texts, vocab 512 and 1024 (about a minute)
    python benchmarks/bench_tokenizer.py --vocab-sizes 512,1024,4096 --repeats 9
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # before tokenizers loads: one thread
os.environ.setdefault("RAYON_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"

from minigpt.tokenizer import END_OF_TEXT, BPETokenizer, bytes_to_unicode, gpt2_files  # noqa: E402


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def race(ours, theirs, repeats: int) -> tuple[float, float, object, object]:
    """Median seconds of `ours` and `theirs`, run alternately (ABBA...), and their last results."""
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    results = {}
    for i in range(repeats):
        order = [("ours", ours), ("theirs", theirs)]
        for name, function in order if i % 2 == 0 else order[::-1]:
            elapsed, results[name] = timed(function)
            times[name].append(elapsed)
    return (statistics.median(times["ours"]), statistics.median(times["theirs"]),
            results["ours"], results["theirs"])


def train_hf(text: str, vocab_size: int):
    """HF tokenizers' byte-level BPE, set up as its documentation does for GPT-2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([text], trainer)
    return tokenizer


def merges_equal_to_hf(ours: BPETokenizer, hf) -> int:
    """How many of the first merges are the same pair of tokens in both, in the same order."""
    char_of = bytes_to_unicode()
    as_text = ["".join(char_of[b] for b in ours.vocab[left]) + " " + "".join(char_of[b] for b in ours.vocab[right])
               for left, right in ours.merges]
    theirs = [m if isinstance(m, str) else " ".join(m) for m in json.loads(hf.to_str())["model"]["merges"]]
    same = 0
    while same < min(len(as_text), len(theirs)) and as_text[same] == theirs[same]:
        same += 1
    return same


def load_corpora(paths: list[str] | None) -> list[tuple[str, str]]:
    if not paths:
        paths = [str(ROOT / "the-verdict.txt"), str(SHARED_DATA / "tinyshakespeare.txt")]
    for path in paths:
        if not Path(path).is_file():
            sys.exit(f"no corpus at {path}; pass --data PATH [PATH ...] (e.g. Tiny Shakespeare).")
    return [(Path(path).name, Path(path).read_text(encoding="utf-8")) for path in paths]


def bench_training(corpora, sizes: list[int], repeats: int, naive_chars: int) -> None:
    print(f"\nBPE training, seconds (median of {repeats}, alternating)")
    print(f"{'text':<20} {'vocab':>6} {'minigpt':>9} {'HF tokenizers':>13} {'minigpt vs HF':>13} "
          f"{'= naive':>8} {'= HF':>9}")
    for name, text in corpora:
        for vocab_size in sizes:
            ours_s, hf_s, ours, hf = race(lambda: BPETokenizer.train(text, vocab_size), lambda: train_hf(text, vocab_size),
                                          repeats)
            naive = "-"
            if len(text) <= naive_chars:
                reference = BPETokenizer.train(text, vocab_size, algorithm="naive")
                naive = "yes" if list(reference.merges.items()) == list(ours.merges.items()) else "NO"
            same = f"{merges_equal_to_hf(ours, hf)}/{len(ours.merges)}"
            print(f"{name:<20} {vocab_size:>6} {ours_s:>9.4f} {hf_s:>13.4f} {hf_s / ours_s:>12.2f}x {naive:>8} {same:>9}")
    print("'minigpt vs HF' = HF time / minigpt time (above 1: minigpt is faster); '= naive': the same merges "
          "as the naive trainer; '= HF': first merges equal to HF's.")


def bench_encoding(corpora, repeats: int) -> None:
    import tiktoken

    reference = tiktoken.get_encoding("gpt2")
    reference.encode_ordinary(corpora[0][1])  # its first call builds what it keeps: outside the timing
    files = gpt2_files()
    print(f"\nencoding with GPT-2's vocabulary (encode_ordinary), MB/s (median of {repeats}, alternating)")
    print(f"{'text':<20} {'tiktoken':>9} {'minigpt cold':>12} {'cold vs tiktoken':>16} {'minigpt warm':>12} "
          f"{'warm vs tiktoken':>16} {'same ids':>8}")
    for name, text in corpora:
        mb = len(text.encode("utf-8")) / 1e6
        fresh = iter([BPETokenizer.from_gpt2(*files) for _ in range(repeats)])  # loaded outside the timing
        cold_s, tiktoken_s, cold_ids, expected = race(lambda: next(fresh).encode_ordinary(text),
                                                      lambda: reference.encode_ordinary(text), repeats)
        warm = BPETokenizer.from_gpt2(*files)
        warm.encode_ordinary(text)
        warm_s, tiktoken_warm_s, warm_ids, _ = race(lambda: warm.encode_ordinary(text),
                                                    lambda: reference.encode_ordinary(text), repeats)
        same = "yes" if cold_ids == expected and warm_ids == expected else "NO"
        print(f"{name:<20} {mb / tiktoken_s:>9.2f} {mb / cold_s:>12.2f} {tiktoken_s / cold_s:>15.2f}x "
              f"{mb / warm_s:>12.2f} {tiktoken_warm_s / warm_s:>15.2f}x {same:>8}")
    print("'vs tiktoken' = tiktoken time / minigpt time, each against the tiktoken runs it alternated with.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", help="UTF-8 texts (default: the-verdict.txt and "
                                                  "../shared/data/tinyshakespeare.txt)")
    parser.add_argument("--vocab-sizes", default="512,1024")
    parser.add_argument("--repeats", type=int, default=7, help="runs of each side per timing (median)")
    parser.add_argument("--naive-chars", type=int, default=30_000,
                        help="check against the naive trainer on texts up to this many characters")
    args = parser.parse_args()

    import tiktoken
    import tokenizers

    corpora = load_corpora(args.data)
    sizes = [int(v) for v in args.vocab_sizes.split(",")]
    described = ", ".join(f"{name} ({len(text.encode('utf-8')) / 1e6:.2f} MB)" for name, text in corpora)
    print(f"Python {sys.version.split()[0]}, one thread; tokenizers {tokenizers.__version__}, "
          f"tiktoken {tiktoken.__version__}; texts: {described}")
    train_hf("warm up the library", 300)
    bench_training(corpora, sizes, args.repeats, args.naive_chars)
    bench_encoding(corpora, args.repeats)


if __name__ == "__main__":
    main()
