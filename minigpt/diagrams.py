"""Diagrams of the chapters' ideas, drawn from the code so they cannot drift from it.

Every label that names a module, a width or a shape is read from a real `minigpt` object: the
block diagram from the modules of a block, attention's shapes from a forward pass of
`MultiHeadAttention`, the KV cache's from a real cache, LoRA's counts from a `LoRALinear`.
Each `draw_*` returns a matplotlib Figure (about 800 pixels wide); the caller saves it.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import replace

import torch
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle
from torch import nn

from minigpt.config import GPTConfig
from minigpt.lora import LoRALinear, count_parameters
from minigpt.model import GPTModel
from minigpt.plot import plt  # pyplot, with the package's backend: files only, or a notebook's inline figures

DPI = 110
WIDTH = 7.3  # inches: about 800 pixels at DPI, the handbook's width
COLOURS = {
    "tensor": "#eef1f6", "norm": "#fde3bd", "attention": "#cfe2f6", "ffn": "#d4edca", "mask": "#9db7d5",
    "computed": "#f8c49c", "cached": "#cfe2f6", "frozen": "#d9d9d9", "trainable": "#f4b5ad",
    "line": "#3a3a3a", "note": "#555555", "stream": "#7a7a7a",
}


# ---------------------------------------------------------------------------------------
# Drawing helpers: a canvas in inches, boxes, arrows
# ---------------------------------------------------------------------------------------

def _canvas(height: float, width: float = WIDTH):
    """A figure whose one axes spans it, in inches from the lower-left corner."""
    fig = plt.figure(figsize=(width, height), dpi=DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.set_axis_off()
    return fig, ax


def _box(ax, centre: tuple[float, float], size: tuple[float, float], title: str, colour: str,
         detail: str = "", fontsize: float = 9) -> None:
    """A rounded box: a title, and a smaller monospace line (a shape, a width) under it."""
    (x, y), (w, h) = centre, size
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0,rounding_size=0.06",
                                facecolor=colour, edgecolor=COLOURS["line"], linewidth=1))
    if not detail:
        ax.text(x, y, title, ha="center", va="center", fontsize=fontsize)
        return
    ax.text(x, y + h * 0.17, title, ha="center", va="center", fontsize=fontsize)
    ax.text(x, y - h * 0.22, detail, ha="center", va="center", fontsize=fontsize - 1, family="monospace")


def _arrow(ax, start: tuple[float, float], end: tuple[float, float], colour: str = COLOURS["line"],
           width: float = 1.1) -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=10, color=colour, linewidth=width,
                                 shrinkA=0, shrinkB=0))


def _note(ax, x: float, y: float, text: str, width: int = 0, **style) -> None:
    """Small grey explanatory text, wrapped at `width` characters (0: as given)."""
    if width:
        text = "\n".join(textwrap.fill(line, width) for line in text.split("\n"))
    style = {"fontsize": 8, "color": COLOURS["note"], "va": "center", **style}
    ax.text(x, y, text, **style)


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(size) for size in shape) + ")"


def _one_block_model(cfg: GPTConfig) -> GPTModel:
    """A GPTModel of `cfg` with one block (every block is alike) and a one-token vocabulary."""
    return GPTModel(replace(cfg, n_layers=1, vocab_size=1, tie_weights=False)).eval()


# ---------------------------------------------------------------------------------------
# 1. The transformer block (chapter 4)
# ---------------------------------------------------------------------------------------

def _ffn_labels(ff: nn.Module) -> tuple[str, str]:
    """The feed-forward box's title and detail, from the module the block holds."""
    kind = type(ff).__name__
    if kind == "FeedForward":
        first, last = ff.layers[0], ff.layers[2]
        gelu = "GELU (tanh)" if ff.layers[1].approximate == "tanh" else "GELU (exact)"
        return "feed-forward (GELU)", (f"Linear {first.in_features} → {first.out_features}\n{gelu}\n"
                                       f"Linear {last.in_features} → {last.out_features}")
    experts = getattr(ff, "experts", None)
    swiglu = experts[0] if experts is not None else ff
    inner = (f"gate, up: Linear {swiglu.gate.in_features} → {swiglu.gate.out_features}\nSiLU(gate) · up\n"
             f"down: Linear {swiglu.down.in_features} → {swiglu.down.out_features}")
    if experts is None:
        return "feed-forward (SwiGLU)", inner
    shared = " + a shared one" if ff.shared is not None else ""
    return "mixture of experts", f"{len(experts)} SwiGLU experts{shared}, top {ff.top_k} per token\n{inner}"


