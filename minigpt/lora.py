"""LoRA: fine-tune a large model by training two thin matrices per layer (chapter 7).

Fine-tuning changes a weight W (d_out, d_in) by some update dW. LoRA (Hu et al., 2021) bets
that the update has low rank and writes it as a product, dW = (alpha / r) B A, with
A (r, d_in) and B (d_out, r) for a small rank r:

    h = W x + (alpha / r) B A x        W frozen; only A and B learn

A starts random and B at zero, so B A = 0 and the model starts exactly as the base model.
Each adapted layer trains r (d_in + d_out) weights instead of d_in d_out (for GPT-2 small's
qkv at r = 8: 24,576 instead of 1,769,472), and the optimizer keeps state for those alone.
After training, merging folds B A into W: inference then costs nothing extra, and
unmerging takes it out again (to train on, or to swap in another adapter).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minigpt.config import ConfigError, did_you_mean

ADAPTER_FORMAT = "minigpt-lora-v1"

# Which Linear layers of a GPTModel get an adapter, by the last part of their name:
#   "qkv"      trf_blocks.N.att.qkv             (emb_dim -> 3 * emb_dim)
#   "out_proj" trf_blocks.N.att.out_proj        (emb_dim -> emb_dim)
#   "ff"       trf_blocks.N.ff.layers.0 and .2  (emb_dim -> 4 * emb_dim -> emb_dim)
#   "out_head" out_head                         (emb_dim -> vocab_size)
LORA_TARGETS = ("qkv", "out_proj", "ff")  # default: every Linear inside the transformer blocks
VALID_TARGETS = ("qkv", "out_proj", "ff", "out_head")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: base(x) + (alpha / r) x A^T B^T."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        _check_rank(rank, base.in_features, base.out_features)
        _check_alpha(alpha)
        _check_dropout(dropout)
        self.base = base
        for param in base.parameters():
            param.requires_grad_(False)
        weight = base.weight  # A and B live where W lives, in its dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=weight.device, dtype=weight.dtype))
        # A as nn.Linear initialises its weights; B = 0 makes the update start at exactly zero.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank  # so changing r does not change how far a step moves the output
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (out, in), for code that reads a Linear's .weight (merged: W + dW)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:  # B A already sits inside W
            return self.base(x)
        # Two thin matmuls, never the full (out, in) product: (B, T, in) -> (B, T, r) -> (B, T, out).
        update = self.dropout(x) @ self.lora_A.T @ self.lora_B.T
        return self.base(x) + update * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The update this adapter adds to W: (alpha / r) B A, shape (out, in)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into W, so inference runs one matmul per layer again."""
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of W again (to keep training, or to load another adapter)."""
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def _check_rank(rank: Any, in_features: int, out_features: int) -> None:
    """A rank above min(in, out) is no longer low: B A could then be any matrix at all."""
    largest = min(in_features, out_features)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= largest:
        raise ConfigError(f"LoRA rank must be a whole number from 1 to {largest} (the smaller side of a "
                          f"{in_features} -> {out_features} layer), got {rank!r}; 4 to 16 is usual.")


def _check_alpha(alpha: Any) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"LoRA alpha must be a positive number, got {alpha!r}; "
                          "twice the rank (e.g. 16 for rank 8) is a common choice.")


def _check_dropout(dropout: Any) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"LoRA dropout must lie in [0, 1), got {dropout!r}; 0.0 turns it off.")


def target_of(name: str) -> str | None:
    """Which LoRA target a Linear's qualified name belongs to ("trf_blocks.0.ff.layers.2" -> "ff")."""
    parts = name.split(".")
    if name == "out_head":
        return "out_head"
    if parts[-1] in ("qkv", "out_proj"):
        return parts[-1]
    if "ff" in parts[:-1]:
        return "ff"
    return None


