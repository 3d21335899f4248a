"""The pieces a transformer block is made of, and the block itself (chapter 4).

    x ─┬─ LayerNorm ─ MultiHeadAttention ─ Dropout ─(+)─┬─ LayerNorm ─ FeedForward ─ Dropout ─(+)─> out
       └────────────────────────────────────────────────┘└─────────────────────────────────────┘
                                 residual ("shortcut") connections

Pre-norm, as in GPT-2: each branch normalises its input, and the residual stream itself is
never normalised, so gradients reach early layers through the additions unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from minigpt.attention import LayerKVCache, MultiHeadAttention
from minigpt.config import GPTConfig


class LayerNorm(nn.Module):
    """Normalise each token vector to mean 0 and variance 1, then scale and shift it.

    y = scale * (x - mean(x)) / sqrt(var(x) + eps) + shift, over the last dimension.
    """

    def __init__(self, emb_dim: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim)) if bias else None  # None: no shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Fast path: the formula above in one fused kernel instead of eight small ones (it
        # matters when decoding a token at a time); `layer_norm_by_hand` writes it out, and
        # the tests check that the two agree. The variance divides by n, as GPT-2's does.
        return F.layer_norm(x, (x.shape[-1],), self.scale, self.shift, self.eps)


def layer_norm_by_hand(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm's formula step by step, as chapter 4 derives it."""
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)  # divide by n, not n - 1
    return scale * (x - mean) / torch.sqrt(var + eps) + shift


class GELU(nn.Module):
    """GPT-2's activation: a smooth ReLU, x * Phi(x), with Phi approximated through tanh.

    GELU(x) = 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))

    `exact=True` computes Phi, the normal distribution's CDF, itself (through erf), as
    nanoGPT and most later models do; on CPUs without AVX-512 it is also about twice as fast.
    """

    def __init__(self, exact: bool = False) -> None:
        super().__init__()
        self.approximate = "none" if exact else "tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Fast path: the formula above as one fused kernel (`gelu_by_hand` writes it out).
        return F.gelu(x, approximate=self.approximate)


def gelu_by_hand(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation, operation by operation."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


class FeedForward(nn.Module):
    """Per-token MLP: widen to 4 x emb_dim, GELU, project back."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim, bias=cfg.bias),
            GELU(exact=cfg.activation == "gelu"),
            nn.Linear(4 * cfg.emb_dim, cfg.emb_dim, bias=cfg.bias),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # (B, T, emb_dim) -> (B, T, emb_dim)


class TransformerBlock(nn.Module):
    """Attention then feed-forward, each pre-normalised and added back to the residual stream."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.att = MultiHeadAttention(cfg.emb_dim, cfg.emb_dim, cfg.n_heads, dropout=cfg.drop_rate,
                                      qkv_bias=cfg.qkv_bias, out_bias=cfg.bias)
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg.emb_dim, bias=cfg.bias)
        self.norm2 = LayerNorm(cfg.emb_dim, bias=cfg.bias)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), cache))  # (B, T, emb_dim)
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x