def block_labels(cfg: GPTConfig) -> dict[str, str]:
    """The block diagram's labels, read from the modules of a real `TransformerBlock` of `cfg`."""
    model = _one_block_model(cfg)
    block = model.trf_blocks[0]
    att = block.att
    norm = type(block.norm1).__name__  # "LayerNorm" or "RMSNorm"
    grouped = att.num_kv_heads != att.num_heads
    heads = f"{att.num_heads} heads of {att.head_dim}" + (f", {att.num_kv_heads} K/V heads" if grouped else "")
    ffn, ffn_detail = _ffn_labels(block.ff)
    positions = "\nRoPE rotates q and k" if att.rope is not None else ""
    return {
        "norm": norm,
        "norm_detail": (f"{norm}({cfg.emb_dim})\n" + ("divide by the root mean square, scale γ" if norm == "RMSNorm"
                                                       else "centre, divide by the std, scale γ, shift β")),
        "attention": "grouped-query attention" if grouped else "causal multi-head attention",
        "attention_detail": (f"{heads}, causal\nqkv: Linear {att.qkv.in_features} → {att.qkv.out_features}\n"
                             f"out_proj: Linear {att.out_proj.in_features} → {att.out_proj.out_features}{positions}"),
        "ffn": ffn,
        "ffn_detail": ffn_detail,
        "stream": f"(B, T, {cfg.emb_dim})",
        "dropout": f"dropout {cfg.drop_rate:g}" if cfg.drop_rate else "",
        "repeat": f"× n_layers = {cfg.n_layers}",
    }


def _branch(ax, base: float, stream_x: float, box_x: float, norm: tuple[str, str], layer: tuple[str, str, str],
            dropout: str) -> None:
    """One pre-norm branch: leave the stream at `base`, norm, layer, then add back into the stream."""
    norm_y, layer_y, join_y = base + 0.55, base + 1.3, base + 1.95
    ax.plot([stream_x, box_x, box_x], [base, base, norm_y - 0.22], color=COLOURS["line"], linewidth=1.1)
    _arrow(ax, (box_x, norm_y - 0.32), (box_x, norm_y - 0.2))
    _box(ax, (box_x, norm_y), (1.9, 0.4), norm[0], COLOURS["norm"])
    _arrow(ax, (box_x, norm_y + 0.2), (box_x, layer_y - 0.3))
    _box(ax, (box_x, layer_y), (1.9, 0.6), layer[0], layer[2])
    ax.plot([box_x, box_x, stream_x + 0.16], [layer_y + 0.3, join_y, join_y], color=COLOURS["line"], linewidth=1.1)
    _arrow(ax, (stream_x + 0.3, join_y), (stream_x + 0.15, join_y))
    if dropout:
        _note(ax, (stream_x + box_x) / 2, join_y - 0.08, dropout, ha="center", va="top", fontsize=7.5)
    ax.add_patch(plt.Circle((stream_x, join_y), 0.15, facecolor="white", edgecolor=COLOURS["line"], zorder=3))
    ax.text(stream_x, join_y, "+", ha="center", va="center", fontsize=11, zorder=4)
    for y, text in ((norm_y, norm[1]), (layer_y, layer[1])):
        _note(ax, 4.0, y, text, width=44, ha="left")


