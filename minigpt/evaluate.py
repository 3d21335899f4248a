"""Evaluation (chapter 9): turning a model's mean loss into numbers that compare fairly.

The loss is in nats per token, so it depends on the tokenizer: a character-level model
predicts many easy tokens, a BPE model fewer, harder ones. Two conversions help:

- perplexity = e^loss, "as unsure as a uniform choice among this many tokens";
- bits per byte = the total loss over a text, in bits, divided by the text's UTF-8 bytes.
  It does not care how the text was cut into tokens, so it compares a character model with
  a BPE model, or minigpt with any other language model, on the same text.
"""

from __future__ import annotations

import math

import torch

from minigpt.train import calc_loss_loader


def perplexity(loss: float) -> float:
    """e^loss: the number of equally likely tokens the model is as unsure as."""
    return math.exp(loss)


def bits_per_byte(loss: float, num_tokens: int, num_bytes: int) -> float:
    """Mean loss (nats per token) over `num_tokens` tokens that encode `num_bytes` UTF-8 bytes,
    as bits per byte: loss x tokens / bytes / ln 2."""
    if num_tokens <= 0 or num_bytes <= 0:
        raise ValueError(f"need positive token and byte counts, got {num_tokens} tokens and {num_bytes} bytes.")
    return loss * num_tokens / (num_bytes * math.log(2))


@torch.no_grad()
def evaluate_text(model: torch.nn.Module, tokenizer, text: str, max_length: int, batch_size: int = 8,
                  device: torch.device | str = "cpu") -> dict[str, float]:
    """Loss, perplexity and bits per byte of `model` on `text`, over non-overlapping windows.

    Every token but the first is predicted once, from the tokens before it in its window
    (so from up to `max_length - 1` tokens of context). Bits per byte counts the bytes of the
    text the scored tokens cover.
    """
    from minigpt.data import create_dataloader

    ids = tokenizer.encode(text, allowed_special="all")
    loader = create_dataloader(ids, batch_size=batch_size, max_length=max_length, stride=max_length,
                               shuffle=False, drop_last=False, name="the evaluation text")
    was_training = model.training
    model.eval()
    loss = calc_loss_loader(loader, model, device)
    model.train(was_training)
    windows = len(loader.dataset)
    scored = ids[1:windows * max_length + 1]  # the targets of every window, in order
    num_bytes = len(tokenizer.decode(scored).encode("utf-8"))
    return {"loss": loss, "perplexity": perplexity(loss), "bits_per_byte": bits_per_byte(loss, len(scored), num_bytes),
            "tokens": len(scored), "bytes": num_bytes}
