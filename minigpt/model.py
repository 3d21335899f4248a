"""The GPT model: token and position embeddings, a stack of transformer blocks, a final
norm and a linear head that scores every vocabulary entry at every position (chapter 4).

    token ids (B, T) -> tok_emb + pos_emb -> dropout -> n_layers x TransformerBlock
                     -> final LayerNorm -> out_head -> logits (B, T, vocab_size)

It also reads and writes weights in the Hugging Face layouts (chapter 6): OpenAI's GPT-2
(`GPT2LMHeadModel`) and the Llama family chapter 10 builds (`LlamaForCausalLM`,
`Qwen2ForCausalLM`): SmolLM, Qwen2.5, TinyLlama and the like.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minigpt.attention import KVCache, RotaryEmbedding
from minigpt.blocks import AdaptiveDepth, HaltingUnit, TransformerBlock, make_norm
from minigpt.config import PRETRAINED_MODELS, ConfigError, GPTConfig, did_you_mean
from minigpt.download import cache_dir, download_file

HF_BASE_URL = "https://huggingface.co"


def sinusoidal_positions(num_positions: int, emb_dim: int) -> torch.Tensor:
    """The original transformer's fixed position vectors (Vaswani et al., 2017), (P, C):
    sin(p / 10000^(2i / C)) in even dimensions and cos in odd ones."""
    positions = torch.arange(num_positions, dtype=torch.float64).unsqueeze(1)
    frequencies = 10000.0 ** (-torch.arange(0, emb_dim, 2, dtype=torch.float64) / emb_dim)
    table = torch.zeros(num_positions, emb_dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(positions * frequencies)
    table[:, 1::2] = torch.cos(positions * frequencies[:emb_dim // 2])
    return table.float()


@dataclass
class ModelOutput:
    """What a forward pass gives the training loss beside the logits (`model(idx, details=True)`)."""

    logits: torch.Tensor                 # (B, T, vocab_size)
    aux_loss: torch.Tensor | None = None  # the experts' balancing terms and the ponder cost, for the loss to add
    depth: torch.Tensor | None = None     # halting: the blocks each token ran, (B, T)
    weight: float = 1.0                   # the next-token loss of `logits` counts this much (a studio graph's weight)
    heads: list[tuple[float, torch.Tensor]] = field(default_factory=list)  # a graph's other next-token heads: (weight, logits)
    classes: list[tuple[float, torch.Tensor]] = field(default_factory=list)  # a graph's classification heads: (weight, (B, K))


class LanguageModel(nn.Module):
    """Token ids (B, T) in, next-token logits (B, T, vocab_size) out; called with `details=True`, a
    `ModelOutput` with what the training loss adds. `GPTModel` is one; the studio's compiled graphs
    (appendix) are the others."""


class GPTModel(LanguageModel):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        # Where a token sits: a learned vector per position (GPT-2), fixed sine waves added the
        # same way (the original transformer), or nothing here and rotated queries and keys
        # inside attention (RoPE, chapter 10).
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim) if cfg.pos_emb == "learned" else None
        if cfg.pos_emb == "sinusoidal":
            self.register_buffer("sinusoid", sinusoidal_positions(cfg.context_length, cfg.emb_dim), persistent=False)
        rope = RotaryEmbedding(cfg.qk_dim, cfg.context_length, cfg.rope_base) if cfg.pos_emb == "rope" else None
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg, rope) for _ in range(cfg.n_layers)])
        # Adaptive depth (chapter 11): a halting unit after every block but the last, where all stop.
        self.halt_units = nn.ModuleList(HaltingUnit(cfg.emb_dim) for _ in range(cfg.n_layers - 1)) \
            if cfg.halting else None
        self.final_norm = make_norm(cfg)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            # GPT-2 reuses the token embedding as the output head: one (vocab, emb) matrix
            # both reads tokens in and scores them out, saving vocab_size * emb_dim weights.
            self.out_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        if cfg.tie_weights and self.pos_emb is not None:  # token vectors now start at N(0, 0.02):
            nn.init.normal_(self.pos_emb.weight, mean=0.0, std=0.02)  # positions must not drown them
        # GPT-2's scaled init: each block adds two branches to the residual stream, so the
        # layers that write into it start smaller by 1/sqrt(2 * n_layers), keeping the
        # stream's variance from growing with depth.
        for name, param in self.named_parameters():
            if name.endswith(("att.out_proj.weight", "ff.layers.2.weight", "down.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))
        for module in self.modules():  # chapter 11's gates start neutral: tau = 1, halting rarely
            if hasattr(module, "reset_gates"):
                module.reset_gates()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Linear layers as in GPT-2: N(0, 0.02) weights, zero biases, so a new model's logits
        are nearly equal and its first loss is close to ln(vocab_size).

        Embeddings keep PyTorch's N(0, 1): token vectors that start far apart are learned much
        faster on a small corpus (on the-verdict, full mode reaches train loss 5.1 by step 25
        this way and is still at 6.0 by step 45 with GPT-2's N(0, 0.02) embeddings). A tied
        head shares the token embedding and, being a Linear, gives it N(0, 0.02); the
        position embedding then starts at N(0, 0.02) too, or positions would drown the tokens
        (on Tiny Shakespeare, characters, validation loss 3.35 instead of 2.4 after 200 steps).
        """
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, in_idx: torch.Tensor, cache: KVCache | None = None, details: bool = False,
                last_only: bool = False) -> torch.Tensor | ModelOutput:
        """Logits (B, T, vocab_size) for token ids (B, T); with `details`, a `ModelOutput` that
        also holds what the training loss adds (a mixture of experts' balancing terms, the
        halting units' ponder cost) and the blocks each token ran.

        With a `cache` (generation, chapter 6), `in_idx` holds only the tokens that follow
        the cached ones: they take positions cache.length, cache.length + 1, ... and their
        keys and values join the cache. With `last_only`, only the last position is scored,
        (B, 1, vocab_size): all that choosing the next token needs, and the output head is the
        largest matrix product of a small model's step.
        """
        batch_size, num_tokens = in_idx.shape
        past = 0 if cache is None else cache.length
        if past + num_tokens > self.cfg.context_length:
            raise ValueError(f"the input reaches {past + num_tokens} tokens but the model's "
                             f"context_length is {self.cfg.context_length}; crop the input to its "
                             f"last {self.cfg.context_length} tokens.")
        x = self.tok_emb(in_idx)                            # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(past, past + num_tokens, device=in_idx.device))  # + (T, C)
        elif self.cfg.pos_emb == "sinusoidal":
            x = x + self.sinusoid[past:past + num_tokens].to(x.dtype)
        x = self.drop_emb(x)
        adaptive = AdaptiveDepth(x, self.cfg.halting_eps) if self.cfg.halting else None
        for layer, block in enumerate(self.trf_blocks):
            out = block(x, None if cache is None else cache.layers[layer])  # (B, T, C)
            if adaptive is None:
                x = out
                continue
            x = adaptive.carry(x, out)  # a stopped token keeps its state; later blocks still read it
            last = layer == self.cfg.n_layers - 1
            adaptive.step(x, torch.ones_like(adaptive.cumulative) if last else self.halt_units[layer](x), last)
        aux = []
        if self.cfg.ffn == "moe":  # the experts' load-balancing terms, for the training loss to add
            aux.append(sum(block.ff.aux_loss for block in self.trf_blocks))
        if adaptive is not None:  # the states weighted by their halting probabilities, and the ponder cost
            x = adaptive.output
            aux.append(self.cfg.ponder_coef * adaptive.ponder_cost.mean())
        if last_only:
            x = x[:, -1:]                                   # (B, 1, C)
        logits = self.out_head(self.final_norm(x))          # (B, T, vocab_size)
        if not details:
            return logits
        return ModelOutput(logits, sum(aux) if aux else None, adaptive.depth if adaptive is not None else None)

    def new_kv_cache(self, batch_size: int, max_tokens: int | None = None) -> KVCache:
        """An empty cache for `batch_size` sequences of up to `max_tokens` (default: the context)."""
        max_tokens = min(max_tokens or self.cfg.context_length, self.cfg.context_length)
        weight = self.tok_emb.weight
        return KVCache(self.cfg.n_layers, batch_size, self.cfg.kv_heads, max_tokens, self.cfg.head_dim,
                       device=weight.device, dtype=weight.dtype, key_dim=self.cfg.qk_dim)

    def num_parameters(self, exclude_output_head: bool = False) -> int:
        """Trainable weights, each shared tensor counted once.

        With `exclude_output_head`, an untied head is left out: GPT-2's "124M" counts the
        weights as if the head were tied (163,009,536 - 50257 * 768 = 124,412,160).
        """
        total = sum(p.numel() for p in self.parameters())  # .parameters() skips duplicates
        if exclude_output_head and not self.cfg.tie_weights:
            total -= self.out_head.weight.numel()
        return total

    def num_active_parameters(self) -> int:
        """The weights one token runs through: all of them, except in a mixture of experts, whose
        router leaves n_experts - moe_top_k experts of every block idle for each token."""
        total = self.num_parameters()
        if self.cfg.ffn != "moe":
            return total
        expert = sum(p.numel() for p in self.trf_blocks[0].ff.experts[0].parameters())
        return total - self.cfg.n_layers * (self.cfg.n_experts - self.cfg.moe_top_k) * expert

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token at `seq_len` tokens per window (chapter 9).

        Each matrix weight a token meets costs a multiply and an add forward (2 FLOPs) and
        twice that backward: 6 per weight. Embedding lookups cost nothing, a tied head still
        multiplies, and biases and norms are too few to count. Attention adds its scores and
        their weighted sum, 2 x 2 x seq_len x emb_dim per layer forward, so 12 x n_layers x
        emb_dim x seq_len with the backward (the PaLM paper's estimate, causal mask ignored).
        With low-rank attention the scores cost n_heads x attn_rank instead of emb_dim.
        """
        lookups = {self.tok_emb.weight} | ({self.pos_emb.weight} if self.pos_emb is not None else set())
        lookups -= {self.out_head.weight}  # a tied head multiplies
        weights = sum(p.numel() for p in self.parameters() if p.dim() == 2 and p not in lookups)
        if self.cfg.ffn == "moe":  # a token runs through top_k of the n_experts experts only
            expert = sum(p.numel() for p in self.trf_blocks[0].ff.experts[0].parameters() if p.dim() == 2)
            weights -= self.cfg.n_layers * (self.cfg.n_experts - self.cfg.moe_top_k) * expert
        scores_and_sum = self.cfg.n_heads * self.cfg.qk_dim + self.cfg.emb_dim  # q.k, then weights x v
        return 6 * weights + 6 * self.cfg.n_layers * scores_and_sum * seq_len

    def parameter_memory_bytes(self, dtype: torch.dtype = torch.float32) -> int:
        """Memory the weights alone take in `dtype` (fp32: 4 bytes each)."""
        return self.num_parameters() * torch.empty((), dtype=dtype).element_size()

    @classmethod
    def from_pretrained(cls, name: str, dtype: torch.dtype | None = None, cache: str | Path | None = None,
                        base_url: str = HF_BASE_URL) -> "GPTModel":
        """A published model by name (`PRETRAINED_MODELS`: GPT-2's four sizes, SmolLM, Qwen2.5 ...),
        a hub repository ("owner/name"), or a folder holding a Hugging Face model: config.json and
        model.safetensors (or its shards), in the GPT-2, Llama or Qwen2 layout.

        Named models are downloaded once from the Hugging Face hub into `cache` (default
        <cache>/hf/<name>, see MINIGPT_CACHE_DIR); the model comes back in eval mode.
        """
        folder = Path(name)
        if not folder.is_dir():
            folder = download_hf_model(name, cache, base_url)
        hf = read_hf_config(folder)
        model = cls(config_from_hf(hf))
        load_hf_state_dict(model, read_hf_weights(folder), hf)
        if dtype is not None:
            model.to(dtype)
        return model.eval()


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """A Hugging Face model folder's config.json, as a dict."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder} has no config.json; a Hugging Face model folder holds config.json "
                          "and model.safetensors (what save_pretrained writes).")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON ({err}).") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object, the model's settings.")
    return config