def draw_transformer_block(cfg: GPTConfig, title: str = "") -> plt.Figure:
    """The pre-LN GPT block of `cfg`: norm → attention → add, norm → feed-forward → add, on the residual stream."""
    labels = block_labels(cfg)
    fig, ax = _canvas(6.0)
    stream_x, box_x = 0.9, 2.7
    ax.plot([stream_x, stream_x], [0.55, 5.4], color=COLOURS["stream"], linewidth=3, zorder=1)
    _arrow(ax, (stream_x, 5.35), (stream_x, 5.5), colour=COLOURS["stream"], width=3)
    _box(ax, (stream_x, 0.35), (1.2, 0.4), "x", COLOURS["tensor"], labels["stream"], fontsize=8.5)
    _box(ax, (stream_x, 5.7), (1.2, 0.4), "to the next block", COLOURS["tensor"], labels["stream"], fontsize=8.5)
    ax.text(stream_x - 0.3, 3.0, "residual stream", rotation=90, ha="center", va="center", fontsize=8.5,
            color=COLOURS["stream"])
    _branch(ax, 0.85, stream_x, box_x, (labels["norm"], labels["norm_detail"]),
            (labels["attention"], labels["attention_detail"], COLOURS["attention"]), labels["dropout"])
    _branch(ax, 3.0, stream_x, box_x, (labels["norm"], labels["norm_detail"]),
            (labels["ffn"], labels["ffn_detail"], COLOURS["ffn"]), labels["dropout"])
    ax.text(WIDTH - 0.15, 5.75, title or f"one GPT block (pre-norm), {labels['repeat']}", ha="right",
            va="center", fontsize=10, weight="bold")
    return fig


# ---------------------------------------------------------------------------------------
# 2. Attention's data flow, with the shapes of a real forward pass (chapter 3)
# ---------------------------------------------------------------------------------------

def _attention_steps(att: nn.Module, x: torch.Tensor, qkv: torch.Tensor) -> dict[str, torch.Tensor]:
    """MultiHeadAttention.forward's steps written out, from its own qkv output (no cache, no dropout)."""
    batch, num_tokens, _ = x.shape
    sizes = [att.num_heads * att.qk_dim, att.num_kv_heads * att.qk_dim, att.num_kv_heads * att.head_dim]
    queries, keys, values = qkv.split(sizes, dim=2)                          # (B, T, heads x D) each
    steps = {"x": x, "qkv": qkv, "queries": queries, "keys": keys, "values": values}
    q = queries.view(batch, num_tokens, att.num_heads, att.qk_dim).transpose(1, 2)     # (B, H, T, D)
    k = keys.view(batch, num_tokens, att.num_kv_heads, att.qk_dim).transpose(1, 2)     # (B, H_kv, T, D)
    v = values.view(batch, num_tokens, att.num_kv_heads, att.head_dim).transpose(1, 2)
    steps.update({"query heads": q, "key heads": k, "value heads": v})
    if att.rope is not None:
        q, k = att.rope(q), att.rope(k)
    if att.temperature is not None:
        q = q / att.tau(x)
    group = att.num_heads // att.num_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)        # (B, H, T, D)
    steps.update({"keys per query head": k, "values per query head": v})
    scores = q @ k.transpose(2, 3) / math.sqrt(att.qk_dim)                            # (B, H, T, T)
    future = torch.ones(num_tokens, num_tokens, dtype=torch.bool).triu(diagonal=1)
    weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    context = weights @ v                                                            # (B, H, T, D)
    merged = context.transpose(1, 2).reshape(batch, num_tokens, -1)                  # (B, T, H x D)
    steps.update({"scores": scores, "weights": weights, "context": context, "merged": merged})
    return steps


