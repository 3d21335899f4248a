"""The GPT model: token and position embeddings, a stack of transformer blocks, a final
norm and a linear head that scores every vocabulary entry at every position (chapter 4).

    token ids (B, T) -> tok_emb + pos_emb -> dropout -> n_layers x TransformerBlock
                     -> final LayerNorm -> out_head -> logits (B, T, vocab_size)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minigpt.attention import KVCache
from minigpt.blocks import LayerNorm, TransformerBlock
from minigpt.config import GPTConfig


class GPTModel(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            # GPT-2 reuses the token embedding as the output head: one (vocab, emb) matrix
            # both reads tokens in and scores them out, saving vocab_size * emb_dim weights.
            self.out_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init: each block adds two branches to the residual stream, so the
        # layers that write into it start smaller by 1/sqrt(2 * n_layers), keeping the
        # stream's variance from growing with depth.
        for name, param in self.named_parameters():
            if name.endswith("att.out_proj.weight") or name.endswith("ff.layers.2.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Linear layers as in GPT-2: N(0, 0.02) weights, zero biases, so a new model's logits
        are nearly equal and its first loss is close to ln(vocab_size).

        Embeddings keep PyTorch's N(0, 1): token vectors that start far apart are learned much
        faster on a small corpus (on the-verdict, full mode reaches train loss 5.1 by step 25
        this way and is still at 6.0 by step 45 with GPT-2's N(0, 0.02) embeddings). A tied
        head shares the token embedding and, being a Linear, gives it N(0, 0.02).
        """
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, in_idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids (B, T).

        With a `cache` (generation, chapter 6), `in_idx` holds only the tokens that follow
        the cached ones: they take positions cache.length, cache.length + 1, ... and their
        keys and values join the cache.
        """
        batch_size, num_tokens = in_idx.shape
        past = 0 if cache is None else cache.length
        if past + num_tokens > self.cfg.context_length:
            raise ValueError(f"the input reaches {past + num_tokens} tokens but the model's "
                             f"context_length is {self.cfg.context_length}; crop the input to its "
                             f"last {self.cfg.context_length} tokens.")
        positions = torch.arange(past, past + num_tokens, device=in_idx.device)
        x = self.tok_emb(in_idx) + self.pos_emb(positions)  # (B, T, C) + (T, C) -> (B, T, C)
        x = self.drop_emb(x)
        for layer, block in enumerate(self.trf_blocks):
            x = block(x, None if cache is None else cache.layers[layer])  # (B, T, C)
        x = self.final_norm(x)
        return self.out_head(x)                             # (B, T, vocab_size)

    def new_kv_cache(self, batch_size: int, max_tokens: int | None = None) -> KVCache:
        """An empty cache for `batch_size` sequences of up to `max_tokens` (default: the context)."""
        max_tokens = min(max_tokens or self.cfg.context_length, self.cfg.context_length)
        weight = self.tok_emb.weight
        return KVCache(self.cfg.n_layers, batch_size, self.cfg.n_heads, max_tokens, self.cfg.head_dim,
                       device=weight.device, dtype=weight.dtype)

    def num_parameters(self, exclude_output_head: bool = False) -> int:
        """Trainable weights, each shared tensor counted once.

        With `exclude_output_head`, an untied head is left out: GPT-2's "124M" counts the
        weights as if the head were tied (163,009,536 - 50257 * 768 = 124,412,160).
        """
        total = sum(p.numel() for p in self.parameters())  # .parameters() skips duplicates
        if exclude_output_head and not self.cfg.tie_weights:
            total -= self.out_head.weight.numel()
        return total

    def parameter_memory_bytes(self, dtype: torch.dtype = torch.float32) -> int:
        """Memory the weights alone take in `dtype` (fp32: 4 bytes each)."""
        return self.num_parameters() * torch.empty((), dtype=dtype).element_size()
