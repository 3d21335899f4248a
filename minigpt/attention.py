"""Attention, built up one idea at a time, ending in the class the model uses.

Teaching path (chapter 3), each step adding one idea to the one before:

    simple_self_attention      every token mixes all tokens, weighted by dot-product similarity
    SelfAttention              ... through trainable query / key / value projections
    CausalAttention            ... looking only backwards (a mask), with dropout on the weights
    MultiHeadAttentionWrapper  ... several causal heads side by side, stacked
    ExplicitMultiHeadAttention ... the same heads computed at once by splitting one projection

Production: `MultiHeadAttention` computes exactly what `ExplicitMultiHeadAttention`
computes (the tests prove it) with one fused Q/K/V projection and PyTorch's
`scaled_dot_product_attention`, which never materialises the (T, T) weight matrix when
a fused kernel is available. During generation it can keep the keys and values it has
already computed in a `LayerKVCache` (chapter 6), so each new token costs one row of work.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def simple_self_attention(inputs: torch.Tensor) -> torch.Tensor:
    """Context vectors with no trainable weights: each output is a similarity-weighted mean."""
    scores = inputs @ inputs.transpose(-2, -1)  # (..., T, T): dot product of every pair
    weights = torch.softmax(scores, dim=-1)     # each row sums to 1
    return weights @ inputs                     # (..., T, d_in)


class SelfAttention(nn.Module):
    """Scaled dot-product attention with trainable query, key and value projections."""

    def __init__(self, d_in: int, d_out: int, qkv_bias: bool = False) -> None:
        super().__init__()
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        queries = self.W_query(x)  # (..., T, d_out)
        keys = self.W_key(x)       # (..., T, d_out)
        values = self.W_value(x)   # (..., T, d_out)
        scores = queries @ keys.transpose(-2, -1)  # (..., T, T)
        # Dividing by sqrt(d_out) keeps the scores' spread independent of the width, so the
        # softmax does not saturate (and its gradients vanish) as d_out grows.
        weights = torch.softmax(scores / math.sqrt(keys.shape[-1]), dim=-1)
        return weights @ values  # (..., T, d_out)


class CausalAttention(nn.Module):
    """Self-attention in which token t only sees tokens 0..t, with dropout on the weights."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float,
                 qkv_bias: bool = False) -> None:
        super().__init__()
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)
        # True above the diagonal: the future positions each row must not see.
        future = torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", future, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[1]                   # x: (B, T, d_in)
        queries = self.W_query(x)                 # (B, T, d_out)
        keys = self.W_key(x)                      # (B, T, d_out)
        values = self.W_value(x)                  # (B, T, d_out)
        scores = queries @ keys.transpose(1, 2)   # (B, T, T)
        # A score of -inf becomes a weight of exactly 0 after the softmax.
        scores = scores.masked_fill(self.mask[:num_tokens, :num_tokens], float("-inf"))
        weights = torch.softmax(scores / math.sqrt(keys.shape[-1]), dim=-1)
        weights = self.dropout(weights)
        return weights @ values                   # (B, T, d_out)


class MultiHeadAttentionWrapper(nn.Module):
    """`num_heads` independent causal heads of size d_out // num_heads, concatenated, then mixed."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float,
                 num_heads: int, qkv_bias: bool = False) -> None:
        super().__init__()
        if d_out % num_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads}).")
        head_dim = d_out // num_heads
        self.heads = nn.ModuleList(
            CausalAttention(d_in, head_dim, context_length, dropout, qkv_bias) for _ in range(num_heads))
        self.out_proj = nn.Linear(d_out, d_out)  # lets the heads' outputs mix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = torch.cat([head(x) for head in self.heads], dim=-1)  # (B, T, d_out)
        return self.out_proj(context)


class ExplicitMultiHeadAttention(nn.Module):
    """All heads at once: project once, split the last dimension into heads, attend per head."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float,
                 num_heads: int, qkv_bias: bool = False) -> None:
        super().__init__()
        if d_out % num_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads}).")
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        future = torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", future, persistent=False)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, num_tokens, d_out = x.shape
        x = x.view(batch, num_tokens, self.num_heads, self.head_dim)  # (B, T, H, D)
        return x.transpose(1, 2)                                       # (B, H, T, D)

    def forward(self, x: torch.Tensor, cache: "LayerKVCache | None" = None) -> torch.Tensor:
        # `cache` lets it stand in for MultiHeadAttention inside a block (the benchmarks do).
        if cache is not None:
            raise ValueError("the teaching attention keeps no KV cache; generate with use_cache=False.")
        batch, num_tokens, _ = x.shape
        queries = self.split_heads(self.W_query(x))  # (B, H, T, D)
        keys = self.split_heads(self.W_key(x))       # (B, H, T, D)
        values = self.split_heads(self.W_value(x))   # (B, H, T, D)
        scores = queries @ keys.transpose(2, 3)      # (B, H, T, T)
        scores = scores.masked_fill(self.mask[:num_tokens, :num_tokens], float("-inf"))
        weights = torch.softmax(scores / math.sqrt(self.head_dim), dim=-1)
        weights = self.dropout(weights)
        context = weights @ values                   # (B, H, T, D)
        # Put the heads side by side again: (B, H, T, D) -> (B, T, H, D) -> (B, T, H*D).
        context = context.transpose(1, 2).reshape(batch, num_tokens, -1)
        return self.out_proj(context)


