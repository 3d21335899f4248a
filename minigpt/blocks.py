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

from minigpt.attention import LayerKVCache, MultiHeadAttention, RotaryEmbedding
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


class RMSNorm(nn.Module):
    """Scale each token vector by its root mean square (Zhang and Sennrich, 2019):

    y = scale * x / sqrt(mean(x^2) + eps)

    LayerNorm without the centring and the shift: one reduction instead of two, and in
    practice as good, so Llama and most later models use it.
    """

    def __init__(self, emb_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = torch.sqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (x.float() / rms).to(x.dtype) * self.scale


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.emb_dim, cfg.norm_eps)
    return LayerNorm(cfg.emb_dim, cfg.norm_eps, bias=cfg.bias)


class FeedForward(nn.Module):
    """Per-token MLP: widen to 4 x emb_dim (`hidden_dim`), GELU, project back."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, cfg.hidden_dim, bias=cfg.bias),
            GELU(exact=cfg.activation == "gelu"),
            nn.Linear(cfg.hidden_dim, cfg.emb_dim, bias=cfg.bias),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # (B, T, emb_dim) -> (B, T, emb_dim)


class SwiGLU(nn.Module):
    """A gated MLP (Shazeer, 2020): down(silu(gate(x)) * up(x)).

    One projection decides, per hidden unit, how much of the other passes (SiLU(z) = z sigma(z));
    three matrices instead of two, so the hidden width is 8/3 x emb_dim for GPT-2's parameter count.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.emb_dim, cfg.hidden_dim, bias=cfg.bias)
        self.up = nn.Linear(cfg.emb_dim, cfg.hidden_dim, bias=cfg.bias)
        self.down = nn.Linear(cfg.hidden_dim, cfg.emb_dim, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MixtureOfExperts(nn.Module):
    """`n_experts` SwiGLU experts and a router that sends each token to its `moe_top_k` best.

    router logits (N, E) -> softmax p -> keep the top k, renormalised to sum to 1 -> the token's
    output is the weighted sum of its k experts' outputs (+ a shared expert every token uses).
    Only k of the E experts run per token, so the parameters grow E-fold and the compute k-fold.

    Without help the router collapses onto a few experts. `aux_loss` (set by each forward) adds
    Switch Transformer's load-balancing term, E x sum_e f_e P_e, where f_e is the share of routed
    token slots expert e received and P_e its mean router probability (1 when perfectly even),
    and, if asked, the router z-loss mean(logsumexp(logits)^2) (ST-MoE), which keeps logits small.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.moe_top_k
        self.aux_coef, self.z_coef = cfg.moe_aux_coef, cfg.moe_z_coef
        self.router = nn.Linear(cfg.emb_dim, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(cfg) for _ in range(cfg.n_experts))
        self.shared = SwiGLU(cfg) if cfg.moe_shared_expert else None
        self.aux_loss = torch.zeros(())

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits (N, E), and each token's k experts (N, k) with their weights (N, k)."""
        logits = self.router(x)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        return logits, chosen, (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])                        # (N, C): every token of the batch
        logits, chosen, weights = self.route(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tokens, slot = torch.nonzero(chosen == e, as_tuple=True)  # the tokens routed to e
            if len(tokens):
                out.index_add_(0, tokens, expert(x[tokens]) * weights[tokens, slot].unsqueeze(-1))
        if self.shared is not None:
            out = out + self.shared(x)
        self.aux_loss = self.balance_loss(logits, chosen) + self.router_z_loss(logits)
        return out.reshape(shape)

    def balance_loss(self, logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """aux_coef x E x sum_e f_e P_e (see the class docstring)."""
        if not self.aux_coef:
            return torch.zeros((), device=logits.device)
        routed = F.one_hot(chosen, self.n_experts).float().sum(dim=1)   # (N, E): 1 where e was chosen
        share = routed.mean(dim=0) / self.top_k                         # f_e, sums to 1
        mean_prob = torch.softmax(logits.float(), dim=-1).mean(dim=0)   # P_e
        return self.aux_coef * self.n_experts * (share * mean_prob).sum()

    def router_z_loss(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.z_coef:
            return torch.zeros((), device=logits.device)
        return self.z_coef * torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def make_ffn(cfg: GPTConfig) -> nn.Module:
    return {"gelu": FeedForward, "swiglu": SwiGLU, "moe": MixtureOfExperts}[cfg.ffn](cfg)


class TransformerBlock(nn.Module):
    """Attention then feed-forward, each pre-normalised and added back to the residual stream."""

    def __init__(self, cfg: GPTConfig, rope: RotaryEmbedding | None = None) -> None:
        super().__init__()
        self.att = MultiHeadAttention(cfg.emb_dim, cfg.emb_dim, cfg.n_heads, dropout=cfg.drop_rate,
                                      qkv_bias=cfg.qkv_bias, out_bias=cfg.bias, num_kv_heads=cfg.kv_heads,
                                      rope=rope, rank=cfg.attn_rank, tau=cfg.attn_tau)
        self.ff = make_ffn(cfg)
        self.norm1 = make_norm(cfg)
        self.norm2 = make_norm(cfg)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), cache))  # (B, T, emb_dim)
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