def attention_shapes(cfg: GPTConfig, batch: int = 2, num_tokens: int = 6) -> dict[str, tuple[int, ...]]:
    """The shape of every step of attention, from a forward pass of the `MultiHeadAttention` a block of
    `cfg` holds: hooks record its real qkv output and out_proj input/output, and the steps between them
    are computed again and checked to give exactly what the module gave."""
    att = _one_block_model(cfg).trf_blocks[0].att
    x = torch.randn(batch, num_tokens, cfg.emb_dim, generator=torch.Generator().manual_seed(0))
    seen: dict[str, torch.Tensor] = {}
    hooks = [att.qkv.register_forward_hook(lambda module, inputs, out: seen.update(qkv=out)),
             att.out_proj.register_forward_hook(lambda module, inputs, out: seen.update(merged=inputs[0], output=out))]
    try:
        with torch.no_grad():
            att(x)
            steps = _attention_steps(att, x, seen["qkv"])
    finally:
        for hook in hooks:
            hook.remove()
    if not torch.allclose(steps["merged"], seen["merged"], atol=1e-5):
        raise RuntimeError("the diagram's attention steps no longer compute what MultiHeadAttention.forward "
                           "does; update minigpt.diagrams._attention_steps to follow it.")
    steps["output"] = seen["output"]
    return {name: tuple(tensor.shape) for name, tensor in steps.items()}


def _causal_mask(ax, corner: tuple[float, float], size: float, num_tokens: int) -> None:
    """A small T x T grid: the positions a query may see (filled) and the masked future (blank)."""
    cell = size / num_tokens
    for row in range(num_tokens):
        for col in range(num_tokens):
            seen = col <= row
            ax.add_patch(Rectangle((corner[0] + col * cell, corner[1] + size - (row + 1) * cell), cell, cell,
                                   facecolor=COLOURS["mask"] if seen else "white", edgecolor="#8a8a8a", linewidth=0.4))
    _note(ax, corner[0] + size / 2, corner[1] - 0.12, "causal mask:\nfuture = −∞", ha="center", va="top", fontsize=7)