def read_hf_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder: model.safetensors, or the shards its index lists."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return read_safetensors(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        raise ConfigError(f"{folder} has no model.safetensors (nor model.safetensors.index.json and its "
                          "shards); minigpt reads safetensors only, never pickled weights (pytorch_model.bin).")
    shards = sorted(set(_read_index(index).values()))
    return {key: value for shard in shards for key, value in read_safetensors(folder / shard).items()}


def _read_index(index: Path) -> dict[str, str]:
    """A sharded model's index: tensor name -> the shard file that holds it."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ConfigError(f"{index} is not a safetensors index (a JSON object with a weight_map): {err!r}.") from None
    return weight_map


# ---------------------------------------------------------------------------------------
# GPT-2 weights in the Hugging Face layout (chapter 6)
# ---------------------------------------------------------------------------------------
#
# OpenAI's GPT-2 checkpoints are published on the Hugging Face hub as safetensors files in
# the layout of `transformers.GPT2LMHeadModel`. Three differences from minigpt's names:
#   - the projections are `Conv1D` layers, which store their weight as (in, out): the
#     transpose of `nn.Linear`'s (out, in);
#   - `c_attn` is the fused query/key/value projection with the same [Q | K | V] order as
#     minigpt's `qkv`, so it needs only the transpose, not a split;
#   - the output head is tied to the token embedding, so the file holds no `lm_head.weight`.

# minigpt name (in block i) -> Hugging Face name, and whether the weight is transposed.
_BLOCK_NAMES = {
    "norm1.scale": ("ln_1.weight", False), "norm1.shift": ("ln_1.bias", False),
    "att.qkv.weight": ("attn.c_attn.weight", True), "att.qkv.bias": ("attn.c_attn.bias", False),
    "att.out_proj.weight": ("attn.c_proj.weight", True), "att.out_proj.bias": ("attn.c_proj.bias", False),
    "norm2.scale": ("ln_2.weight", False), "norm2.shift": ("ln_2.bias", False),
    "ff.layers.0.weight": ("mlp.c_fc.weight", True), "ff.layers.0.bias": ("mlp.c_fc.bias", False),
    "ff.layers.2.weight": ("mlp.c_proj.weight", True), "ff.layers.2.bias": ("mlp.c_proj.bias", False),
}
_TOP_NAMES = {"tok_emb.weight": "wte.weight", "pos_emb.weight": "wpe.weight",
              "final_norm.scale": "ln_f.weight", "final_norm.shift": "ln_f.bias"}


def _has(cfg: GPTConfig, ours: str) -> bool:
    """Whether a model with `cfg` has the parameter `ours` (it may lack biases and shifts)."""
    if ours == "att.qkv.bias":
        return cfg.qkv_bias
    return cfg.bias or not ours.endswith((".bias", ".shift"))


def _hf_names(cfg: GPTConfig, present: bool = True) -> dict[str, tuple[str, bool]]:
    """Every minigpt parameter name -> (Hugging Face name without "transformer.", transposed);
    with present=False, the names GPT-2 has and this model lacks (biases) instead."""
    names = {ours: (theirs, False) for ours, theirs in _TOP_NAMES.items() if _has(cfg, ours) == present}
    for i in range(cfg.n_layers):
        for ours, (theirs, transposed) in _BLOCK_NAMES.items():
            if _has(cfg, ours) == present:
                names[f"trf_blocks.{i}.{ours}"] = (f"h.{i}.{theirs}", transposed)
    return names


# transformers' names for the activations minigpt computes.
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def config_from_hf_gpt2(hf: dict[str, Any]) -> GPTConfig:
    """The `GPTConfig` of a Hugging Face GPT-2 config.json, refusing settings minigpt computes differently."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ConfigError(f"this is a {hf.get('model_type')!r} model; minigpt loads GPT-2 (model_type 'gpt2').")
    different = {
        "activation_function": hf.get("activation_function", "gelu_new") not in HF_ACTIVATIONS,
        "n_inner": hf.get("n_inner") not in (None, 4 * hf["n_embd"]),
        "scale_attn_weights": not hf.get("scale_attn_weights", True),
        "scale_attn_by_inverse_layer_idx": hf.get("scale_attn_by_inverse_layer_idx", False),
        "add_cross_attention": hf.get("add_cross_attention", False),
    }
    unsupported = [f"{key}={hf.get(key)!r}" for key, differs in different.items() if differs]
    if unsupported:
        raise ConfigError(f"this GPT-2 variant computes something minigpt's GPT-2 does not "
                          f"({', '.join(unsupported)}); only the standard GPT-2 settings load.")
    return GPTConfig(vocab_size=hf["vocab_size"], context_length=hf["n_positions"], emb_dim=hf["n_embd"],
                     n_heads=hf["n_head"], n_layers=hf["n_layer"], drop_rate=0.0, qkv_bias=True,
                     tie_weights=hf.get("tie_word_embeddings", True), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                     activation=HF_ACTIVATIONS[hf.get("activation_function", "gelu_new")])