class LayerKVCache:
    """The keys and values one attention layer has computed so far, for decoding (chapter 6).

    Without a cache, every new token re-runs the whole sequence through the model. But a
    token's key and value depend only on the tokens up to it, so they never change once
    computed: keep them, and each step only computes the newest token's query, key and value.
    Storage is allocated once for `max_tokens` positions; `length` says how many are filled.
    """

    def __init__(self, batch_size: int, n_heads: int, max_tokens: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 key_dim: int | None = None) -> None:
        shape = (batch_size, n_heads, max_tokens, head_dim)
        key_shape = (batch_size, n_heads, max_tokens, key_dim or head_dim)  # low-rank attention: narrower keys
        self.keys = torch.zeros(key_shape, device=device, dtype=dtype)  # (B, H, max_tokens, D or rank)
        self.values = torch.zeros(shape, device=device, dtype=dtype)    # (B, H, max_tokens, D)
        self.length = 0

    @property
    def max_tokens(self) -> int:
        return self.keys.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' keys and values (B, H, T, D); return all so far (B, H, length, D)."""
        start, end = self.length, self.length + keys.shape[2]
        if end > self.max_tokens:
            raise ValueError(f"the KV cache holds {self.max_tokens} positions and is full at "
                             f"{start}; reset it or start again from a shorter context.")
        self.keys[:, :, start:end] = keys
        self.values[:, :, start:end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep the batch rows `rows` (in that order): beam search follows its surviving beams."""
        self.keys = self.keys.index_select(0, rows)
        self.values = self.values.index_select(0, rows)


class KVCache:
    """One `LayerKVCache` per transformer block; they fill together, one token position at a time."""

    def __init__(self, n_layers: int, batch_size: int, n_heads: int, max_tokens: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 key_dim: int | None = None) -> None:
        self.layers = [LayerKVCache(batch_size, n_heads, max_tokens, head_dim, device, dtype, key_dim)
                       for _ in range(n_layers)]

    @property
    def length(self) -> int:
        """Token positions already cached (the position the next token will take)."""
        return self.layers[0].length

    @property
    def max_tokens(self) -> int:
        return self.layers[0].max_tokens

    def reorder(self, rows: torch.Tensor) -> None:
        for layer in self.layers:
            layer.reorder(rows)

    def reset(self) -> None:
        """Forget every cached position (the storage is kept and overwritten)."""
        for layer in self.layers:
            layer.length = 0

    def memory_bytes(self) -> int:
        """Bytes held: keys and values, 2 x n_layers x B x n_heads x max_tokens x head_dim elements."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.keys, layer.values))


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE; Su et al., 2021): position m turns each pair of a query's or
    key's dimensions by the angle m x theta_i, with theta_i = base^(-2i / head_dim).

    A rotation by m's angles in the query and by n's in the key leaves their dot product a
    function of m - n only: attention sees relative positions, and position 0 is the identity.
    The pairs are (i, i + head_dim / 2), the split-halves layout Llama's code uses.
    """

    def __init__(self, head_dim: int, max_positions: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}.")
        inverse_frequencies = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (D/2,)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inverse_frequencies)   # (P, D/2)
        angles = torch.cat([angles, angles], dim=-1)                                                   # (P, D)
        # Buffers, not weights: they move with .to(device) but stay out of the state dict.
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Rotate x (B, H, T, D) as if its tokens sat at positions start, start + 1, ..."""
        end = start + x.shape[2]
        cos, sin = self.cos[start:end].to(x.dtype), self.sin[start:end].to(x.dtype)  # (T, D)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # each pair (a, b) -> (-b, a)
        return x * cos + rotated * sin


