"""Decoding rules checked against hand-computed cases, plain loops written another way,
brute force, and `transformers`' logits processors."""

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from minigpt.config import ConfigError
from minigpt.generation import (apply_repetition_penalty, beam_search, filter_logits, generate, generate_text,
                                stream_text)
from minigpt.model import GPTModel


class CountingCache:
    """Stands in for a KVCache in FixedLogits: it only counts the positions seen."""

    def __init__(self, max_tokens):
        self.length, self.max_tokens = 0, max_tokens

    def reset(self):
        self.length = 0

    def reorder(self, rows):
        pass


class FixedLogits(torch.nn.Module):
    """A stand-in model whose next-token scores are chosen by a function of (row, length)."""

    def __init__(self, score_fn, vocab_size=6, context_length=32):
        super().__init__()
        self.cfg = SimpleNamespace(context_length=context_length, vocab_size=vocab_size)
        self.score_fn = score_fn
        self.vocab_size = vocab_size
        self.weight = torch.nn.Parameter(torch.zeros(1))  # generate_text finds the device from a parameter

    def new_kv_cache(self, batch_size, max_tokens=None):
        return CountingCache(min(max_tokens or self.cfg.context_length, self.cfg.context_length))

    def forward(self, idx, cache=None, last_only=False):
        batch, num_tokens = idx.shape
        length = num_tokens + (cache.length if cache is not None else 0)
        if cache is not None:
            cache.length = length
        logits = torch.zeros(batch, num_tokens, self.vocab_size)
        for row in range(batch):
            logits[row, -1] = torch.as_tensor(self.score_fn(row, length), dtype=torch.float)
        return logits


class ByteTokenizer:
    """Token i is byte i; bytes that do not form UTF-8 decode to U+FFFD, as in GPT-2's tokenizer."""

    eos_id = 0

    def encode(self, text, allowed_special=()):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def scripted(rows, prompt_length=1, vocab_size=256):
    """A FixedLogits model that writes `rows[r]` (a list of ids) after the prompt, then repeats its last id."""
    def scores(row, length):
        script = rows[row]
        token = script[min(length - prompt_length, len(script) - 1)]
        return [10.0 if i == token else 0.0 for i in range(vocab_size)]
    return FixedLogits(scores, vocab_size=vocab_size, context_length=256)


# ---------------------------------------------------------------------------------------
# The KV cache
# ---------------------------------------------------------------------------------------

def test_greedy_without_cache_equals_a_plain_argmax_loop(tiny_cfg):
    model = GPTModel(tiny_cfg).eval()
    start = torch.randint(0, 97, (2, 5))
    out = generate(model, start, max_new_tokens=20, use_cache=False)  # 25 > context 16: a sliding window
    expected = start.clone()
    for _ in range(20):
        next_id = model(expected[:, -16:])[:, -1].argmax(-1, keepdim=True)
        expected = torch.cat([expected, next_id], dim=1)
    assert torch.equal(out, expected)


def test_cached_logits_equal_full_forward_logits(tiny_cfg):
    model = GPTModel(tiny_cfg).eval()
    ids = torch.randint(0, 97, (3, 16))
    full = model(ids)  # (B, 16, V), no cache
    cache = model.new_kv_cache(batch_size=3)
    pieces = [model(ids[:, :5], cache),                                # prefill: 5 tokens
              model(ids[:, 5:9], cache)]                               # 4 more at once (masked)
    pieces += [model(ids[:, t:t + 1], cache) for t in range(9, 16)]    # then one at a time
    assert cache.length == 16
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="context_length"):
        model(ids[:, :1], cache)  # position 16 does not exist