def hf_gpt2_config(cfg: GPTConfig, eos_id: int | None = None) -> dict[str, Any]:
    """The config.json with which `transformers.GPT2LMHeadModel` rebuilds a minigpt model; `eos_id`
    is its tokenizer's end-of-text (GPT-2's "<|endoftext|>" is 50256 when the vocabulary is GPT-2's)."""
    if eos_id is None and cfg.vocab_size == 50257:
        eos_id = 50256
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length, "n_embd": cfg.emb_dim,
            "n_head": cfg.n_heads, "n_layer": cfg.n_layers, "n_inner": None,
            "activation_function": "gelu_new" if cfg.activation == "gelu_tanh" else "gelu",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.drop_rate, "embd_pdrop": cfg.drop_rate, "attn_pdrop": cfg.drop_rate,
            "tie_word_embeddings": cfg.tie_weights, "bos_token_id": eos_id, "eos_token_id": eos_id}


def require_gpt2_architecture(cfg: GPTConfig) -> None:
    """GPT-2's weight layout has LayerNorm, learned positions, a GELU MLP and one K/V per head."""
    if not cfg.gpt2_compatible:
        raise ConfigError("this model is not GPT-2's architecture (norm, pos_emb, ffn, ffn_hidden or n_kv_heads "
                          "differ), so GPT-2's weight layout cannot hold it; keep it as a minigpt run.")


