"""Turning next-token scores into text (chapter 6).

At each step the model scores every vocabulary entry for the next position; a decoding
rule picks one, it is appended, and the longer sequence goes back in. Greedy decoding
takes the highest score; sampling draws from the softmax, sharpened or flattened by a
temperature and restricted to the k most likely tokens (top-k) or to the smallest set
holding probability p (top-p, "nucleus").
"""

from __future__ import annotations

import torch

from minigpt.config import ConfigError


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Reject decoding settings that have no meaning, saying which values do."""
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0 means greedy), got {temperature}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(f"top_k must be a whole number >= 1 or None, got {top_k!r}.")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p must lie in (0, 1] or be None, got {top_p}.")


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


@torch.no_grad()
def generate(model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend each row of `idx` (B, T) by up to `max_new_tokens` tokens; returns (B, T + n).

    temperature 0 is greedy. A row that produces `eos_id` is finished: it keeps that token
    and is padded with `eos_id` while the other rows go on; decoding stops once every row
    has finished. `generator` makes sampling reproducible without touching global state.
    """
    check_sampling(temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    context_length = model.cfg.context_length
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context_length:])[:, -1, :]  # (B, V): the last position's scores
        if temperature == 0.0:
            next_id = logits.argmax(dim=-1, keepdim=True)   # (B, 1)
        else:
            logits = filter_logits(logits / temperature, top_k, top_p)
            probs = torch.softmax(logits, dim=-1)
            next_id = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
        if eos_id is not None:
            next_id = next_id.masked_fill(finished.unsqueeze(1), eos_id)
            finished |= next_id.squeeze(1) == eos_id
        idx = torch.cat([idx, next_id], dim=1)  # (B, T + 1)
        if eos_id is not None and bool(finished.all()):
            break
    model.train(was_training)
    return idx


def text_to_token_ids(text: str, tokenizer) -> torch.Tensor:
    """A prompt as a batch of one; "<|endoftext|>" in it means the end-of-text token."""
    return torch.tensor(tokenizer.encode(text, allowed_special="all")).unsqueeze(0)  # (1, T)


def token_ids_to_text(token_ids: torch.Tensor, tokenizer) -> str:
    return tokenizer.decode(token_ids.squeeze(0).tolist())


def generate_text(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int = 50,
                  temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                  generator: torch.Generator | None = None) -> str:
    """The prompt followed by what the model writes after it (stops at end-of-text)."""
    if not prompt:
        raise ConfigError("the prompt is empty; give some text to continue (--prompt \"...\").")
    device = next(model.parameters()).device
    idx = text_to_token_ids(prompt, tokenizer).to(device)
    out = generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   eos_id=tokenizer.eos_id, generator=generator)
    ids = out.squeeze(0).tolist()
    if tokenizer.eos_id is not None and tokenizer.eos_id in ids[idx.shape[1]:]:
        ids = ids[:idx.shape[1] + ids[idx.shape[1]:].index(tokenizer.eos_id)]
    return tokenizer.decode(ids)
