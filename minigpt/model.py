"""The GPT model: token and position embeddings, a stack of transformer blocks, a final
norm and a linear head that scores every vocabulary entry at every position (chapter 4).

    token ids (B, T) -> tok_emb + pos_emb -> dropout -> n_layers x TransformerBlock
                     -> final LayerNorm -> out_head -> logits (B, T, vocab_size)

It also reads and writes OpenAI's GPT-2 weights in the Hugging Face layout (chapter 6).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minigpt.attention import KVCache, RotaryEmbedding
from minigpt.blocks import AdaptiveDepth, HaltingUnit, TransformerBlock, make_norm
from minigpt.config import ConfigError, GPTConfig, did_you_mean
from minigpt.data import cache_dir, download_file

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


class GPTModel(nn.Module):
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

    def forward(self, in_idx: torch.Tensor, cache: KVCache | None = None,
                details: bool = False) -> torch.Tensor | ModelOutput:
        """Logits (B, T, vocab_size) for token ids (B, T); with `details`, a `ModelOutput` that
        also holds what the training loss adds (a mixture of experts' balancing terms, the
        halting units' ponder cost) and the blocks each token ran.

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
        """OpenAI's GPT-2 ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"), or a folder holding a
        Hugging Face GPT-2 (config.json + model.safetensors, e.g. from `save_hf_gpt2`).

        Named models are downloaded once from the Hugging Face hub into `cache` (default
        <cache>/hf/<name>, see MINIGPT_CACHE_DIR); the model comes back in eval mode.
        """
        folder = Path(name)
        if not folder.is_dir():
            folder = download_hf_gpt2(name, cache, base_url)
        for filename in ("config.json", "model.safetensors"):
            if not (folder / filename).is_file():
                raise ConfigError(f"{folder} has no {filename}; a Hugging Face GPT-2 folder holds "
                                  "config.json and model.safetensors.")
        try:
            hf_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{folder / 'config.json'} is not valid JSON ({err}).") from None
        model = cls(config_from_hf_gpt2(hf_config))
        load_hf_gpt2_state_dict(model, read_safetensors(folder / "model.safetensors"))
        if dtype is not None:
            model.to(dtype)
        return model.eval()


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
        "layer_norm_epsilon": hf.get("layer_norm_epsilon", 1e-5) != 1e-5,
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
                     tie_weights=hf.get("tie_word_embeddings", True),
                     activation=HF_ACTIVATIONS[hf.get("activation_function", "gelu_new")])


def hf_gpt2_config(cfg: GPTConfig) -> dict[str, Any]:
    """The config.json with which `transformers.GPT2LMHeadModel` rebuilds a minigpt model."""
    gpt2_vocab = cfg.vocab_size == 50257  # GPT-2's tokenizer: "<|endoftext|>" is id 50256
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length, "n_embd": cfg.emb_dim,
            "n_head": cfg.n_heads, "n_layer": cfg.n_layers, "n_inner": None,
            "activation_function": "gelu_new" if cfg.activation == "gelu_tanh" else "gelu",
            "layer_norm_epsilon": 1e-5,
            "resid_pdrop": cfg.drop_rate, "embd_pdrop": cfg.drop_rate, "attn_pdrop": cfg.drop_rate,
            "tie_word_embeddings": cfg.tie_weights,
            "bos_token_id": 50256 if gpt2_vocab else None, "eos_token_id": 50256 if gpt2_vocab else None}


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


def save_hf_gpt2(model: GPTModel, directory: str | Path) -> Path:
    """Write config.json + model.safetensors, which `GPT2LMHeadModel.from_pretrained(directory)` loads."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_gpt2_config(model.cfg), indent=2) + "\n")
    state = {name: value.cpu() for name, value in to_hf_gpt2_state_dict(model).items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file: no pickle, so nothing in it can run code."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ConfigError(f"could not read {path} as safetensors ({err}); the file is incomplete "
                          "or corrupt: delete it and download it again.") from None


HF_GPT2_REPOS = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
                 "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}


def download_hf_gpt2(name: str, cache: str | Path | None = None, base_url: str = HF_BASE_URL) -> Path:
    """Download a GPT-2's config.json and model.safetensors from the hub, once; return their folder."""
    if name not in HF_GPT2_REPOS:
        raise ConfigError(f"unknown pretrained model {name!r}: choose one of "
                          f"{', '.join(map(repr, HF_GPT2_REPOS))}, or give the path of a folder "
                          f"holding config.json and model.safetensors.{did_you_mean(name, list(HF_GPT2_REPOS))}")
    folder = Path(cache) if cache is not None else cache_dir() / "hf" / name
    repo_url = f"{base_url.rstrip('/')}/{HF_GPT2_REPOS[name]}/resolve/main"
    for filename in ("config.json", "model.safetensors"):
        try:
            download_file(f"{repo_url}/{filename}", folder / filename)
        except ConfigError as err:
            raise ConfigError(f"{err} {name} needs both config.json and model.safetensors from "
                              f"https://huggingface.co/{HF_GPT2_REPOS[name]} in {folder}; or pass any "
                              "folder holding them (--pretrained path/to/folder).") from None
    return folder