@pytest.mark.parametrize("overrides", [{}, {"halting": True}], ids=["gpt", "halting"])
def test_last_only_scores_the_last_position_alone(tiny_cfg, overrides):
    from dataclasses import replace

    model = GPTModel(replace(tiny_cfg, **overrides)).eval()
    ids = torch.randint(0, 97, (2, 12))
    full = model(ids)
    last = model(ids, last_only=True)
    assert last.shape == (2, 1, 97)
    assert torch.allclose(last, full[:, -1:], atol=1e-6, rtol=0)
    calls = []
    model.out_head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[1]))
    generate(model, ids, max_new_tokens=3, use_cache=False)
    generate(model, ids, max_new_tokens=3, use_cache=True)
    assert calls == [1] * 6  # the head scores one position per step, with or without the cache

def test_cached_and_uncached_decoding_give_the_same_tokens(tiny_cfg):
    model = GPTModel(tiny_cfg)
    start = torch.randint(0, 97, (2, 4))
    greedy = [generate(model, start, 12, use_cache=c) for c in (True, False)]  # 16 tokens: the whole context
    assert torch.equal(*greedy)
    sampled = [generate(model, start, 12, temperature=1.0, top_k=20, use_cache=c,
                        generator=torch.Generator().manual_seed(3)) for c in (True, False)]
    assert torch.equal(*sampled)
    assert model.training  # generate switches to eval mode and back


def test_cache_restarts_from_the_recent_half_when_the_context_is_full(tiny_cfg):
    model = GPTModel(tiny_cfg).eval()
    start = torch.randint(0, 97, (1, 6))
    out = generate(model, start, 30)
    # The same policy written as a plain loop: the model sees the tokens from `window_start`
    # on, and once that would exceed the context, the window restarts 8 tokens (C/2) back.
    expected, window_start = start.clone(), 0
    for _ in range(30):
        if expected.shape[1] - window_start > 16:
            window_start = expected.shape[1] - 8
        next_id = model(expected[:, window_start:])[:, -1].argmax(-1, keepdim=True)
        expected = torch.cat([expected, next_id], dim=1)
    assert torch.equal(out, expected)


def test_cache_memory_is_the_formula(tiny_cfg):
    cache = GPTModel(tiny_cfg).new_kv_cache(batch_size=3, max_tokens=10)
    # keys and values: 2 x layers x batch x heads x positions x head_dim x 4 bytes (fp32)
    assert cache.memory_bytes() == 2 * 2 * 3 * 4 * 10 * 8 * 4


# ---------------------------------------------------------------------------------------
# Sampling rules
# ---------------------------------------------------------------------------------------

def test_filter_logits_hand_worked():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    inf = float("-inf")
    assert filter_logits(logits, top_k=2)[0, 2:].tolist() == [inf, inf]
    # top-p 0.7: 0.5 alone is not enough, 0.5 + 0.3 is, so the nucleus is the first two tokens.
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))[0].tolist()
    assert kept == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.5))[0].tolist() == [True, False, False, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.96))[0].tolist() == [True, True, True, True]
    shuffled = logits[:, [2, 0, 3, 1]]  # the rule follows probabilities, not positions
    assert torch.isfinite(filter_logits(shuffled, top_p=0.7))[0].tolist() == [False, True, False, True]


def test_top_k_top_p_and_repetition_penalty_match_transformers():
    transformers = pytest.importorskip("transformers")
    logits = torch.randn(4, 50) * 3
    idx = torch.randint(0, 50, (4, 7))
    for k in (1, 5, 49):
        reference = transformers.TopKLogitsWarper(top_k=k)(idx, logits.clone())
        assert torch.equal(torch.isfinite(filter_logits(logits, top_k=k)), torch.isfinite(reference))
    for p in (0.1, 0.5, 0.9):
        reference = transformers.TopPLogitsWarper(top_p=p)(idx, logits.clone())
        assert torch.equal(torch.isfinite(filter_logits(logits, top_p=p)), torch.isfinite(reference))
    reference = transformers.RepetitionPenaltyLogitsProcessor(penalty=1.3)(idx, logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits, idx, 1.3), reference)