def draw_attention_flow(cfg: GPTConfig, batch: int = 2, num_tokens: int = 6) -> plt.Figure:
    """Attention's data flow, x → Q, K, V → heads → scores → softmax → weights · V → merge → out_proj,
    each tensor with its symbolic shape and the shape a real forward pass gave."""
    s = attention_shapes(cfg, batch, num_tokens)
    grouped = s["key heads"][1] != s["query heads"][1]
    fig, ax = _canvas(7.6)
    lane = {"q": 2.95, "k": 4.7, "v": 6.45, "mid": 4.7, "qk": 3.825}
    row = [7.15 - 0.8 * i for i in range(9)]
    box, wide = (1.6, 0.5), (2.2, 0.5)
    kv = "h_kv" if grouped else "h"
    _box(ax, (lane["mid"], row[0]), wide, "x  (B, T, d)", COLOURS["tensor"], _shape(s["x"]))
    _box(ax, (lane["mid"], row[1]), wide, f"qkv  (B, T, (h + 2·{kv})·d_h)" if grouped else "qkv  (B, T, 3d)",
         COLOURS["attention"], _shape(s["qkv"]))
    _arrow(ax, (lane["mid"], row[0] - 0.25), (lane["mid"], row[1] + 0.25))
    names = (("q", "Q", "queries", "query heads", "h"), ("k", "K", "keys", "key heads", kv),
             ("v", "V", "values", "value heads", kv))
    for key, letter, flat, heads, count in names:
        _arrow(ax, (lane["mid"], row[1] - 0.25), (lane[key], row[2] + 0.25))
        flat_shape = "(B, T, d)" if count == "h" else "(B, T, h_kv·d_h)"
        _box(ax, (lane[key], row[2]), box, f"{letter}  {flat_shape}", COLOURS["tensor"], _shape(s[flat]), fontsize=8.5)
        _arrow(ax, (lane[key], row[2] - 0.25), (lane[key], row[3] + 0.25))
        _box(ax, (lane[key], row[3]), box, f"{letter}  (B, {count}, T, d_h)", COLOURS["tensor"], _shape(s[heads]),
             fontsize=8.5)
    for key in ("q", "k"):
        _arrow(ax, (lane[key], row[3] - 0.25), (lane["qk"], row[4] + 0.25))
    _box(ax, (lane["qk"], row[4]), (2.3, 0.5), "scores  (B, h, T, T)", COLOURS["attention"], _shape(s["scores"]))
    _causal_mask(ax, (lane["qk"] + 1.3, row[4] - 0.25), 0.5, min(num_tokens, 8))
    _arrow(ax, (lane["qk"], row[4] - 0.25), (lane["qk"], row[5] + 0.25))
    _box(ax, (lane["qk"], row[5]), (2.3, 0.5), "weights  (B, h, T, T)", COLOURS["attention"], _shape(s["weights"]))
    context_x = (lane["qk"] + lane["v"]) / 2
    _arrow(ax, (lane["qk"], row[5] - 0.25), (context_x - 0.4, row[6] + 0.25))
    _arrow(ax, (lane["v"], row[3] - 0.25), (context_x + 0.4, row[6] + 0.25))
    _box(ax, (context_x, row[6]), (2.3, 0.5), "context  (B, h, T, d_h)", COLOURS["tensor"], _shape(s["context"]))
    _arrow(ax, (context_x, row[6] - 0.25), (lane["mid"], row[7] + 0.25))
    _box(ax, (lane["mid"], row[7]), wide, "merged  (B, T, h·d_h)", COLOURS["tensor"], _shape(s["merged"]))
    _arrow(ax, (lane["mid"], row[7] - 0.25), (lane["mid"], row[8] + 0.25))
    _box(ax, (lane["mid"], row[8]), wide, "output  (B, T, d)", COLOURS["attention"], _shape(s["output"]))
    group = s["query heads"][1] // s["key heads"][1]
    operations = [
        f"qkv: one Linear, {s['x'][2]} → {s['qkv'][2]}",
        "split the last dimension\ninto the three parts",
        "split heads:\n.view(B, T, heads, d_h)\n.transpose(1, 2)",
        "Q Kᵀ / √d_h" + (f"\neach K/V head serves\n{group} query heads" if grouped else ""),
        "causal mask, then softmax\nover the keys",
        "weights @ V: a weighted\nsum of the values",
        "merge heads:\n.transpose(1, 2)\n.reshape(B, T, h·d_h)",
        f"out_proj: Linear {s['merged'][2]} → {s['output'][2]}",
    ]
    for i, text in enumerate(operations):
        _note(ax, 0.12, (row[i] + row[i + 1]) / 2, text, ha="left", style="italic")
    ax.text(WIDTH - 0.15, row[0] + 0.05, f"B = {batch}, T = {num_tokens}\nd = {s['x'][2]}, h = {s['query heads'][1]}"
            + (f", h_kv = {s['key heads'][1]}" if grouped else "") + f"\nd_h = {s['value heads'][3]}",
            ha="right", va="center", fontsize=8.5, family="monospace")
    return fig


# ---------------------------------------------------------------------------------------
# 3. The KV cache: prefill, then one token per step (chapter 6)
# ---------------------------------------------------------------------------------------

def kv_cache_steps(cfg: GPTConfig, batch: int = 1, prompt_tokens: int = 4, new_tokens: int = 2) -> list[dict]:
    """A prefill of `prompt_tokens`, then `new_tokens` single-token steps, through a real `KVCache`: per step,
    the tokens fed, the positions it computed, and the shape of one layer's keys and values afterwards."""
    model = _one_block_model(cfg)
    cache = model.new_kv_cache(batch, prompt_tokens + new_tokens)
    layer = cache.layers[0]  # every layer's cache has the same shape
    steps = []
    for step in range(new_tokens + 1):
        fed = prompt_tokens if step == 0 else 1
        start = cache.length
        before = layer.keys[:, :, :start].clone(), layer.values[:, :, :start].clone()
        with torch.no_grad():
            model(torch.zeros(batch, fed, dtype=torch.long), cache=cache)
        steps.append({
            "step": "prefill" if step == 0 else f"decode step {step}",
            "fed": fed,
            "computed": (start, cache.length),        # positions whose keys and values this step wrote
            "reused": torch.equal(layer.keys[:, :, :start], before[0])
                      and torch.equal(layer.values[:, :, :start], before[1]),  # earlier positions untouched
            "keys": tuple(layer.keys[:, :, :cache.length].shape),       # (B, h_kv, length, d_h)
            "values": tuple(layer.values[:, :, :cache.length].shape),
            "storage": tuple(layer.keys.shape),                           # allocated once: (B, h_kv, max, d_h)
        })
    return steps