def load_hf_gpt2_state_dict(model: GPTModel, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy a Hugging Face GPT-2 state dict (with or without the "transformer." prefix) into `model`.

    Every weight the model needs must be there with the right shape; the attention-mask
    buffers some files carry (`attn.bias`, `attn.masked_bias`) are not weights and are skipped.
    """
    require_gpt2_architecture(model.cfg)
    theirs = {key.removeprefix("transformer."): value for key, value in state_dict.items()
              if not key.endswith((".attn.bias", ".attn.masked_bias"))}
    names = _hf_names(model.cfg)
    expected = {hf_name for hf_name, _ in names.values()}
    missing = sorted(expected - set(theirs))
    absent = {hf_name for hf_name, _ in _hf_names(model.cfg, present=False).values()}  # biases it lacks
    extra = sorted(set(theirs) - expected - {"lm_head.weight"} - absent)
    if missing or extra:
        raise ConfigError(f"these GPT-2 weights do not fit a model with {model.cfg.n_layers} layers: "
                          f"missing {missing[:4] or 'none'}, unexpected {extra[:4] or 'none'}.")
    ours = dict(model.named_parameters())
    with torch.no_grad():
        for our_name, (hf_name, transposed) in names.items():
            value = theirs[hf_name].t() if transposed else theirs[hf_name]
            if value.shape != ours[our_name].shape:
                raise ConfigError(f"{hf_name} has shape {tuple(value.shape)}, but {our_name} needs "
                                  f"{tuple(ours[our_name].shape)}: the config does not match the weights.")
            ours[our_name].copy_(value)
        for hf_name in sorted(absent & set(theirs)):  # zeros are no bias at all; anything else is lost
            if theirs[hf_name].abs().max() > 0:
                fix = "qkv_bias=True" if hf_name.endswith("c_attn.bias") else "bias=True"
                raise ConfigError(f"the weights have a non-zero {hf_name} but the model was built without "
                                  f"that bias; build it with {fix}.")
        if not model.cfg.tie_weights:  # an untied head: the file's own, or a copy of the embedding
            head = state_dict.get("lm_head.weight", theirs["wte.weight"])
            model.out_head.weight.copy_(head)


def to_hf_gpt2_state_dict(model: GPTModel) -> dict[str, torch.Tensor]:
    """The model's weights under `transformers.GPT2LMHeadModel`'s names (the inverse of loading)."""
    require_gpt2_architecture(model.cfg)
    ours = dict(model.named_parameters())
    state = {}
    for our_name, (hf_name, transposed) in _hf_names(model.cfg).items():
        value = ours[our_name].detach()
        state["transformer." + hf_name] = (value.t() if transposed else value).contiguous()
    # GPT-2 always has its biases: zeros compute the same thing as none.
    sizes = {"c_attn": 3 * model.cfg.emb_dim, "c_fc": 4 * model.cfg.emb_dim}
    for hf_name, _ in _hf_names(model.cfg, present=False).values():
        size = sizes.get(hf_name.split(".")[-2], model.cfg.emb_dim)
        state["transformer." + hf_name] = torch.zeros(size, dtype=model.tok_emb.weight.dtype)
    if not model.cfg.tie_weights:
        state["lm_head.weight"] = model.out_head.weight.detach().contiguous()
    return state


# ---------------------------------------------------------------------------------------
# Llama-family weights in the Hugging Face layout (chapters 6 and 10)
# ---------------------------------------------------------------------------------------
#
# Llama, and Qwen2, Mistral, SmolLM and TinyLlama after it, is chapter 10's architecture:
# RMSNorm, RoPE, SwiGLU and grouped-query attention, no learned positions. Its layout differs
# from minigpt's names in two ways:
#   - the query, key and value projections are three matrices (q_proj, k_proj, v_proj);
#     minigpt stacks them into one `qkv` (rows: the queries, then the keys, then the values);
#   - every projection is an nn.Linear, so nothing is transposed.
# RoPE needs no change: both pair dimension i with i + head_dim / 2 ("rotate half"). Meta's
# original files paired 2i with 2i + 1; the conversion to the hub's layout permuted the query
# and key rows once, so every Llama-family file on the hub is in the split-halves layout.
# Qwen2 is Llama with biases on q, k and v only; Llama itself puts them on q, k, v and o
# (attention_bias) and on the MLP (mlp_bias) or nowhere.

LLAMA_FAMILY = ("llama", "qwen2", "mistral")  # model_type values minigpt reads as chapter 10's architecture
# minigpt name (in block i) -> Hugging Face name (in model.layers.i), besides the fused qkv.
_LLAMA_BLOCK_NAMES = {
    "norm1.scale": "input_layernorm.weight", "norm2.scale": "post_attention_layernorm.weight",
    "att.out_proj.weight": "self_attn.o_proj.weight", "att.out_proj.bias": "self_attn.o_proj.bias",
    "ff.gate.weight": "mlp.gate_proj.weight", "ff.gate.bias": "mlp.gate_proj.bias",
    "ff.up.weight": "mlp.up_proj.weight", "ff.up.bias": "mlp.up_proj.bias",
    "ff.down.weight": "mlp.down_proj.weight", "ff.down.bias": "mlp.down_proj.bias",
}


def llama_family(cfg: GPTConfig) -> str:
    """The Hugging Face model_type that computes a chapter-10 model exactly: "qwen2" when only
    q, k and v have biases, else "llama"; raises when the architecture is not Llama's."""
    llama = (cfg.norm, cfg.pos_emb, cfg.ffn, cfg.qk_dim, cfg.attn_tau, cfg.halting) == \
        ("rmsnorm", "rope", "swiglu", cfg.head_dim, False, False)
    if not llama:
        raise ConfigError(f"this model ({cfg.architecture() or 'layernorm, learned positions, gelu'}) is neither "
                          "GPT-2's architecture (layernorm, learned positions, a GELU MLP, one K/V per head) "
                          "nor Llama's (rmsnorm, RoPE, SwiGLU, any number of K/V heads), and no Hugging Face "
                          "class computes it; keep it as a minigpt run.")
    return "qwen2" if cfg.qkv_bias and not cfg.bias else "llama"


def _rope_theta(hf: dict[str, Any]) -> tuple[float, str]:
    """RoPE's base and scaling type, from either spelling transformers has used in config.json."""
    parameters = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta", parameters.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type")) or parameters.get("rope_type") or "default"
    return float(theta), kind