def inject_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0,
                targets: tuple[str, ...] | list[str] = LORA_TARGETS, dropout: float = 0.0) -> list[str]:
    """Freeze every parameter of `model`, then replace the targeted nn.Linear modules by LoRALinear
    wrappers (whose A and B are the only trainable weights). Returns the qualified names replaced.

    A tied output head (cfg.tie_weights) cannot be a target: it is the token embedding too,
    so merging an update into it would change every token's input vector as well.
    """
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets:
        raise ConfigError(f"LoRA needs at least one target; choose from {', '.join(map(repr, VALID_TARGETS))}.")
    if lora_layers(model):
        raise ConfigError("this model already has LoRA layers; inject_lora wraps a model once. Build a "
                          "fresh model, or load another adapter into these layers with load_adapter.")
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    found = {target_of(name) for name in linears}
    for target in targets:
        if target not in VALID_TARGETS:
            raise ConfigError(f"unknown LoRA target {target!r}.{did_you_mean(target, VALID_TARGETS)} "
                              f"Valid targets: {', '.join(map(repr, VALID_TARGETS))}.")
        if target not in found:
            raise ConfigError(f"the LoRA target {target!r} matches no Linear layer of this model; "
                              f"it has {', '.join(repr(t) for t in VALID_TARGETS if t in found)}.")
    if "out_head" in targets and getattr(getattr(model, "cfg", None), "tie_weights", False):
        raise ConfigError("LoRA on the output head of a model with tie_weights=True would change the token "
                          "embedding too (they are one matrix); leave 'out_head' out of the targets.")
    chosen = {name: linear for name, linear in linears.items() if target_of(name) in targets}
    for linear in chosen.values():  # check every layer before changing any
        _check_rank(rank, linear.in_features, linear.out_features)
    _check_alpha(alpha)
    _check_dropout(dropout)

    for param in model.parameters():
        param.requires_grad_(False)
    for name, linear in chosen.items():
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)  # "" is the model itself
        setattr(parent, child_name, LoRALinear(linear, rank, alpha, dropout))
    return list(chosen)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in `model`, by qualified name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (for fast inference or export)."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take every adapter out of its base weight again."""
    for layer in lora_layers(model).values():
        layer.unmerge()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) weights, a shared tensor counted once; total includes the adapters."""
    params = list(model.parameters())  # .parameters() yields a shared (tied) tensor once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, sum(p.numel() for p in params)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters' A and B, by qualified name ("trf_blocks.0.att.qkv.lora_A"), on the CPU."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{name}.lora_A"] = layer.lora_A.detach().cpu().clone()
        state[f"{name}.lora_B"] = layer.lora_B.detach().cpu().clone()
    return state


def save_adapter(model: nn.Module, path: str | Path, settings: dict[str, Any]) -> Path:
    """Write the adapters (kilobytes, not the whole model) plus the settings that made them.

    A run writes it through `runs.write_atomically`, so that an interruption never leaves part of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": ADAPTER_FORMAT, "settings": settings, "state": lora_state_dict(model)}, path)
    return path


def load_adapter(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Copy a saved adapter into `model`'s LoRA layers (inject_lora first); returns its settings."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no LoRA adapter at {path}; give the file save_adapter wrote.")
    try:
        adapter = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"could not read the LoRA adapter {path}: it is corrupt or not an adapter "
                          f"({type(err).__name__}: {err}).") from None
    if not isinstance(adapter, dict) or adapter.get("format") != ADAPTER_FORMAT:
        found = adapter.get("format") if isinstance(adapter, dict) else None
        raise ConfigError(f"{path} is not a minigpt LoRA adapter (format {found!r}, "
                          f"expected {ADAPTER_FORMAT!r}).")
    layers = lora_layers(model)
    ours = {f"{name}.lora_{part}": (layer, part) for name, layer in layers.items() for part in "AB"}
    state = adapter["state"]
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    if missing or unexpected:
        raise ConfigError(f"the adapter {path} does not fit this model's LoRA layers: missing "
                          f"{missing[:4] or 'none'}, unexpected {unexpected[:4] or 'none'}. Call inject_lora "
                          f"with the targets it was saved with (its settings: {adapter.get('settings')}).")
    for key, (layer, part) in ours.items():
        mine = getattr(layer, f"lora_{part}")
        if state[key].shape != mine.shape:
            raise ConfigError(f"{key} has shape {tuple(state[key].shape)} in {path} but {tuple(mine.shape)} "
                              f"here: the adapter was trained with another rank. Call inject_lora with its "
                              f"rank (its settings: {adapter.get('settings')}).")
    with torch.no_grad():
        for name, layer in layers.items():
            was_merged = layer.merged
            layer.unmerge()  # the old update must leave W before the new one arrives
            layer.lora_A.copy_(state[f"{name}.lora_A"])
            layer.lora_B.copy_(state[f"{name}.lora_B"])
            if was_merged:
                layer.merge()
    return adapter["settings"]