def _legend(ax, y: float, entries: list[tuple[str, str, str]], x: float = 0.3) -> None:
    """A row of (colour, line style, label) squares with their labels."""
    for colour, linestyle, label in entries:
        ax.add_patch(Rectangle((x, y - 0.08), 0.16, 0.16, facecolor=colour, edgecolor=COLOURS["line"],
                               linewidth=0.8, linestyle=linestyle))
        ax.text(x + 0.24, y, label, va="center", fontsize=8)
        x += 0.5 + 0.062 * len(label)


def draw_kv_cache(cfg: GPTConfig, batch: int = 1, prompt_tokens: int = 4, new_tokens: int = 2) -> plt.Figure:
    """One layer's KV cache over a prefill and single-token decode steps: which keys and values each step
    computes, which it reads from the cache, and the cache's shape (B, h_kv, T, d_h) growing by one."""
    steps = kv_cache_steps(cfg, batch, prompt_tokens, new_tokens)
    capacity = steps[0]["storage"][2]
    height = 2.0 + 0.95 * len(steps)
    fig, ax = _canvas(height)
    cell, left = 0.36, 2.0
    top = height - 0.75
    ax.text(0.15, height - 0.25, f"The KV cache of one layer (each of the {cfg.n_layers} layers holds one like it)",
            fontsize=10, weight="bold", va="center")
    for position in range(capacity):
        ax.text(left + (position + 0.5) * cell, top, str(position), ha="center", va="center", fontsize=8)
    ax.text(left - 0.1, top, "position", ha="right", va="center", fontsize=8, color=COLOURS["note"])
    ax.text(4.55, top, "keys, values after the step: (B, h_kv, T, d_h)", va="center", fontsize=8,
            color=COLOURS["note"])
    for i, step in enumerate(steps):
        y = top - 0.5 - 0.95 * i
        start, end = step["computed"]
        for j, name in enumerate(("K", "V")):
            row_y = y - j * (cell + 0.04)
            ax.text(left - 0.1, row_y, name, ha="right", va="center", fontsize=8.5)
            for position in range(capacity):
                filled = COLOURS["computed"] if start <= position < end else (
                    COLOURS["cached"] if position < start else "white")
                ax.add_patch(Rectangle((left + position * cell, row_y - cell / 2), cell, cell, facecolor=filled,
                                       edgecolor=COLOURS["line"], linewidth=0.8,
                                       linestyle="-" if position < end else ":"))
        middle = y - (cell + 0.04) / 2
        tokens = f"{step['fed']} prompt tokens" if i == 0 else "1 new token"
        ax.text(0.15, middle + 0.1, step["step"], va="center", fontsize=9, weight="bold")
        ax.text(0.15, middle - 0.12, tokens, va="center", fontsize=8, color=COLOURS["note"])
        reads = f"reads {start} from the cache" if start else "nothing cached yet"
        ax.text(4.55, middle + 0.1, f"K, V: {_shape(step['keys'])} each", va="center", fontsize=8.5, family="monospace")
        ax.text(4.55, middle - 0.13, f"computes {end - start}, {reads}", va="center", fontsize=8,
                color=COLOURS["note"])
    _legend(ax, 0.75, [(COLOURS["computed"], "-", "computed this step"), (COLOURS["cached"], "-", "read from the cache"),
                       ("white", ":", "allocated, still empty")])
    _note(ax, 0.3, 0.3, f"storage allocated once: {_shape(steps[0]['storage'])} for the keys and for the values; "
                        "each step's query attends over every cached key")
    return fig


# ---------------------------------------------------------------------------------------
# 4. LoRA: a frozen W and two thin trainable matrices (chapter 7)
# ---------------------------------------------------------------------------------------