def config_from_hf_llama(hf: dict[str, Any]) -> GPTConfig:
    """The `GPTConfig` of a Llama, Qwen2 or Mistral config.json, refusing what minigpt computes differently."""
    model_type, heads, width = hf.get("model_type"), hf["num_attention_heads"], hf["hidden_size"]
    theta, rope_kind = _rope_theta(hf)
    window = hf.get("sliding_window") if model_type == "mistral" or hf.get("use_sliding_window") else None
    different = {
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
        "head_dim": (hf.get("head_dim") or width // heads) * heads != width,
        "rope_scaling": rope_kind != "default",
        "partial_rotary_factor": hf.get("partial_rotary_factor", 1.0) != 1.0,
        "sliding_window": window is not None and window < hf.get("max_position_embeddings", 0),
    }
    unsupported = [f"{key}={hf.get(key, rope_kind if key == 'rope_scaling' else None)!r}"
                   for key, differs in different.items() if differs]
    if unsupported:
        raise ConfigError(f"this {model_type} model computes something minigpt does not ({', '.join(unsupported)}): "
                          "minigpt's RoPE has no scaling (it rotates every dimension by base^(-2i/d)), its "
                          "attention sees the whole context, and its head width is hidden_size / heads.")
    if model_type == "qwen2":  # biases on q, k and v, nowhere else
        qkv_bias, other_bias = True, False
    else:
        qkv_bias = hf.get("attention_bias", False)
        other_bias = qkv_bias or hf.get("mlp_bias", False)
    return GPTConfig(vocab_size=hf["vocab_size"], context_length=hf["max_position_embeddings"], emb_dim=width,
                     n_heads=heads, n_layers=hf["num_hidden_layers"], drop_rate=0.0, qkv_bias=qkv_bias,
                     bias=other_bias, tie_weights=hf.get("tie_word_embeddings", False), norm="rmsnorm",
                     norm_eps=hf.get("rms_norm_eps", 1e-6), pos_emb="rope", rope_base=theta, ffn="swiglu",
                     ffn_hidden=hf["intermediate_size"], n_kv_heads=hf.get("num_key_value_heads") or heads)


def hf_llama_config(cfg: GPTConfig, eos_id: int | None = None) -> dict[str, Any]:
    """The config.json with which `LlamaForCausalLM` (or `Qwen2ForCausalLM`) rebuilds a minigpt model."""
    family = llama_family(cfg)
    config = {"architectures": ["Qwen2ForCausalLM" if family == "qwen2" else "LlamaForCausalLM"],
              "model_type": family, "vocab_size": cfg.vocab_size, "hidden_size": cfg.emb_dim,
              "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
              "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "hidden_act": "silu",
              "max_position_embeddings": cfg.context_length, "rms_norm_eps": cfg.norm_eps,
              "rope_theta": cfg.rope_base, "rope_scaling": None, "attention_dropout": 0.0,
              "tie_word_embeddings": cfg.tie_weights, "initializer_range": 0.02, "use_cache": True,
              "bos_token_id": eos_id, "eos_token_id": eos_id}
    if family == "llama":
        config.update(head_dim=cfg.head_dim, attention_bias=cfg.bias, mlp_bias=cfg.bias)
    else:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    return config


def _llama_names(cfg: GPTConfig) -> dict[str, tuple[str, ...]]:
    """Every minigpt parameter -> the Hugging Face tensors it holds, stacked along the rows
    (the fused qkv holds q_proj, k_proj and v_proj)."""
    names = {"tok_emb.weight": ("model.embed_tokens.weight",), "final_norm.scale": ("model.norm.weight",)}
    if not cfg.tie_weights:
        names["out_head.weight"] = ("lm_head.weight",)
    for i in range(cfg.n_layers):
        ours, theirs = f"trf_blocks.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            names[f"{ours}att.qkv.{kind}"] = tuple(f"{theirs}self_attn.{x}_proj.{kind}" for x in "qkv")
        for our_name, hf_name in _LLAMA_BLOCK_NAMES.items():
            if cfg.bias or not our_name.endswith(".bias"):
                names[ours + our_name] = (theirs + hf_name,)
    return names


def _qkv_rows(cfg: GPTConfig) -> list[int]:
    """The rows of the fused qkv that are q_proj's, k_proj's and v_proj's."""
    return [cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim]


def _llama_biases(cfg: GPTConfig, family: str, attention_bias: bool, mlp_bias: bool) -> dict[str, int]:
    """The biases a Hugging Face model of this `family` has: name -> length."""
    (q, kv, _), width, hidden = _qkv_rows(cfg), cfg.emb_dim, cfg.hidden_dim
    sizes = {}
    for i in range(cfg.n_layers):
        at = f"model.layers.{i}."
        if family == "qwen2" or attention_bias:
            sizes.update({f"{at}self_attn.q_proj.bias": q, f"{at}self_attn.k_proj.bias": kv,
                          f"{at}self_attn.v_proj.bias": kv})
        if family != "qwen2" and attention_bias:
            sizes[f"{at}self_attn.o_proj.bias"] = width
        if family != "qwen2" and mlp_bias:
            sizes.update({f"{at}mlp.gate_proj.bias": hidden, f"{at}mlp.up_proj.bias": hidden,
                          f"{at}mlp.down_proj.bias": width})
    return sizes


def to_hf_llama_state_dict(model: GPTModel) -> dict[str, torch.Tensor]:
    """The model's weights under `LlamaForCausalLM`'s (or `Qwen2ForCausalLM`'s) names."""
    cfg = model.cfg
    family = llama_family(cfg)
    ours = dict(model.named_parameters())
    state = {}
    for our_name, hf_names in _llama_names(cfg).items():
        value = ours[our_name].detach()
        if len(hf_names) == 3:  # (q, k, v) rows of the fused projection
            state.update(zip(hf_names, (part.contiguous() for part in value.split(_qkv_rows(cfg)))))
        else:
            state[hf_names[0]] = value.contiguous()
    dtype = model.tok_emb.weight.dtype
    for name, size in _llama_biases(cfg, family, cfg.bias, cfg.bias).items():
        state.setdefault(name, torch.zeros(size, dtype=dtype))  # a bias minigpt's model lacks: zeros
    return state


def load_hf_llama_state_dict(model: GPTModel, state_dict: dict[str, torch.Tensor],
                             family: str = "llama", attention_bias: bool = False, mlp_bias: bool = False) -> None:
    """Copy a Llama-family state dict into `model`. Biases one side has and the other lacks are
    zeros (none at all); a non-zero one the model cannot hold is refused."""
    cfg = model.cfg
    theirs = {key: value for key, value in state_dict.items() if not key.endswith("rotary_emb.inv_freq")}
    names = _llama_names(cfg)
    expected = {hf_name for hf_names in names.values() for hf_name in hf_names}
    optional = set(_llama_biases(cfg, family, attention_bias, mlp_bias)) | {"lm_head.weight"}
    missing = sorted(name for name in expected - set(theirs) if not name.endswith(".bias"))
    extra = sorted(set(theirs) - expected - optional)
    if missing or extra:
        raise ConfigError(f"these {family} weights do not fit a model with {cfg.n_layers} layers: "
                          f"missing {missing[:4] or 'none'}, unexpected {extra[:4] or 'none'}.")
    ours = dict(model.named_parameters())
    with torch.no_grad():
        for our_name, hf_names in names.items():
            sizes = _qkv_rows(cfg) if len(hf_names) == 3 else [ours[our_name].shape[0]]
            parts = [theirs[n] if n in theirs else torch.zeros(size)  # a bias the file lacks is zeros
                     for n, size in zip(hf_names, sizes)]
            value = torch.cat(parts) if len(parts) > 1 else parts[0]
            if value.shape != ours[our_name].shape:
                raise ConfigError(f"{hf_names[0]} and its kin give shape {tuple(value.shape)}, but {our_name} "
                                  f"needs {tuple(ours[our_name].shape)}: the config does not match the weights.")
            ours[our_name].copy_(value)
        for hf_name in sorted((set(theirs) & optional) - expected - {"lm_head.weight"}):
            if theirs[hf_name].abs().max() > 0:
                raise ConfigError(f"the weights have a non-zero {hf_name} but the model was built without "
                                  "that bias; build it from the folder's config.json (GPTModel.from_pretrained).")


# ---------------------------------------------------------------------------------------
# Either layout: what --task export writes and --pretrained reads
# ---------------------------------------------------------------------------------------

def hf_model_type(cfg: GPTConfig) -> str:
    """"gpt2", "llama" or "qwen2": the Hugging Face class that computes this model exactly."""
    return "gpt2" if cfg.gpt2_compatible else llama_family(cfg)


def config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """The `GPTConfig` of a Hugging Face config.json of any layout minigpt reads."""
    if "model_type" not in hf and "n_embd" not in hf:
        raise ConfigError("this config.json is not a Hugging Face model's (it names no model_type): a minigpt "
                          "run directory is read with --checkpoint DIR, not --pretrained.")
    model_type = hf.get("model_type", "gpt2")
    try:
        if model_type == "gpt2":
            return config_from_hf_gpt2(hf)
        if model_type in LLAMA_FAMILY:
            return config_from_hf_llama(hf)
    except KeyError as err:
        raise ConfigError(f"this {model_type} config.json lacks {err.args[0]!r}; the file is incomplete: download "
                          "it again.") from None
    raise ConfigError(f"this is a {model_type!r} model; minigpt reads GPT-2 (model_type 'gpt2') and the Llama "
                      f"family ({', '.join(map(repr, LLAMA_FAMILY))}): the architectures its GPTModel computes.")


def hf_config(cfg: GPTConfig, eos_id: int | None = None) -> dict[str, Any]:
    """The config.json of an export: GPT-2's or Llama's (Qwen2's) layout, whichever computes `cfg`."""
    return hf_gpt2_config(cfg, eos_id) if hf_model_type(cfg) == "gpt2" else hf_llama_config(cfg, eos_id)


def load_hf_state_dict(model: GPTModel, state_dict: dict[str, torch.Tensor], hf: dict[str, Any] | None = None) -> None:
    """Copy Hugging Face weights into `model`; `hf` is their config.json (which layout and which biases)."""
    hf = hf or {"model_type": hf_model_type(model.cfg)}
    if hf.get("model_type", "gpt2") == "gpt2":
        load_hf_gpt2_state_dict(model, state_dict)
    else:
        load_hf_llama_state_dict(model, state_dict, hf.get("model_type"), hf.get("attention_bias", False),
                                 hf.get("mlp_bias", False))


def to_hf_state_dict(model: GPTModel) -> dict[str, torch.Tensor]:
    """The model's weights under the names of the Hugging Face class that computes it."""
    return to_hf_gpt2_state_dict(model) if hf_model_type(model.cfg) == "gpt2" else to_hf_llama_state_dict(model)


def save_hf_model(model: GPTModel, directory: str | Path, eos_id: int | None = None) -> Path:
    """Write config.json + model.safetensors, which `transformers.AutoModelForCausalLM` loads
    (as GPT2LMHeadModel, LlamaForCausalLM or Qwen2ForCausalLM)."""
    from safetensors.torch import save_file

    config = hf_config(model.cfg, eos_id)  # refuses an architecture no class computes, before writing
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {name: value.cpu() for name, value in to_hf_state_dict(model).items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def save_hf_gpt2(model: GPTModel, directory: str | Path) -> Path:
    """Write config.json + model.safetensors, which `GPT2LMHeadModel.from_pretrained(directory)` loads."""
    require_gpt2_architecture(model.cfg)
    return save_hf_model(model, directory)


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file: no pickle, so nothing in it can run code."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ConfigError(f"could not read {path} as safetensors ({err}); the file is incomplete "
                          "or corrupt: delete it and download it again.") from None


def hub_repo(name: str) -> str:
    """The hub repository of a `PRETRAINED_MODELS` name, or `name` itself when it reads owner/name."""
    if name in PRETRAINED_MODELS:
        return PRETRAINED_MODELS[name].repo
    if name.count("/") == 1 and all(name.split("/")):
        return name
    raise ConfigError(f"unknown pretrained model {name!r}: choose one of {', '.join(map(repr, PRETRAINED_MODELS))}, "
                      "give a hub repository as owner/name (e.g. HuggingFaceTB/SmolLM2-135M), or the path of a "
                      f"folder holding config.json and model.safetensors.{did_you_mean(name, list(PRETRAINED_MODELS))}")


def download_hf_model(name: str, cache: str | Path | None = None, base_url: str = HF_BASE_URL,
                      extra_files: tuple[str, ...] = ()) -> Path:
    """Download a hub model's config.json and weights (and `extra_files`, where the repository has
    them, e.g. its tokenizer), once; return their folder."""
    repo = hub_repo(name)
    folder = Path(cache) if cache is not None else cache_dir() / "hf" / name.replace("/", "--")
    repo_url = f"{base_url.rstrip('/')}/{repo}/resolve/main"
    try:
        download_file(f"{repo_url}/config.json", folder / "config.json")
        _download_weights(repo_url, folder)
    except ConfigError as err:
        files = "config.json, model.safetensors" + (" and tokenizer.json" if "tokenizer.json" in extra_files else "")
        raise ConfigError(f"{err} {name} needs {files} from https://huggingface.co/{repo} in {folder}; or pass "
                          "any folder holding them (--pretrained path/to/folder).") from None
    for filename in extra_files:
        try:
            download_file(f"{repo_url}/{filename}", folder / filename)
        except ConfigError:
            pass  # not every repository has every tokenizer file; what is there is read
    return folder


def _download_weights(repo_url: str, folder: Path) -> None:
    """model.safetensors; a repository too large for one file has an index and shards instead."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():  # (a cached index means a sharded model: no need to ask for one file)
        try:
            download_file(f"{repo_url}/model.safetensors", folder / "model.safetensors")
            return
        except ConfigError as single:
            try:
                download_file(f"{repo_url}/{index.name}", index)
            except ConfigError:
                raise single from None
    for shard in sorted(set(_read_index(index).values())):
        download_file(f"{repo_url}/{shard}", folder / shard)
