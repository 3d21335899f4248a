"""Turning next-token scores into text (chapter 6).

At each step the model scores every vocabulary entry for the next position; a decoding
rule picks one, it is appended, and the longer sequence goes back in. Greedy decoding
takes the highest score; sampling draws from the softmax, sharpened or flattened by a
temperature and restricted to the k most likely tokens (top-k) or to the smallest set
holding probability p (top-p, "nucleus"); a repetition penalty makes tokens already in
the text less likely. Beam search keeps the `num_beams` most probable sequences instead
of one. A KV cache (`minigpt.attention.KVCache`) makes every step after the first cost
one token's work instead of the whole sequence's.

    iter_next_tokens   the decoding loop: yields each step's new token for every row
    generate           ids in, ids out, stopping each row at end-of-text or a stop string
    beam_search        the most probable continuations, length-normalised
    stream_text        text pieces as they are produced, for a chat that types as it thinks
    token_choices      each new token with the model's most likely candidates and their probabilities
    generate_text      prompt in, text out
    Ensemble           several models decoding as one: the weighted mean of their log-probabilities
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from minigpt.config import ConfigError


def check_sampling(temperature: float, top_k: int | None, top_p: float | None,
                   repetition_penalty: float = 1.0) -> None:
    """Reject decoding settings that have no meaning, saying which values do."""
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0 means greedy), got {temperature}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(f"top_k must be a whole number >= 1 or None, got {top_k!r}.")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p must lie in (0, 1] or be None, got {top_p}.")
    if not repetition_penalty > 0:
        raise ConfigError(f"repetition_penalty must be > 0 (1.0 means off, 1.1-1.3 is typical), "
                          f"got {repetition_penalty}.")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set the scores of tokens outside the top-k / top-p set to -inf. logits: (B, V)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the probability;
        # the most likely token is therefore always kept.
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def apply_repetition_penalty(logits: torch.Tensor, idx: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make every token already in a row's text less likely (CTRL, Keskar et al. 2019).

    A positive score is divided by `penalty` and a negative one multiplied by it, so both
    move down. logits: (B, V); idx: (B, T), the prompt and what was generated so far.
    """
    if penalty == 1.0:
        return logits
    seen = torch.gather(logits, 1, idx)  # (B, T): the score of each token already present
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, idx, seen)