def test_repetition_penalty_hand_worked():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]  # seen tokens move down, whatever their sign
    # In decoding: token 3 scores highest, but once it is in the text a penalty of 4 lets token 2 win.
    model = FixedLogits(lambda row, n: [0.0, 0.0, 1.0, 3.0, 0.0, 0.0])
    assert generate(model, torch.tensor([[3]]), 1).tolist() == [[3, 3]]
    assert generate(model, torch.tensor([[3]]), 1, repetition_penalty=4.0).tolist() == [[3, 2]]


# probabilities 0.4, 0.3, 0.15, ... for tokens 5, 4, 3, ...:
#  top-p 0.6: 0.4 < 0.6 so token 4 joins; 0.4 + 0.3 >= 0.6 so token 3 does not;
#  top-k 2 then top-p 0.3: renormalised 0.4 / 0.7 = 0.57 >= 0.3 already, so only token 5.
@pytest.mark.parametrize("top_k, top_p, allowed", [(3, None, {5, 4, 3}), (None, 0.6, {5, 4}), (2, 0.3, {5})])
def test_sampling_never_leaves_the_allowed_set(top_k, top_p, allowed):
    probs = torch.tensor([0.02, 0.03, 0.1, 0.15, 0.3, 0.4])
    model = FixedLogits(lambda row, n: torch.log(probs))
    generator = torch.Generator().manual_seed(0)
    out = generate(model, torch.zeros(64, 1, dtype=torch.long), max_new_tokens=5, temperature=1.0,
                   top_k=top_k, top_p=top_p, generator=generator)
    assert set(out[:, 1:].flatten().tolist()) == allowed


