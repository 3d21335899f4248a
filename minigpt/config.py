"""Configuration: the model's shape (`GPTConfig`), the training settings (`TrainConfig`,
`FinetuneConfig`, `AlignConfig`) and one run's settings (`RunConfig`), as validated dataclasses.

Every value a user can set is checked here, before any data is read or any weight is
allocated, and every error names the setting, the value given and what to change. How
`config_run.py`, the modes and the command-line flags combine into a `RunConfig` is
`minigpt.settings`'s job.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any


class ConfigError(ValueError):
    """A setting, file or input the user gave cannot be used; the message says what to change."""


# ---------------------------------------------------------------------------------------
# Small validators shared by the dataclasses below
# ---------------------------------------------------------------------------------------

def check_int(where: str, value: Any, low: int = 1, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be a whole number, got {value!r} ({type(value).__name__}).")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"{where} must be {bound}, got {value}.")


def check_float(where: str, value: Any, low: float, high: float | None = None,
                 low_inclusive: bool = True, high_inclusive: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}.")
    too_low = value < low if low_inclusive else value <= low
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        left = "[" if low_inclusive else "("
        right = "]" if high_inclusive else ")"
        upper = high if high is not None else "inf"
        raise ConfigError(f"{where} must lie in {left}{low}, {upper}{right}, got {value}.")


def check_choice(where: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(repr, choices))}, "
                          f"got {value!r}.{did_you_mean(value, choices)}")


def did_you_mean(given: Any, valid: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(given), list(valid), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def check_keys(where: str, given: dict, valid: list[str]) -> None:
    """Reject unknown keys, suggesting the closest valid one."""
    for key in given:
        if key not in valid:
            raise ConfigError(f"unknown key {key!r} in {where}.{did_you_mean(key, valid)} "
                              f"Valid keys: {', '.join(valid)}.")


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------

ACTIVATIONS = ("gelu_tanh", "gelu")
NORMS = ("layernorm", "rmsnorm")
POSITION_EMBEDDINGS = ("learned", "sinusoidal", "rope")
FFNS = ("gelu", "swiglu", "moe")


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT, with the book's names. Defaults are GPT-2 small (124M)."""

    vocab_size: int = 50257     # tokens the embedding and output head know
    context_length: int = 1024  # longest sequence the positional embedding covers
    emb_dim: int = 768          # width of every token vector
    n_heads: int = 12           # attention heads per block (emb_dim splits evenly among them)
    n_layers: int = 12          # transformer blocks
    drop_rate: float = 0.1      # dropout on embeddings, attention weights and residual branches
    qkv_bias: bool = False      # bias in the query/key/value projections (GPT-2 had one)
    bias: bool = True           # biases in the other linear layers and LayerNorm shifts (nanoGPT drops them)
    tie_weights: bool = False   # output head shares the token embedding matrix (GPT-2 did)
    activation: str = "gelu_tanh"  # GPT-2's tanh-approximated GELU, or "gelu": the exact x * Phi(x)
    # Modern architectures (chapter 10): each a switch on the same GPTModel.
    norm: str = "layernorm"     # or "rmsnorm": scale by the root mean square, no centring, no shift
    norm_eps: float = 1e-5      # added to the variance (or mean square) before the root: GPT-2 and Llama 1e-5, Qwen2 1e-6
    pos_emb: str = "learned"    # a learned table (GPT-2), fixed "sinusoidal" waves, or "rope": rotated q and k
    rope_base: float = 10000.0  # RoPE: the wavelengths run from 2 pi to about 2 pi x rope_base
    ffn: str = "gelu"           # GPT-2's GELU MLP, "swiglu" (gated), or "moe": a mixture of SwiGLU experts
    ffn_hidden: int | None = None  # the MLP's width (None: 4 x emb_dim for gelu; 8/3 x emb_dim, rounded
                                   # up to a multiple of 8, for swiglu and each expert: the same parameters)
    n_kv_heads: int | None = None  # key/value heads (None: n_heads); fewer: grouped-query attention, 1: multi-query
    n_experts: int = 4          # moe: expert MLPs per block
    moe_top_k: int = 2          # moe: experts each token is sent to
    moe_shared_expert: bool = False  # moe: one more expert that every token uses
    moe_aux_coef: float = 0.01  # moe: weight of the load-balancing loss (Switch Transformer's)
    moe_z_coef: float = 0.0     # moe: weight of the router z-loss (keeps the router's logits small)
    # Research variants (chapter 11), all off by default:
    attn_rank: int | None = None  # queries and keys in this many dimensions per head (None: head_dim)
    attn_tau: bool = False      # a learned temperature per head and token, tau = softplus(w . x + b), divides the scores
    halting: bool = False       # adaptive depth: a halting unit after each block lets each token stop early (ACT)
    ponder_coef: float = 0.01   # halting: weight of the ponder cost (layers used + remainder) in the loss
    halting_eps: float = 0.01   # halting: a token stops once its halting probabilities reach 1 - halting_eps

    def __post_init__(self) -> None:
        check_int("vocab_size", self.vocab_size)
        check_int("context_length", self.context_length)
        check_int("emb_dim", self.emb_dim)
        check_int("n_heads", self.n_heads)
        check_int("n_layers", self.n_layers)
        check_float("drop_rate", self.drop_rate, 0.0, 1.0, high_inclusive=False)
        for name in ("qkv_bias", "bias", "tie_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("norm", self.norm, NORMS)
        check_float("norm_eps", self.norm_eps, 0.0, 0.1, low_inclusive=False)
        check_choice("pos_emb", self.pos_emb, POSITION_EMBEDDINGS)
        check_float("rope_base", self.rope_base, 1.0, low_inclusive=False)
        check_choice("ffn", self.ffn, FFNS)
        if self.ffn_hidden is not None:
            check_int("ffn_hidden", self.ffn_hidden)
        check_int("n_experts", self.n_experts)
        check_int("moe_top_k", self.moe_top_k, high=self.n_experts)
        if not isinstance(self.moe_shared_expert, bool):
            raise ConfigError(f"moe_shared_expert must be True or False, got {self.moe_shared_expert!r}.")
        check_float("moe_aux_coef", self.moe_aux_coef, 0.0)
        check_float("moe_z_coef", self.moe_z_coef, 0.0)
        if self.n_kv_heads is not None:
            check_int("n_kv_heads", self.n_kv_heads)
            if self.n_heads % self.n_kv_heads:
                raise ConfigError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads}): each "
                                  f"key/value head serves a whole group of query heads. Pick one of "
                                  f"{[d for d in range(1, self.n_heads + 1) if self.n_heads % d == 0]}.")
        if self.emb_dim % self.n_heads != 0:
            divisors = [h for h in range(1, min(self.emb_dim, 64) + 1) if self.emb_dim % h == 0]
            raise ConfigError(
                f"emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads}) so each "
                f"head gets emb_dim // n_heads dimensions; pick n_heads from {divisors} "
                f"or change emb_dim to a multiple of {self.n_heads}.")

        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ConfigError(f"RoPE rotates pairs of dimensions, so each head needs an even width; "
                              f"emb_dim / n_heads is {self.head_dim}.")
        if self.attn_rank is not None:
            check_int("attn_rank", self.attn_rank, high=self.head_dim)
            if self.pos_emb == "rope" and self.attn_rank % 2:
                raise ConfigError(f"attn_rank ({self.attn_rank}) must be even with RoPE, which rotates pairs of "
                                  "the query's and key's dimensions.")
        for name in ("attn_tau", "halting"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        check_float("ponder_coef", self.ponder_coef, 0.0)
        check_float("halting_eps", self.halting_eps, 0.0, 1.0, low_inclusive=False, high_inclusive=False)

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_heads, or n_heads (plain multi-head attention)."""
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        """The MLP's inner width: ffn_hidden, or the one that gives each kind GPT-2's 8 x emb_dim^2
        weights (a gated MLP has three matrices, so 8/3 x emb_dim, rounded up to a multiple of 8)."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        if self.ffn == "gelu":
            return 4 * self.emb_dim
        return -(-8 * self.emb_dim // 3 // 8) * 8

    def architecture(self) -> str:
        """One line for a run's header: what differs from GPT-2's architecture ("" if nothing)."""
        parts = [self.norm] if self.norm != "layernorm" else []
        if self.pos_emb != "learned":
            parts.append("RoPE" if self.pos_emb == "rope" else "sinusoidal positions")
        if self.ffn == "swiglu":
            parts.append(f"SwiGLU (hidden {self.hidden_dim})")
        elif self.ffn == "moe":
            parts.append(f"{self.n_experts} SwiGLU experts, top-{self.moe_top_k}"
                         + (" + a shared one" if self.moe_shared_expert else ""))
        if self.kv_heads != self.n_heads:
            parts.append(f"{self.kv_heads} KV heads")
        if self.attn_rank is not None and self.attn_rank != self.head_dim:
            parts.append(f"queries and keys of rank {self.attn_rank}")
        if self.attn_tau:
            parts.append("tau-gated attention")
        if self.halting:
            parts.append(f"halting (ponder cost {self.ponder_coef:g})")
        return ", ".join(parts)

    @property
    def qk_dim(self) -> int:
        """Width of a head's queries and keys: attn_rank, or head_dim."""
        return self.attn_rank or self.head_dim

    @property
    def gpt2_compatible(self) -> bool:
        """The architecture GPT-2's weights (and Hugging Face's GPT2LMHeadModel) have."""
        return (self.norm, self.pos_emb, self.ffn, self.kv_heads, self.ffn_hidden in (None, 4 * self.emb_dim),
                self.qk_dim, self.attn_tau, self.halting) == \
            ("layernorm", "learned", "gelu", self.n_heads, True, self.head_dim, False, False)


# Presets: GPT-2's four published sizes, and small ones that train in seconds on a CPU.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-small": dict(emb_dim=768, n_layers=12, n_heads=12),    # 124M
    "gpt2-medium": dict(emb_dim=1024, n_layers=24, n_heads=16),  # 355M
    "gpt2-large": dict(emb_dim=1280, n_layers=36, n_heads=20),   # 774M
    "gpt2-xl": dict(emb_dim=1600, n_layers=48, n_heads=25),      # 1558M
    "gpt-mini": dict(emb_dim=128, n_layers=4, n_heads=4, context_length=128),
    "gpt-nano": dict(emb_dim=32, n_layers=2, n_heads=2, context_length=64),
    # nanoGPT's Shakespeare character model at the size its README trains on a CPU: a tied head,
    # no biases, the exact GELU, no dropout (the benchmark against nanoGPT, chapter 9).
    "gpt-char": dict(emb_dim=128, n_layers=4, n_heads=4, context_length=64, drop_rate=0.0, tie_weights=True,
                     bias=False, activation="gelu"),
    # Llama-style (chapter 10): RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases, untied head.
    "llama-tiny": dict(emb_dim=128, n_layers=4, n_heads=4, n_kv_heads=2, context_length=128, norm="rmsnorm",
                       pos_emb="rope", ffn="swiglu", bias=False),
    "moe-tiny": dict(emb_dim=128, n_layers=4, n_heads=4, n_kv_heads=2, context_length=128, norm="rmsnorm",
                     pos_emb="rope", ffn="moe", n_experts=4, moe_top_k=2, bias=False),
    "llama-124m": dict(emb_dim=768, n_layers=12, n_heads=12, n_kv_heads=4, norm="rmsnorm", pos_emb="rope",
                       ffn="swiglu", bias=False),
    # Research variants (chapter 11): tau-gated low-rank attention over a small mixture of experts (with a
    # shared expert), and the same with a halting unit after each block.
    "tau-tiny": dict(emb_dim=128, n_layers=4, n_heads=4, n_kv_heads=2, context_length=128, norm="rmsnorm",
                     pos_emb="rope", ffn="moe", n_experts=4, moe_top_k=1, moe_shared_expert=True, ffn_hidden=128,
                     attn_rank=16, attn_tau=True, bias=False),
    "halting-tiny": dict(emb_dim=128, n_layers=4, n_heads=4, n_kv_heads=2, context_length=128, norm="rmsnorm",
                         pos_emb="rope", ffn="moe", n_experts=4, moe_top_k=1, moe_shared_expert=True,
                         ffn_hidden=128, attn_rank=16, attn_tau=True, halting=True, bias=False),
}


def model_config(preset: str, **overrides: Any) -> GPTConfig:
    """A `GPTConfig` from a preset name, with any fields replaced by `overrides`."""
    check_choice("model preset", preset, tuple(MODEL_PRESETS))
    valid = [f.name for f in fields(GPTConfig)]
    check_keys("model overrides", overrides, valid)
    return GPTConfig(**{**MODEL_PRESETS[preset], **overrides})


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------

LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SAMPLINGS = ("auto", "sliding", "random")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class TrainConfig:
    """How to pretrain: epochs, batches, optimiser, evaluation and the sampling prompt."""

    num_epochs: int = 1
    batch_size: int = 8
    learning_rate: float = 4e-4
    weight_decay: float = 0.1
    eval_freq: int = 5           # evaluate train/val loss every this many optimizer steps
    eval_iter: int = 5           # batches per loss estimate during training
    max_length: int = 128        # tokens per training window
    stride: int = 128            # step between window starts (= max_length: no overlap)
    start_context: str = "Every effort moves you"  # prompt for the per-epoch sample
    num_workers: int = 0         # DataLoader worker processes
    max_steps: int | None = None # stop after this many optimizer steps (None: all epochs)
    lr_schedule: str = "constant"  # "constant", or "cosine" decay to min_lr after warm-up
    warmup_steps: int = 0        # linear learning-rate warm-up from 0
    min_lr: float | None = None  # where the cosine ends (None: 10% of learning_rate)
    grad_clip: float | None = None  # clip the gradient's global norm to this (None: off)
    beta1: float = 0.9           # AdamW's momentum of the gradient
    beta2: float = 0.999         # AdamW's momentum of the squared gradient (0.95-0.99 for larger/noisier runs)
    micro_batch_size: int | str | None = None  # windows per forward/backward per process (None: batch_size / processes; "auto": the largest that fits, measured)
    precision: str = "auto"      # "fp32", "bf16", "fp16" (with a gradient scaler), or "auto": bf16 on CUDA GPUs that have it, fp16 on older ones, else fp32
    compile: bool = False        # torch.compile the model (off by itself where unsupported: Windows, MPS)
    sampling: str = "auto"       # "sliding": every window once per epoch; "random": windows at random starts; "auto": random for token files
    peak_tflops: float | None = None  # the device's peak for the MFU estimate (None: known GPUs only)
    val_fraction: float = 0.1    # pretraining: the share at the end of a text held out for validation

    def __post_init__(self) -> None:
        check_int("num_epochs", self.num_epochs)
        check_float("val_fraction", self.val_fraction, 0.0, 0.5, low_inclusive=False)
        check_int("batch_size", self.batch_size)
        check_float("learning_rate", self.learning_rate, 0.0, 1.0, low_inclusive=False)
        check_float("weight_decay", self.weight_decay, 0.0, 1.0)
        check_int("eval_freq", self.eval_freq)
        check_int("eval_iter", self.eval_iter)
        check_int("max_length", self.max_length, low=2)
        check_int("stride", self.stride)
        if not isinstance(self.start_context, str) or not self.start_context.strip():
            raise ConfigError(f"start_context must be a non-empty string, got {self.start_context!r}.")
        check_int("num_workers", self.num_workers, low=0, high=64)
        if self.max_steps is not None:
            check_int("max_steps", self.max_steps)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_int("warmup_steps", self.warmup_steps, low=0)
        if self.min_lr is not None:
            check_float("min_lr", self.min_lr, 0.0)
            if self.min_lr > self.learning_rate:
                raise ConfigError(f"min_lr ({self.min_lr}) is above learning_rate ({self.learning_rate}); "
                                  "the cosine decays from learning_rate down to min_lr: lower min_lr.")
        if self.grad_clip is not None:
            check_float("grad_clip", self.grad_clip, 0.0, low_inclusive=False)
        check_float("beta1", self.beta1, 0.0, 1.0, high_inclusive=False)
        check_float("beta2", self.beta2, 0.0, 1.0, high_inclusive=False)
        if self.micro_batch_size is not None and self.micro_batch_size != "auto":
            if isinstance(self.micro_batch_size, str):
                raise ConfigError(f"micro_batch_size must be a whole number, None or 'auto', got "
                                  f"{self.micro_batch_size!r}.")
            check_int("micro_batch_size", self.micro_batch_size)
            if self.batch_size % self.micro_batch_size:
                raise ConfigError(
                    f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                    f"({self.micro_batch_size}): each optimizer step adds up batch_size / micro_batch_size "
                    f"micro-batches. Pick micro_batch_size from {divisors(self.batch_size)}.")
        check_choice("precision", self.precision, PRECISIONS)
        if not isinstance(self.compile, bool):
            raise ConfigError(f"compile must be True or False, got {self.compile!r}.")
        check_choice("sampling", self.sampling, SAMPLINGS)
        if self.peak_tflops is not None:
            check_float("peak_tflops", self.peak_tflops, 0.0, low_inclusive=False)


# ---------------------------------------------------------------------------------------
# Fine-tuning (chapter 7)
# ---------------------------------------------------------------------------------------

TRAINABLE = ("all", "last_blocks", "head", "lora")
PROMPT_STYLES = ("alpaca", "chat")
LORA_TARGET_CHOICES = ("qkv", "out_proj", "ff", "out_head")


@dataclass(frozen=True)
class FinetuneConfig:
    """What fine-tuning trains and how (`--task classify` and `--task sft`)."""

    trainable: str = "all"       # "all" weights, the "last_blocks" + final norm + head, the "head" only, or "lora"
    last_blocks: int = 1         # how many of the last transformer blocks "last_blocks" trains
    lora_rank: int = 8           # r: LoRA adds B (out x r) @ A (r x in) beside each targeted weight
    lora_alpha: float = 16.0     # LoRA's update is scaled by alpha / r
    lora_dropout: float = 0.0    # dropout on the LoRA branch's input
    lora_targets: tuple[str, ...] = ("qkv", "out_proj", "ff")  # which Linear layers get an adapter
    balance: bool = True         # classify: draw as many examples of every class as the rarest has
    prompt_style: str = "alpaca" # sft: "alpaca" (### Instruction: ...) or "chat" (<|user|> ... <|assistant|>)
    mask_prompt: bool = False    # sft: the loss falls on the response only
    max_new_tokens: int = 128    # sft: the longest response generated for each test instruction
    judge: bool = True           # sft: also score the test responses with a local LLM judge, if one answers
    judge_url: str = "http://localhost:11434"  # an Ollama-compatible server
    judge_model: str = "llama3"

    def __post_init__(self) -> None:
        check_choice("trainable", self.trainable, TRAINABLE)
        check_int("last_blocks", self.last_blocks)
        check_int("lora_rank", self.lora_rank)
        check_float("lora_alpha", self.lora_alpha, 0.0, low_inclusive=False)
        check_float("lora_dropout", self.lora_dropout, 0.0, 1.0, high_inclusive=False)
        targets = self.lora_targets
        if isinstance(targets, str) or not isinstance(targets, (list, tuple)) or not targets:
            raise ConfigError(f"lora_targets must be a non-empty list of layer names from "
                              f"{', '.join(LORA_TARGET_CHOICES)}, got {targets!r}.")
        for target in targets:
            check_choice("each of lora_targets", target, LORA_TARGET_CHOICES)
        object.__setattr__(self, "lora_targets", tuple(targets))  # JSON gives a list back
        check_choice("prompt_style", self.prompt_style, PROMPT_STYLES)
        for name in ("balance", "mask_prompt", "judge"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        check_int("max_new_tokens", self.max_new_tokens)
        for name in ("judge_url", "judge_model"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"{name} must be a non-empty string, got {getattr(self, name)!r}.")


# ---------------------------------------------------------------------------------------
# Alignment (chapter 8)
# ---------------------------------------------------------------------------------------

DPO_LOSSES = ("sigmoid", "ipo")
KL_ESTIMATORS = ("k1", "k3")


@dataclass(frozen=True)
class AlignConfig:
    """How `--task reward | dpo | ppo | grpo` align a model (the optimizer's settings are TrainConfig's)."""

    prompt_style: str = "alpaca"  # the template answers are written in (match the SFT run you start from)
    beta: float = 0.1             # dpo: the implicit reward's scale; ppo/grpo: the weight of the KL to the reference
    dpo_loss: str = "sigmoid"     # dpo: "sigmoid" (Bradley-Terry) or "ipo"
    label_smoothing: float = 0.0  # dpo: the share of preference labels assumed wrong (conservative DPO)
    reward_model: str | None = None  # ppo: a reward run's directory; None: exact match with each record's output
    iterations: int = 100         # ppo/grpo: rounds of sampling and updating
    prompts_per_iteration: int = 16  # ppo/grpo: prompts sampled each round
    group_size: int = 8           # grpo: answers sampled per prompt
    update_epochs: int = 1        # ppo/grpo: passes over each round's answers
    minibatch_size: int = 64      # ppo/grpo: answers per update
    clip: float = 0.2             # ppo/grpo: the ratio's clip range
    value_clip: float = 0.2       # ppo: how far a value may move before its error stops counting
    value_coef: float = 0.5       # ppo: weight of the value loss
    entropy_coef: float = 0.0     # ppo/grpo: a bonus for keeping the policy's entropy up
    gamma: float = 1.0            # ppo: discount
    lam: float = 0.95             # ppo: GAE's lambda
    kl_estimator: str = "k1"      # ppo: the per-token KL penalty's estimator, "k1" or "k3"
    max_new_tokens: int = 8       # ppo/grpo: the longest answer sampled
    sft_steps: int = 1000         # ppo/grpo from new weights: supervised steps on the task's answers first
    max_operand: int = 19         # ppo/grpo without --data: the arithmetic task's largest number

    def __post_init__(self) -> None:
        check_choice("prompt_style", self.prompt_style, PROMPT_STYLES)
        check_float("beta", self.beta, 0.0)
        check_choice("dpo_loss", self.dpo_loss, DPO_LOSSES)
        check_float("label_smoothing", self.label_smoothing, 0.0, 0.5, high_inclusive=False)
        if self.reward_model is not None and (not isinstance(self.reward_model, str) or not self.reward_model):
            raise ConfigError(f"reward_model must be None or a run directory, got {self.reward_model!r}.")
        for name in ("iterations", "prompts_per_iteration", "group_size", "update_epochs", "minibatch_size",
                     "max_new_tokens", "max_operand"):
            check_int(name, getattr(self, name))
        if self.group_size < 2:
            raise ConfigError(f"group_size must be at least 2 (GRPO compares answers within a group), "
                              f"got {self.group_size}.")
        check_int("sft_steps", self.sft_steps, low=0)
        check_float("clip", self.clip, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
        check_float("value_clip", self.value_clip, 0.0, low_inclusive=False)
        for name in ("value_coef", "entropy_coef"):
            check_float(name, getattr(self, name), 0.0)
        for name in ("gamma", "lam"):
            check_float(name, getattr(self, name), 0.0, 1.0)
        check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)


# ---------------------------------------------------------------------------------------
# One run: what config_run.py and the command line resolve to
# ---------------------------------------------------------------------------------------

TASKS = ("pretrain", "generate", "evaluate", "export", "classify", "sft", "reward", "dpo", "ppo", "grpo", "studio")
FINETUNE_TASKS = ("classify", "sft")
ALIGN_TASKS = ("reward", "dpo", "ppo", "grpo")
EXPORTING_TASKS = ("pretrain", "sft", "dpo", "ppo", "grpo")  # the tasks that train a language model (EXPORT_HF)
MODES = ("quick", "full", "custom")
TOKENIZERS = ("gpt2", "bpe", "char", "train")
DATA_FORMATS = ("auto", "text", "json", "tokens", "hf")  # how --data is read (minigpt.data.data_format)
DEVICES = ("cpu", "cuda", "mps")



@dataclass(frozen=True)
class PretrainedModel:
    """A published model `--pretrained NAME` downloads once from the Hugging Face hub."""

    repo: str            # the hub repository, owner/name
    architecture: str    # the Hugging Face class its config.json names
    parameters: str      # as its authors count them
    download: str        # the size of its weights file(s)
    context_length: int  # its max_position_embeddings
    tokenizer: str       # what encodes its text


PRETRAINED_MODELS: dict[str, PretrainedModel] = {
    "gpt2": PretrainedModel("openai-community/gpt2", "GPT2LMHeadModel", "124M", "0.5 GB", 1024, "GPT-2 BPE"),
    "gpt2-medium": PretrainedModel("openai-community/gpt2-medium", "GPT2LMHeadModel", "355M", "1.5 GB", 1024,
                                   "GPT-2 BPE"),
    "gpt2-large": PretrainedModel("openai-community/gpt2-large", "GPT2LMHeadModel", "774M", "3.2 GB", 1024,
                                  "GPT-2 BPE"),
    "gpt2-xl": PretrainedModel("openai-community/gpt2-xl", "GPT2LMHeadModel", "1.5B", "6.4 GB", 1024, "GPT-2 BPE"),
    "smollm-135m": PretrainedModel("HuggingFaceTB/SmolLM-135M", "LlamaForCausalLM", "135M", "0.27 GB", 2048,
                                   "byte-level BPE, 49,152 tokens"),
    "smollm2-135m": PretrainedModel("HuggingFaceTB/SmolLM2-135M", "LlamaForCausalLM", "135M", "0.27 GB", 8192,
                                    "byte-level BPE, 49,152 tokens"),
    "smollm2-360m": PretrainedModel("HuggingFaceTB/SmolLM2-360M", "LlamaForCausalLM", "362M", "0.72 GB", 8192,
                                    "byte-level BPE, 49,152 tokens"),
    "qwen2.5-0.5b": PretrainedModel("Qwen/Qwen2.5-0.5B", "Qwen2ForCausalLM", "494M", "0.99 GB", 32768,
                                    "byte-level BPE, 151,665 tokens"),
    "tinyllama-1.1b-chat": PretrainedModel("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "LlamaForCausalLM", "1.1B", "2.2 GB",
                                           2048, "SentencePiece BPE, 32,000 tokens"),
}
PRETRAINED_NAMES = tuple(PRETRAINED_MODELS)


def check_max_length(train: TrainConfig, model: GPTConfig, change: str) -> None:
    """A training window must fit the model's context; `change` says which setting to lower or raise."""
    if train.max_length > model.context_length:
        raise ConfigError(f"max_length ({train.max_length}) is longer than the model's context_length "
                          f"({model.context_length}): {change}")


@dataclass(frozen=True)
class RunConfig:
    """Everything one invocation of main.py needs, resolved and validated."""

    task: str
    mode: str
    model_name: str          # the preset the model config started from
    model: GPTConfig         # vocab_size is replaced by the tokenizer's once it is built
    train: TrainConfig
    tokenizer: str = "gpt2"  # a name in TOKENIZERS, or the path of a saved BPE tokenizer file
    bpe_vocab_size: int = 1024  # size of the BPE that tokenizer "train" learns
    data: str | None = None  # a UTF-8 text file; None trains on the-verdict.txt
    out: str | None = None   # run directory; None: runs/<task>-<mode>
    device: str | None = None  # None: the best available (cuda > mps > cpu)
    seed: int = 123
    log_every: int = 10
    resume: str | None = None
    checkpoint: str | None = None  # a run directory to generate from or export
    pretrained: str | None = None  # a PRETRAINED_MODELS name, a hub repository (owner/name) or a Hugging Face folder
    prompt: str | None = None      # None with --task generate: an interactive loop
    generation: dict[str, Any] = field(default_factory=dict)
    finetune: FinetuneConfig | None = None  # --task classify / sft only
    align: AlignConfig | None = None        # --task reward / dpo / ppo / grpo only
    choices: str | None = None     # --task evaluate: multiple-choice items, "hellaswag" or a JSONL file
    limit: int | None = None       # --task evaluate: score only the first N multiple-choice items
    ensemble: list[str] = field(default_factory=list)  # generate / evaluate: runs that join `checkpoint`
    ensemble_weights: list[float] | None = None  # one per run, `checkpoint` first; None: equal weights
    show_probs: int = 0            # --task generate: print each token's k most likely candidates (0: off)
    text_field: str = "text"       # a .jsonl / .json corpus or a Hugging Face dataset: the field that holds each text
    data_format: str = "auto"      # how --data is read: DATA_FORMATS (auto: by what it is, minigpt.data.data_format)
    export_hf: bool = False        # after training, hf/final and hf/best: folders transformers loads whole
    graph: dict[str, Any] | None = None  # pretrain: a studio graph (not the standard chain) whose compiled model trains

    def __post_init__(self) -> None:
        check_choice("task", self.task, TASKS)
        check_choice("mode", self.mode, MODES)
        check_choice("DATA_FORMAT (or --data-format)", self.data_format, DATA_FORMATS)
        self._refuse_what_the_task_cannot_honour()
        if (self.task in FINETUNE_TASKS) != (self.finetune is not None):
            raise ConfigError(f"--task {self.task} {'needs' if self.task in FINETUNE_TASKS else 'takes no'} "
                              "fine-tuning settings (finetune).")
        if (self.task in ALIGN_TASKS) != (self.align is not None):
            raise ConfigError(f"--task {self.task} {'needs' if self.task in ALIGN_TASKS else 'takes no'} "
                              "alignment settings (align).")
        if self.task == "dpo" and not self.align.beta > 0:
            raise ConfigError(f"DPO's beta must be positive, got {self.align.beta}: it scales the implicit reward "
                              "beta * (log pi - log pi_ref), so 0 would make every pair look alike. Set --beta "
                              "(or align_params['beta']) to e.g. 0.1.")

    def _refuse_what_the_task_cannot_honour(self) -> None:
        """A training setting means the same in every task; a task it cannot apply to says so."""
        if self.task in ALIGN_TASKS and self.train.micro_batch_size is not None:
            raise ConfigError(f"{self.task} trains on whole batches (its batch_size, or minibatch_size for ppo and "
                              "grpo); micro_batch_size and --batch-size auto are for pretrain, classify and sft. "
                              "Lower --batch-size instead.")
        if self.task in ("ppo", "grpo") and self.train.compile:
            raise ConfigError(f"{self.task} samples its answers with a KV cache at a new length every round, which "
                              "torch.compile would compile again and again; drop --compile (pretrain, classify, "
                              "sft, reward and dpo take it).")
        if self.task != "pretrain" and self.train.val_fraction != 0.1:
            raise ConfigError(f"--val-fraction chooses how pretraining splits a text; --task {self.task} has splits "
                              "of its own: drop it.")
        if self.task not in ("pretrain", "evaluate") and (self.text_field != "text" or self.data_format != "auto"):
            raise ConfigError(f"--text-field and --data-format choose how pretraining and evaluation read a corpus; "
                              f"--task {self.task} reads its own records: drop them.")
        if self.graph is not None and (self.task != "pretrain" or self.export_hf):
            raise ConfigError("a studio graph (--graph) is pretrained and kept in minigpt's own format: it is for "
                              "--task pretrain without --export-hf (transformers has no class for a free graph; "
                              "the standard GPT chain exports as GPT-2).")
        if self.task in FINETUNE_TASKS + ALIGN_TASKS and self.train.sampling != "auto":
            raise ConfigError(f"sampling ({self.train.sampling!r}) chooses pretraining's windows of a text; "
                              f"--task {self.task} trains on whole examples: drop --sampling.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        """Rebuild from `to_dict()`'s form (stored in checkpoints and config.json); extra keys are ignored."""
        values = {f.name: values[f.name] for f in fields(cls) if f.name in values}
        finetune, align = values.get("finetune"), values.get("align")
        return cls(**{**values, "model": GPTConfig(**values["model"]), "train": TrainConfig(**values["train"]),
                      "finetune": FinetuneConfig(**finetune) if finetune is not None else None,
                      "align": AlignConfig(**align) if align is not None else None})


# How --task generate decodes (config_run.generation_params; flags override each key).
GENERATION_DEFAULTS: dict[str, Any] = dict(
    max_new_tokens=60, temperature=0.8, top_k=40, top_p=None, repetition_penalty=1.0,
    num_beams=1, length_penalty=1.0, stop_strings=[], use_cache=True)


def check_generation(values: dict[str, Any]) -> dict[str, Any]:
    """The decoding settings, complete and checked (the decoding functions check them again)."""
    check_keys("generation_params", values, list(GENERATION_DEFAULTS))
    values = {**GENERATION_DEFAULTS, **values}
    check_int("max_new_tokens (or --max-new-tokens)", values["max_new_tokens"])
    check_float("temperature (or --temperature)", values["temperature"], 0.0)
    if values["top_k"] is not None:
        check_int("top_k (or --top-k)", values["top_k"])
    if values["top_p"] is not None:
        check_float("top_p (or --top-p)", values["top_p"], 0.0, 1.0, low_inclusive=False)
    check_float("repetition_penalty (or --repetition-penalty)", values["repetition_penalty"], 0.0,
                 low_inclusive=False)
    check_int("num_beams (or --num-beams)", values["num_beams"])
    check_float("length_penalty (or --length-penalty)", values["length_penalty"], -10.0, 10.0)
    stops = values["stop_strings"]
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise ConfigError(f"stop_strings (or --stop) must be a list of non-empty strings, got {stops!r}.")
    if not isinstance(values["use_cache"], bool):
        raise ConfigError(f"use_cache must be True or False, got {values['use_cache']!r}.")
    if values["num_beams"] > 1 and (values["temperature"] != 0 or stops):
        raise ConfigError("beam search (num_beams > 1) picks the most probable text, so it does not "
                          "sample and takes no stop strings: set temperature to 0 (--temperature 0) "
                          "and drop the stop strings, or keep num_beams at 1.")
    return {**values, "stop_strings": list(stops)}