class HaltingUnit(nn.Module):
    """Adaptive computation time's halting unit (Graves, 2016), read after a block: the
    probability h = sigmoid(w . x + b) that a token has been computed enough (chapter 11).

    w = 0 and b = -3 start every token at h = 0.047, so a new model runs every block and the
    ponder cost teaches it where to stop."""

    def __init__(self, emb_dim: int, bias: float = -3.0) -> None:
        super().__init__()
        self.linear = nn.Linear(emb_dim, 1)
        self.start_bias = bias
        self.reset_gates()

    def reset_gates(self) -> None:
        nn.init.zeros_(self.linear.weight)
        nn.init.constant_(self.linear.bias, self.start_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(x).float()).squeeze(-1)  # (B, T, C) -> (B, T)


class AdaptiveDepth:
    """ACT's bookkeeping over the blocks of one forward pass.

    After block n, a running token with halting probability h_n stops once its running sum
    reaches 1 - eps (or at the last block); it then gets the remainder R = 1 - (h_1 + ... +
    h_{n-1}) instead of h_n, so the weights p_1..p_N of its states sum to 1, and the output
    is sum_n p_n x_n. The ponder cost N + R (blocks run, plus the remainder, through which the
    gradient flows) is what the loss charges. A stopped token keeps its state from then on:
    later blocks still read it for their keys and values, but do not change it.
    """

    def __init__(self, x: torch.Tensor, eps: float) -> None:
        batch, num_tokens, _ = x.shape
        zeros = torch.zeros(batch, num_tokens, device=x.device)
        self.eps = eps
        self.cumulative, self.remainder, self.depth = zeros, zeros, zeros  # (B, T) each
        self.halted = torch.zeros(batch, num_tokens, dtype=torch.bool, device=x.device)
        self.output = torch.zeros_like(x)
        self.weights: list[torch.Tensor] = []  # p_n of every block, (B, T) each

    def carry(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        """The block's output for running tokens; the old state for stopped ones."""
        return torch.where(self.halted.unsqueeze(-1), before, after)

    def step(self, x: torch.Tensor, halt: torch.Tensor, last: bool) -> None:
        """Account for one block's states `x` (B, T, C) and halting probabilities `halt` (B, T)."""
        running = ~self.halted
        stopping = running & ((self.cumulative + halt >= 1 - self.eps) | last)
        p = torch.where(stopping, 1 - self.cumulative, halt) * running
        self.weights.append(p)
        self.output = self.output + p.unsqueeze(-1).to(x.dtype) * x
        self.remainder = torch.where(stopping, 1 - self.cumulative, self.remainder)
        self.cumulative = self.cumulative + p
        self.depth = self.depth + running.float()
        self.halted = self.halted | stopping

    @property
    def ponder_cost(self) -> torch.Tensor:
        """N + R per token, (B, T)."""
        return self.depth + self.remainder