class MultiHeadAttention(nn.Module):
    """Causal multi-head attention as the model runs it: one fused Q/K/V matmul, one fast kernel.

    With `num_kv_heads` < `num_heads` it is grouped-query attention (Ainslie et al., 2023): each
    key/value head serves num_heads / num_kv_heads query heads, so the K/V projections and the KV
    cache shrink by that factor (1: multi-query attention). With `rope` the queries and keys are
    rotated by their positions (`RotaryEmbedding`) before the cache stores the keys.
    """

    def __init__(self, d_in: int, d_out: int, num_heads: int, dropout: float = 0.0,
                 qkv_bias: bool = False, out_bias: bool = True, num_kv_heads: int | None = None,
                 rope: RotaryEmbedding | None = None, rank: int | None = None, tau: bool = False) -> None:
        super().__init__()
        if d_out % num_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads}).")
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads}).")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = d_out // num_heads
        # Low-rank attention (chapter 11): queries and keys live in `rank` dimensions per head,
        # values keep head_dim; the scores cost rank instead of head_dim multiply-adds each.
        self.qk_dim = rank or self.head_dim
        self.dropout = dropout
        self.rope = rope
        # Rows: the query projection (heads x qk_dim), then the key (kv heads x qk_dim), then the value.
        self.qkv = nn.Linear(d_in, (num_heads + num_kv_heads) * self.qk_dim + num_kv_heads * self.head_dim,
                             bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out, bias=out_bias)
        # tau-gated attention (chapter 11): each token sets, per head, a temperature
        # tau = softplus(w . x + b) that divides its scores; w = 0 and b = ln(e - 1) start it at 1.
        self.temperature = nn.Linear(d_in, num_heads) if tau else None
        self.reset_gates()

    def reset_gates(self) -> None:
        """tau = 1 for every input: the standard attention, until training moves it."""
        if self.temperature is not None:
            nn.init.zeros_(self.temperature.weight)
            nn.init.constant_(self.temperature.bias, math.log(math.e - 1))

    def tau(self, x: torch.Tensor) -> torch.Tensor:
        """Each token's temperature per head, (B, T, C) -> (B, H, T, 1)."""
        return F.softplus(self.temperature(x)).transpose(1, 2).unsqueeze(-1)

    def forward(self, x: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        batch, num_tokens, _ = x.shape
        # One matmul, then three views: (B, T, heads x D) -> (B, T, heads, D) -> (B, heads, T, D).
        # In the backward pass the three gradients are joined by one concatenation.
        sizes = [self.num_heads * self.qk_dim, self.num_kv_heads * self.qk_dim, self.num_kv_heads * self.head_dim]
        queries, keys, values = (part.view(batch, num_tokens, -1, width).transpose(1, 2) for part, width
                                 in zip(self.qkv(x).split(sizes, dim=2), (self.qk_dim, self.qk_dim, self.head_dim)))
        past = 0 if cache is None else cache.length
        if self.rope is not None:
            queries, keys = self.rope(queries, past), self.rope(keys, past)
        if self.temperature is not None:  # q / tau: every score of a query divided by its tau
            queries = queries / self.tau(x).to(queries.dtype)
        if cache is not None:
            keys, values = cache.append(keys, values)       # each (B, kv heads, past + T, D)
        # With fewer K/V heads, each serves a group of query heads (query head h reads K/V head
        # h // group). Training copies each one group times (the copies chapter 9 counts among
        # the activations); decoding lets the kernel read them in place (enable_gqa), since a
        # copy there would copy the whole cache at every step.
        grouped = self.num_kv_heads != self.num_heads
        if grouped and cache is None:
            group = self.num_heads // self.num_kv_heads
            keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        # Fast path: the same masked, scaled softmax attention as ExplicitMultiHeadAttention,
        # fused into one kernel (flash / memory-efficient attention where available).
        fused = dict(dropout_p=self.dropout if self.training else 0.0, enable_gqa=grouped and cache is not None)
        if past == 0:
            context = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, **fused)
        elif num_tokens == 1:  # one new token after the cached ones: it may see them all
            context = F.scaled_dot_product_attention(queries, keys, values, **fused)
        else:  # several new tokens after cached ones: new token i sees positions <= past + i
            visible = torch.ones(num_tokens, past + num_tokens, dtype=torch.bool, device=x.device)
            visible = visible.tril(diagonal=past)
            context = F.scaled_dot_product_attention(queries, keys, values, attn_mask=visible, **fused)
        context = context.transpose(1, 2).reshape(batch, num_tokens, -1)  # (B, T, d_out)
        return self.out_proj(context)