def test_sampling_is_reproducible_with_a_generator(tiny_cfg):
    model = GPTModel(tiny_cfg)
    start = torch.zeros(2, 1, dtype=torch.long)
    runs = [generate(model, start, 10, temperature=1.0, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert torch.equal(*runs)


# ---------------------------------------------------------------------------------------
# Stopping
# ---------------------------------------------------------------------------------------

def test_eos_stops_each_row_and_pads_finished_rows():
    eos = 0
    # Row 0 says eos when the sequence has 3 tokens, row 1 when it has 5; otherwise token 2 / 3.
    def scores(row, num_tokens):
        choice = eos if num_tokens == (3 if row == 0 else 5) else 2 + row
        return [10.0 if i == choice else 0.0 for i in range(6)]

    for use_cache in (True, False):
        out = generate(FixedLogits(scores), torch.ones(2, 1, dtype=torch.long), max_new_tokens=10,
                       eos_id=eos, use_cache=use_cache)
        assert out.tolist() == [[1, 2, 2, eos, eos, eos],  # finished at step 3, then padded
                                [1, 3, 3, 3, 3, eos]]      # all rows done: stop before 10 new tokens


def test_stop_strings_stop_each_row_of_a_batch():
    rows = [list(b"ab\n\ncd"), list(b"xyz\n\nw"), list(b"no stop here")]
    prompt = torch.full((3, 1), ord(">"))
    out = generate(scripted(rows), prompt, max_new_tokens=12, stop_strings=["\n\n"],
                   tokenizer=ByteTokenizer(), eos_id=0)
    texts = [bytes(row[1:]).decode("utf-8", errors="replace") for row in out.tolist()]
    assert texts[0].startswith("ab\n\n\0") and texts[1].startswith("xyz\n\n\0")  # stopped, then padded
    assert texts[2] == "no stop here"  # never stopped: all 12 tokens
    with pytest.raises(ConfigError, match="tokenizer"):
        generate(scripted(rows), prompt, 3, stop_strings=["\n\n"])


def test_generate_text_stops_at_end_of_text_or_a_stop_string_and_keeps_the_prompt():
    model = scripted([list(b"yy") + [0]], prompt_length=2)
    assert generate_text(model, ByteTokenizer(), "xx", max_new_tokens=10) == "xxyy"
    model = scripted([list(b"hello.\nmore")])
    assert generate_text(model, ByteTokenizer(), "x", max_new_tokens=20, stop_strings=[".\n"]) == "xhello"


# ---------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------

def test_stream_joins_to_the_same_text_and_never_shows_half_a_character():
    text = "café → 東京 and on"
    model = scripted([list(text.encode("utf-8")) + [0]])
    pieces = list(stream_text(model, ByteTokenizer(), ">", max_new_tokens=40))
    assert "".join(pieces) == text
    assert len(pieces) > 5 and all("\ufffd" not in piece for piece in pieces)


def test_stream_holds_back_what_may_start_a_stop_string():
    model = scripted([list(b"one\ntwo\n\nthree")])
    pieces = list(stream_text(model, ByteTokenizer(), ">", max_new_tokens=20, stop_strings=["\n\n"]))
    # Each "\n" waits: it shows with the "t" after the first, and the second is the stop string.
    assert pieces == ["o", "n", "e", "\nt", "w", "o"]


# ---------------------------------------------------------------------------------------
# Beam search
# ---------------------------------------------------------------------------------------

def test_one_beam_is_greedy(tiny_cfg):
    model = GPTModel(tiny_cfg)
    start = torch.randint(0, 97, (2, 3))
    assert torch.equal(generate(model, start, 8, num_beams=1), beam_search(model, start, 8, num_beams=1))
    assert torch.equal(generate(model, start, 8), beam_search(model, start, 8, num_beams=1, use_cache=False))


class TableModel(torch.nn.Module):
    """A hand-built model: the next token's log-probabilities depend on the previous token only."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.log(torch.tensor(table))  # (V, V): row = previous token
        self.cfg = SimpleNamespace(context_length=32, vocab_size=len(table))

    def new_kv_cache(self, batch_size, max_tokens=None):
        return CountingCache(max_tokens or 32)

    def forward(self, idx, cache=None, last_only=False):
        if cache is not None:
            cache.length += idx.shape[1]
        return self.table[idx]  # (B, T, V)

    def total_log_prob(self, sequence):
        return sum(self.table[a, b].item() for a, b in zip(sequence, sequence[1:]))


def test_beam_search_finds_what_greedy_misses():
    # From token 0, token 1 looks best (0.5 > 0.4), but everything after 1 is unlikely;
    # 0 -> 2 -> 2 has probability 0.4 * 0.9 = 0.36 against 0.5 * 0.34 = 0.17 through token 1.
    model = TableModel([[0.1, 0.5, 0.4],
                        [0.33, 0.33, 0.34],
                        [0.05, 0.05, 0.9]])
    start = torch.tensor([[0]])
    assert generate(model, start, 2).tolist() == [[0, 1, 2]]
    assert beam_search(model, start, 2, num_beams=2, length_penalty=0.0).tolist() == [[0, 2, 2]]


def test_beam_search_with_enough_beams_finds_the_most_probable_sequence():
    torch.manual_seed(1)
    vocab, steps = 4, 3
    model = TableModel(torch.softmax(torch.randn(vocab, vocab) * 2, dim=-1).tolist())
    for first in range(vocab):
        best = max(itertools.product(range(vocab), repeat=steps),
                   key=lambda rest: model.total_log_prob((first,) + rest))
        # vocab ** (steps - 1) beams keep every prefix alive until the last step: exhaustive.
        out = beam_search(model, torch.tensor([[first]]), steps, num_beams=vocab ** (steps - 1),
                          length_penalty=0.0)
        assert tuple(out[0, 1:].tolist()) == best


def test_beam_search_ends_beams_at_eos_and_normalises_by_length():
    eos = 3  # from token 0: stop now (0.45), or say token 1 (0.45) and then stop (0.9)
    model = TableModel([[0.05, 0.45, 0.05, 0.45],
                        [0.03, 0.03, 0.04, 0.90],
                        [0.25, 0.25, 0.25, 0.25],
                        [0.25, 0.25, 0.25, 0.25]])
    short, long = math.log(0.45), math.log(0.45 * 0.9)
    assert short > long and short / 1 < long / 2  # by total, stopping wins; per token, going on wins
    start = torch.tensor([[0], [0]])
    assert beam_search(model, start, 4, num_beams=2, eos_id=eos, length_penalty=0.0).tolist() == [[0, eos]] * 2
    assert beam_search(model, start, 4, num_beams=2, eos_id=eos, length_penalty=1.0).tolist() == [[0, 1, eos]] * 2


@pytest.mark.parametrize("kwargs, word", [(dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"),
                                          (dict(top_p=1.5), "top_p"), (dict(top_p=0.0), "top_p"),
                                          (dict(repetition_penalty=0.0), "repetition_penalty"),
                                          (dict(num_beams=0), "num_beams"),
                                          (dict(num_beams=2, temperature=0.7), "beam search")])
def test_bad_sampling_settings_are_rejected(tiny_cfg, kwargs, word):
    with pytest.raises(ConfigError, match=word):
        generate(GPTModel(tiny_cfg), torch.zeros(1, 1, dtype=torch.long), 3, **kwargs)


# ---------------------------------------------------------------------------------------
# The next-token view
# ---------------------------------------------------------------------------------------

def test_token_choices_shows_the_models_own_probabilities(tiny_cfg):
    """Each step's candidates against a softmax over a full forward pass of the text so far, and
    greedy choices that continue exactly as generate_text does."""
    from minigpt.generation import token_choices
    from minigpt.tokenizer import CharTokenizer

    tokenizer = CharTokenizer("".join(chr(ord("!") + i) for i in range(tiny_cfg.vocab_size)))
    model = GPTModel(tiny_cfg).eval()
    prompt = "ab+c"
    choices = list(token_choices(model, tokenizer, prompt, k=4, max_new_tokens=6))
    assert len(choices) == 6
    ids = tokenizer.encode(prompt)
    for choice in choices:
        with torch.no_grad():
            expected = torch.softmax(model(torch.tensor([ids]))[0, -1], dim=-1)
        top = torch.topk(expected, 4)
        assert [i for i, _, _ in choice.candidates] == top.indices.tolist()
        assert [p for _, _, p in choice.candidates] == pytest.approx(top.values.tolist(), abs=1e-6)
        assert choice.token == choice.candidates[0][0]  # greedy takes the most likely
        assert choice.probability == pytest.approx(expected[choice.token].item(), abs=1e-6)
        assert choice.text == tokenizer.decode([choice.token])
        ids.append(choice.token)
    assert prompt + "".join(c.text for c in choices) == generate_text(model, tokenizer, prompt, max_new_tokens=6)


def test_token_choices_samples_like_stream_text_and_checks_k(tiny_cfg):
    from minigpt.generation import token_choices
    from minigpt.tokenizer import CharTokenizer

    tokenizer = CharTokenizer("".join(chr(ord("!") + i) for i in range(tiny_cfg.vocab_size)))
    model = GPTModel(tiny_cfg).eval()
    sampled = [c.text for c in token_choices(model, tokenizer, "ab", k=200, max_new_tokens=8, temperature=1.0,
                                             generator=torch.Generator().manual_seed(3))]
    streamed = "".join(stream_text(model, tokenizer, "ab", max_new_tokens=8, temperature=1.0,
                                   generator=torch.Generator().manual_seed(3)))
    assert "".join(sampled) == streamed  # the same draws: showing the candidates changes nothing
    many = next(token_choices(model, tokenizer, "ab", k=200, max_new_tokens=1))
    assert len(many.candidates) == tiny_cfg.vocab_size  # k above the vocabulary: every token
    assert sum(p for _, _, p in many.candidates) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ConfigError, match="--show-probs"):
        next(token_choices(model, tokenizer, "ab", k=0))