def lora_counts(d_in: int = 768, d_out: int = 2304, rank: int = 8, alpha: float = 16.0) -> dict:
    """The shapes and weight counts of a real `LoRALinear` over a d_in -> d_out layer."""
    layer = LoRALinear(nn.Linear(d_in, d_out, bias=False), rank, alpha)
    trainable, total = count_parameters(layer)
    return {"W": tuple(layer.base.weight.shape), "A": tuple(layer.lora_A.shape), "B": tuple(layer.lora_B.shape),
            "frozen": total - trainable, "trainable": trainable, "scaling": layer.scaling}


def _matrix(ax, corner: tuple[float, float], size: tuple[float, float], colour: str, hatch: str = "") -> None:
    ax.add_patch(Rectangle(corner, *size, facecolor=colour, edgecolor=COLOURS["line"], linewidth=1, hatch=hatch))


def draw_lora(d_in: int = 768, d_out: int = 2304, rank: int = 8, alpha: float = 16.0) -> plt.Figure:
    """h = W x + (α/r) B A x beside the matrices drawn to scale (the rank side at least thick enough to
    see), with the weight counts of a real `LoRALinear`."""
    counts = lora_counts(d_in, d_out, rank, alpha)
    scale = min(2.9 / d_out, 1.1 / d_in)                                # inches per row or column
    thin = max(rank * scale, 0.1)
    w_width, w_height = d_in * scale, d_out * scale
    fig, ax = _canvas(max(w_height, 2.6) + 1.25)
    top, left = max(w_height, 2.6) + 0.6, 0.35
    _matrix(ax, (left, top - w_height), (w_width, w_height), COLOURS["frozen"])
    ax.text(left + w_width / 2, top - w_height / 2, f"W\n{d_out} × {d_in}\nfrozen", ha="center", va="center",
            fontsize=9)
    plus_x = left + w_width + 0.3
    ax.text(plus_x, top - w_height / 2, "+", ha="center", va="center", fontsize=16)
    ax.text(plus_x + 0.45, top - w_height / 2, "α/r ×", ha="center", va="center", fontsize=11)
    b_x = plus_x + 0.85
    a_x = b_x + thin + 0.08
    _matrix(ax, (b_x, top - w_height), (thin, w_height), COLOURS["trainable"])
    _matrix(ax, (a_x, top - thin), (w_width, thin), COLOURS["trainable"])
    ax.text(a_x + w_width / 2, top + 0.12, f"A: {rank} × {d_in}, random start", ha="center", va="bottom",
            fontsize=8.5)
    ax.text(a_x + 0.04, top - thin - 0.1, f"B: {d_out} × {rank}\nstarts at 0, so B A = 0\n(B A has W's shape)",
            ha="left", va="top", fontsize=8.5)
    ax.text(left, top + 0.4, r"$h = W x + \frac{\alpha}{r} B A x$", fontsize=12, va="bottom")
    counts_x = max(a_x + w_width, a_x + 1.6) + 0.35
    share = 100 * counts["trainable"] / counts["frozen"]
    lines = [
        (f"a {d_in} → {d_out} layer, r = {rank}, α = {alpha:g}", "bold"),
        (f"frozen W: {counts['frozen']:,} weights", "normal"),
        (f"A (r × d_in): {rank * d_in:,}", "normal"),
        (f"B (d_out × r): {d_out * rank:,}", "normal"),
        (f"trained: r (d_in + d_out) = {counts['trainable']:,}", "bold"),
        (f"{share:.2f}% of W's weights", "normal"),
        (f"scaling α / r = {alpha:g} / {rank} = {counts['scaling']:g}", "normal"),
    ]
    for i, (text, weight) in enumerate(lines):
        ax.text(counts_x, top - 0.1 - 0.36 * i, text, fontsize=8.5, weight=weight, va="center")
    if thin > rank * scale:
        _note(ax, left, 0.18, f"drawn to scale, except the rank side: {rank} rows of {max(d_in, d_out)} "
                              "would be a hairline", fontsize=7.5)
    return fig