def choose_next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row (B, 1) from the last position's scores (B, V)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = filter_logits(logits / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def iter_next_tokens(model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                     top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                     use_cache: bool = True, generator: torch.Generator | None = None,
                     details: bool = False) -> Iterator[torch.Tensor]:
    """The decoding loop: yield the next token of every row of `idx` (B, T), as (B, 1), step by step;
    with `details`, (next token, the model's probabilities (B, V)) instead: the softmax of its
    scores as they are, before the repetition penalty, the temperature and any filtering.

    With the cache, the prompt goes through the model once (the "prefill") and each later
    step feeds only the newest token. Without it, every step re-reads the last
    context_length tokens. When the sequence outgrows the context, the uncached loop slides
    its window by one token per step, which moves every token to a new position and so
    invalidates cached keys; the cached loop instead starts again from the most recent half
    of the context, so it recomputes once per context_length / 2 tokens rather than at
    every step. The two agree exactly until the context is full.

    The model is called as `model(ids, cache, last_only=True)`: only the last position's scores
    are needed, so a GPTModel runs its output head on that position alone (a 50,257-way head on
    every one of 512 positions would be most of an uncached step's work).
    """
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    context_length = model.cfg.context_length
    was_training = model.training
    model.eval()
    try:
        cache = model.new_kv_cache(idx.shape[0], idx.shape[1] + max_new_tokens) if use_cache else None
        unseen = idx[:, -context_length:]  # tokens whose keys and values are not cached yet
        for _ in range(max_new_tokens):
            if cache is None:
                logits = model(idx[:, -context_length:], last_only=True)[:, -1, :]  # (B, V): the last position's scores
            else:
                if cache.length + unseen.shape[1] > cache.max_tokens:  # full: keep the recent half
                    cache.reset()
                    unseen = idx[:, -max(context_length // 2, 1):]
                logits = model(unseen, cache, last_only=True)[:, -1, :]
            probs = torch.softmax(logits.float(), dim=-1) if details else None
            logits = apply_repetition_penalty(logits, idx, repetition_penalty)
            next_id = choose_next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
            idx = torch.cat([idx, next_id], dim=1)  # (B, T + 1)
            unseen = next_id
            yield (next_id, probs) if details else next_id
    finally:
        model.train(was_training)


class StopStrings:
    """Finds, for each row, whether its generated text contains one of the stop strings."""

    def __init__(self, stop_strings: list[str] | tuple[str, ...], tokenizer) -> None:
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        if any(not isinstance(s, str) or not s for s in stop_strings):
            raise ConfigError(f"stop strings must be non-empty strings, got {list(stop_strings)!r}.")
        if stop_strings and tokenizer is None:
            raise ConfigError("stop strings need the tokenizer, to turn tokens back into text; "
                              "pass tokenizer=... to generate().")
        self.stop_strings = list(stop_strings)
        self.tokenizer = tokenizer
        # Every token decodes to at least one byte, so a stop string of n bytes that ends in the
        # newest token lies within the last n tokens: decoding n + 1 of them is always enough.
        self.tail = max((len(s.encode("utf-8")) for s in self.stop_strings), default=0) + 1

    def __bool__(self) -> bool:
        return bool(self.stop_strings)

    def found(self, generated: list[int]) -> bool:
        text = self.tokenizer.decode(generated[-self.tail:])
        return any(s in text for s in self.stop_strings)

    def cut(self, text: str) -> str:
        """`text` up to (not including) the first stop string in it."""
        ends = [text.find(s) for s in self.stop_strings if s in text]
        return text[:min(ends)] if ends else text


@torch.no_grad()
def generate(model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             use_cache: bool = True, repetition_penalty: float = 1.0, stop_strings: tuple[str, ...] = (),
             tokenizer=None, num_beams: int = 1, length_penalty: float = 1.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend each row of `idx` (B, T) by up to `max_new_tokens` tokens; returns (B, T + n).

    temperature 0 is greedy; `num_beams` > 1 runs `beam_search` instead. A row that
    produces `eos_id`, or whose new text contains one of `stop_strings` (decoded with
    `tokenizer`), is finished: it keeps that token and is padded with `eos_id` (0 if there
    is none) while the other rows go on; decoding stops once every row has finished.
    `generator` makes sampling reproducible without touching global random state.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be a whole number >= 0, got {max_new_tokens!r}.")
    if num_beams != 1:
        if temperature != 0.0 or stop_strings:
            raise ConfigError("beam search keeps the most probable sequences, so it does not sample "
                              "and does not take stop strings: set temperature 0 and no stop strings, "
                              "or num_beams 1.")
        return beam_search(model, idx, max_new_tokens, num_beams, length_penalty=length_penalty,
                           eos_id=eos_id, repetition_penalty=repetition_penalty, use_cache=use_cache)
    stops = StopStrings(stop_strings, tokenizer)
    pad_id = eos_id if eos_id is not None else 0
    prompt_length = idx.shape[1]
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    steps = iter_next_tokens(model, idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                             use_cache, generator)
    for next_id in steps:
        next_id = next_id.masked_fill(finished.unsqueeze(1), pad_id)
        idx = torch.cat([idx, next_id], dim=1)  # (B, T + 1)
        if eos_id is not None:
            finished |= next_id.squeeze(1) == eos_id
        if stops:
            for row in torch.nonzero(~finished).flatten().tolist():
                finished[row] = stops.found(idx[row, prompt_length:].tolist())
        if (eos_id is not None or stops) and bool(finished.all()):
            break
    steps.close()  # restores the model's train/eval mode at once
    return idx


@torch.no_grad()
def beam_search(model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int, num_beams: int,
                length_penalty: float = 1.0, eos_id: int | None = None, repetition_penalty: float = 1.0,
                use_cache: bool = True) -> torch.Tensor:
    """The continuation of each row of `idx` (B, T) with the best length-normalised log-probability.

    Every step extends each of the `num_beams` kept sequences by every token, and keeps the
    `num_beams` best of all those candidates. A sequence is scored by
    sum(log p(token)) / generated_length ** length_penalty: 0 ranks by total probability
    (favouring short answers), larger values favour longer ones. A candidate that ends in
    `eos_id` is set aside as finished; a row is done when it has `num_beams` finished
    sequences and the best one still running, scored at its current length, does not beat
    the worst of them (the usual stopping rule, as in `transformers`). Rows are padded with
    `eos_id` (or 0).
    """
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ConfigError(f"num_beams must be a whole number >= 1, got {num_beams!r}.")
    check_sampling(0.0, None, None, repetition_penalty)
    batch, prompt_length = idx.shape
    context_length = model.cfg.context_length
    if prompt_length + max_new_tokens > context_length:
        raise ConfigError(f"beam search keeps every beam's positions in one context: the prompt "
                          f"({prompt_length} tokens) plus max_new_tokens ({max_new_tokens}) must fit "
                          f"in context_length ({context_length}); shorten one of them.")
    was_training = model.training
    model.eval()
    beams = idx.repeat_interleave(num_beams, dim=0)  # (B*K, T): K copies of each row, row-major
    scores = torch.zeros(batch, num_beams, device=idx.device)
    scores[:, 1:] = float("-inf")  # at first all K beams are the same: expand only one of them
    finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(batch)]
    done = [False] * batch
    cache = model.new_kv_cache(batch * num_beams, prompt_length + max_new_tokens) if use_cache else None
    unseen = beams
    for step in range(1, max_new_tokens + 1):
        logits = model(unseen if cache is not None else beams, cache, last_only=True)[:, -1, :]
        logits = apply_repetition_penalty(logits, beams, repetition_penalty)
        log_probs = torch.log_softmax(logits.float(), dim=-1)            # (B*K, V)
        vocab = log_probs.shape[-1]
        totals = scores.unsqueeze(-1) + log_probs.view(batch, num_beams, vocab)  # (B, K, V)
        # 2K candidates per row: even if K of them end in eos, K can keep running.
        top_totals, top_flat = totals.view(batch, -1).topk(min(2 * num_beams, num_beams * vocab), dim=-1)
        next_rows, next_tokens, next_scores = [], [], []
        for row in range(batch):
            kept = 0
            for total, flat in zip(top_totals[row].tolist(), top_flat[row].tolist()):
                beam, token = divmod(flat, vocab)
                source = row * num_beams + beam
                if done[row] or total == float("-inf"):
                    source, token, total = row * num_beams, eos_id or 0, float("-inf")  # filler
                elif token == eos_id:
                    sequence = torch.cat([beams[source, prompt_length:], beams.new_tensor([token])])
                    finished[row].append((total / step ** length_penalty, sequence))
                    continue
                next_rows.append(source)
                next_tokens.append(token)
                next_scores.append(total)
                kept += 1
                if kept == num_beams:
                    break
            finished[row] = sorted(finished[row], key=lambda item: item[0], reverse=True)[:num_beams]
            best_running = max(next_scores[-num_beams:]) / step ** length_penalty
            if len(finished[row]) == num_beams and best_running <= finished[row][-1][0]:
                done[row] = True
        rows = torch.tensor(next_rows, device=idx.device)
        new_tokens = torch.tensor(next_tokens, device=idx.device).unsqueeze(1)  # (B*K, 1)
        beams = torch.cat([beams[rows], new_tokens], dim=1)
        scores = torch.tensor(next_scores, device=idx.device).view(batch, num_beams)
        if cache is not None:
            cache.reorder(rows)
        unseen = new_tokens
        if all(done):
            break
    model.train(was_training)
    return _best_of_beams(idx, beams[:, prompt_length:], scores, finished, length_penalty, eos_id)


def _best_of_beams(idx: torch.Tensor, continuations: torch.Tensor, scores: torch.Tensor,
                   finished: list[list[tuple[float, torch.Tensor]]], length_penalty: float,
                   eos_id: int | None) -> torch.Tensor:
    """Each row's prompt and its best continuation, padded with `eos_id` (or 0): sequences still
    running at the end (`continuations` (B*K, n), their `scores` (B, K)) compete with the finished
    ones on the same length-normalised scale."""
    batch, num_beams = scores.shape
    best = []
    for row in range(batch):
        candidates = list(finished[row])
        for beam in range(num_beams):
            total = scores[row, beam].item()
            if total > float("-inf"):
                sequence = continuations[row * num_beams + beam]
                candidates.append((total / max(len(sequence), 1) ** length_penalty, sequence))
        best.append(max(candidates, key=lambda item: item[0])[1])
    prompt_length, width = idx.shape[1], max(len(sequence) for sequence in best)
    out = torch.full((batch, prompt_length + width), eos_id or 0, dtype=idx.dtype, device=idx.device)
    out[:, :prompt_length] = idx
    for row, sequence in enumerate(best):
        out[row, prompt_length:prompt_length + len(sequence)] = sequence
    return out


class EnsembleCache:
    """One KV cache per member of an `Ensemble`; they fill, reset and reorder together."""

    def __init__(self, caches: list) -> None:
        self.caches = caches

    @property
    def length(self) -> int:
        return self.caches[0].length

    @property
    def max_tokens(self) -> int:
        return self.caches[0].max_tokens

    def reorder(self, rows: torch.Tensor) -> None:
        for cache in self.caches:
            cache.reorder(rows)

    def reset(self) -> None:
        for cache in self.caches:
            cache.reset()


class Ensemble(torch.nn.Module):
    """Several models that share a tokenizer, scoring the next token as one.

    The output is the weighted mean of the members' log-probabilities, sum_i w_i log p_i.
    Used as logits, softmax renormalises it into a weighted geometric mean of the members'
    distributions (a "product of experts"): a token is likely only if every member finds it
    plausible. Weights default to equal and are normalised to sum to 1. It decodes wherever
    a GPTModel does (with or without the KV cache) and within the smallest member context.
    """

    def __init__(self, models: list[torch.nn.Module], weights: list[float] | None = None) -> None:
        super().__init__()
        models = list(models)
        if not models:
            raise ValueError("an ensemble needs at least one model; pass a list of models.")
        vocab_sizes = [model.cfg.vocab_size for model in models]
        if len(set(vocab_sizes)) > 1:
            raise ValueError(f"the members' vocabularies differ in size ({vocab_sizes}); an ensemble "
                             "averages scores token by token, so give models trained with the same tokenizer.")
        weights = [1.0] * len(models) if weights is None else [float(w) for w in weights]
        if len(weights) != len(models) or not all(w > 0 for w in weights):
            raise ValueError(f"ensemble weights must be positive numbers, one per model: got {weights} "
                             f"for {len(models)} models; give {len(models)} numbers > 0, or none for equal weights.")
        self.models = torch.nn.ModuleList(models)
        self.weights = [w / sum(weights) for w in weights]

    @property
    def cfg(self):
        """The config of the member with the smallest context: every member must see the whole input."""
        return min((model.cfg for model in self.models), key=lambda cfg: cfg.context_length)

    def forward(self, idx: torch.Tensor, cache: EnsembleCache | None = None, last_only: bool = False) -> torch.Tensor:
        """sum_i w_i log_softmax(model_i(idx)), (B, T, V), in float32 (T = 1 with `last_only`)."""
        caches = cache.caches if cache is not None else [None] * len(self.models)
        return sum(weight * torch.log_softmax(model(idx, member_cache, last_only=last_only).float(), dim=-1)
                   for weight, model, member_cache in zip(self.weights, self.models, caches))

    def new_kv_cache(self, batch_size: int, max_tokens: int | None = None) -> EnsembleCache:
        """A cache per member, all of the same size (at most the smallest member context)."""
        context_length = self.cfg.context_length
        max_tokens = min(max_tokens or context_length, context_length)
        return EnsembleCache([model.new_kv_cache(batch_size, max_tokens) for model in self.models])


def text_to_token_ids(text: str, tokenizer) -> torch.Tensor:
    """A prompt as a batch of one; "<|endoftext|>" in it means the end-of-text token."""
    return torch.tensor(tokenizer.encode(text, allowed_special="all")).unsqueeze(0)  # (1, T)


def _prompt_ids(model: torch.nn.Module, tokenizer, prompt: str) -> torch.Tensor:
    if not prompt:
        raise ConfigError("the prompt is empty; give some text to continue (--prompt \"...\").")
    device = next(model.parameters()).device
    return text_to_token_ids(prompt, tokenizer).to(device)


def stream_text(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int = 50,
                temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                repetition_penalty: float = 1.0, stop_strings: tuple[str, ...] = (), use_cache: bool = True,
                generator: torch.Generator | None = None) -> Iterator[str]:
    """Yield the continuation of `prompt` piece by piece, as soon as each piece is certain.

    A piece is held back while it may still change: while its last bytes are an unfinished
    UTF-8 character (a token can end halfway through one), or while its end could be the
    start of a stop string. It stops at end-of-text or at a stop string, which is not shown.
    """
    idx = _prompt_ids(model, tokenizer, prompt)
    stops = StopStrings(stop_strings, tokenizer)
    generated: list[int] = []
    shown = 0  # characters of the continuation already yielded
    text = ""
    for next_id in iter_next_tokens(model, idx, max_new_tokens, temperature, top_k, top_p,
                                    repetition_penalty, use_cache, generator):
        token = next_id.item()
        if token == tokenizer.eos_id:
            break
        generated.append(token)
        text = tokenizer.decode(generated)
        if stops and stops.cut(text) != text:
            text = stops.cut(text)
            break
        certain = len(text.rstrip("\ufffd"))  # U+FFFD at the end: a character still arriving
        for stop in stops.stop_strings:        # hold back what may be the start of a stop string
            for size in range(min(len(stop) - 1, certain), 0, -1):
                if text[certain - size:certain] == stop[:size]:
                    certain -= size
                    break
        if certain > shown:
            yield text[shown:certain]
            shown = certain
    if len(text) > shown:
        yield text[shown:]


@dataclass
class TokenChoice:
    """One generated token, and what the model thought of its candidates at that step."""

    token: int
    text: str                                  # the token alone (part of a character shows as U+FFFD)
    probability: float                         # the model's probability for it
    candidates: list[tuple[int, str, float]]   # the k most likely: (id, text, probability), most likely first


def token_choices(model: torch.nn.Module, tokenizer, prompt: str, k: int = 5, **decoding) -> Iterator[TokenChoice]:
    """Continue `prompt` as `stream_text` would (`decoding`: max_new_tokens, temperature, top_k,
    top_p, repetition_penalty, use_cache, generator), yielding each new token with the model's
    k most likely candidates for it; until end-of-text or max_new_tokens."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"k (--show-probs) must be a whole number of candidates >= 1, got {k!r}.")
    idx = _prompt_ids(model, tokenizer, prompt)
    for next_id, probs in iter_next_tokens(model, idx, decoding.pop("max_new_tokens", 50), details=True, **decoding):
        token = next_id.item()
        if token == tokenizer.eos_id:
            break
        top = torch.topk(probs[0], min(k, probs.shape[-1]))
        candidates = [(i, tokenizer.decode([i]), p) for i, p in zip(top.indices.tolist(), top.values.tolist())]
        yield TokenChoice(token, tokenizer.decode([token]), probs[0, token].item(), candidates)


def generate_text(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int = 50,
                  temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                  repetition_penalty: float = 1.0, stop_strings: tuple[str, ...] = (), num_beams: int = 1,
                  length_penalty: float = 1.0, use_cache: bool = True,
                  generator: torch.Generator | None = None) -> str:
    """The prompt followed by what the model writes after it (up to end-of-text or a stop string)."""
    idx = _prompt_ids(model, tokenizer, prompt)
    out = generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   eos_id=tokenizer.eos_id, use_cache=use_cache, repetition_penalty=repetition_penalty,
                   stop_strings=stop_strings, tokenizer=tokenizer, num_beams=num_beams,
                   length_penalty=length_penalty, generator=generator)
    new_ids = out[0, idx.shape[1]:].tolist()
    if tokenizer.eos_id is not None and tokenizer.eos_id in new_ids:
        new_ids = new_ids[:new_ids.index(tokenizer.eos_id)]
    return tokenizer.decode(idx[0].tolist()) + StopStrings(stop_strings, tokenizer).cut(tokenizer.decode(new_ids))