# ---------------------------------------------------------------------------------------
# 5. The training pipeline: minigpt's tasks in order (chapters 5, 7 and 8)
# ---------------------------------------------------------------------------------------

# (task, what it trains, where its weights start in --mode full, what it reads): the pipeline's boxes,
# named as `--task` names them.
PIPELINE = (
    ("pretrain", "next-token prediction on raw text", "new weights", "plain text: the-verdict.txt or --data"),
    ("sft", "instruction following, prompt masked", "GPT-2 medium's weights",
     "instruction records:\ninstruction-data.json"),
    ("reward", "a GPT with a scalar score head", "GPT-2 small's weights",
     "preference pairs (chosen, rejected):\ninstruction-data-with-preference.json"),
    ("ppo", "sample, score, clipped policy step", "the sft run",
     "the preference data's prompts; answers\nscored by the reward model"),
    ("dpo", "preferences in closed form", "the sft run (policy and reference)", "the same preference pairs"),
    ("grpo", "a group of answers per prompt", "GPT-2 small's weights",
     "prompts whose answers a program\nchecks (sums a + b by default)"),
)


def _stage(ax, centre: tuple[float, float], stage: tuple[str, str, str, str], colour: str) -> None:
    """One `--task` box: its name, what it trains, where it starts, and (in italics) what it reads."""
    (x, y), (task, trains, starts, reads) = centre, stage
    ax.add_patch(FancyBboxPatch((x - 1.15, y - 0.58), 2.3, 1.16, boxstyle="round,pad=0,rounding_size=0.06",
                                facecolor=colour, edgecolor=COLOURS["line"], linewidth=1))
    ax.text(x, y + 0.4, f"--task {task}", ha="center", va="center", fontsize=9, weight="bold", family="monospace")
    ax.text(x, y + 0.17, trains, ha="center", va="center", fontsize=7.5)
    ax.text(x, y - 0.04, f"from {starts}", ha="center", va="center", fontsize=7.5)
    ax.text(x, y - 0.33, reads, ha="center", va="center", fontsize=7, color=COLOURS["note"], style="italic")


def draw_training_pipeline() -> plt.Figure:
    """pretrain → sft → reward → ppo, with dpo and grpo as the alternatives after sft; each box is a
    `--task`, with what it trains, where it starts and the data it reads."""
    stages = {stage[0]: stage for stage in PIPELINE}
    places = {"pretrain": (3.65, 5.5), "sft": (3.65, 4.0), "reward": (1.3, 2.35), "dpo": (3.65, 2.35),
              "grpo": (6.0, 2.35), "ppo": (1.3, 0.7)}
    colours = {"pretrain": COLOURS["tensor"], "sft": COLOURS["ffn"], "reward": COLOURS["norm"],
               "ppo": COLOURS["norm"], "dpo": COLOURS["attention"], "grpo": COLOURS["attention"]}
    fig, ax = _canvas(6.2)
    for task, centre in places.items():
        _stage(ax, centre, stages[task], colours[task])
    _arrow(ax, (3.65, 4.92), (3.65, 4.58))
    for task in ("reward", "dpo", "grpo"):
        _arrow(ax, (3.65 + 0.7 * (places[task][0] - 3.65) / 2.35, 3.42), (places[task][0], 2.93))
    _arrow(ax, (1.3, 1.77), (1.3, 1.28))
    _note(ax, 1.42, 1.52, "--reward-model", ha="left", family="monospace", fontsize=7.5)
    _note(ax, 0.17, 3.25, "RLHF: a reward model,\nthen PPO", ha="left", fontsize=8, style="italic")
    _note(ax, 7.13, 3.25, "the alternatives:\nDPO, GRPO", ha="right", fontsize=8, style="italic")
    _note(ax, 4.75, 0.7, "arrows: the order the book runs them in;\n\"from\": where the weights start in --mode full",
          ha="center", fontsize=7.5)
    return fig
