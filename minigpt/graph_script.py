"""A studio graph as a standalone training script: one .py that needs only PyTorch (and tiktoken
for GPT-2's tokenizer), builds the same model as minigpt, reads the same text and trains it
with the graph's settings (appendix).

The script carries the graph itself, checked and in dependency order, and a small copy of
the layers it uses, written to build their weights in minigpt's order with minigpt's
initialisation: for the same seed its model starts from the same weights, so its first loss
is minigpt's (a test runs it and compares).
"""

from __future__ import annotations

import json
from typing import Any

from minigpt.config import TrainConfig
from minigpt.graph import NODE_TYPES, GraphError, Plan, file_stem, graph_error

SCRIPT_TOKENIZERS = ("char", "gpt2")
UNSUPPORTED_SWITCHES = {"ffn": "moe", "attn_tau": True, "halting": True}  # GPT block settings the script leaves out


def check_scriptable(plan: Plan, tokenizer: str) -> None:
    """Refuse what the script does not carry: a trained BPE, experts, tau gates, halting, low-rank attention."""
    errors = []
    if tokenizer not in SCRIPT_TOKENIZERS:
        node = next(n.id for n in plan.graph.nodes.values() if n.type == "tokenizer")
        errors.append(graph_error(node, "the exported script tokenizes by characters or with GPT-2's BPE "
                                        "(tiktoken); a BPE trained here lives in minigpt: pick char or gpt2 to "
                                        "export a script, or train it with python main.py --graph", "kind"))
    for node in plan.graph.nodes.values():
        if node.type == "classification_loss":
            errors.append(graph_error(node.shown_as or node.id, "the exported script trains next-token losses on "
                                      "plain text; a graph with a sequence-classification loss trains with python "
                                      "main.py --graph"))
        if node.type != "transformer_block":
            continue
        for name, value in UNSUPPORTED_SWITCHES.items():
            if node.params[name] == value:
                errors.append(graph_error(node.shown_as or node.id, f"the exported script keeps to the GPT block's "
                                          f"common settings; {name} = {value!r} trains with python main.py --graph",
                                          name))
        if node.params["attn_rank"] is not None:
            errors.append(graph_error(node.shown_as or node.id, "the exported script has no low-rank attention; "
                                      "empty attn_rank or train with python main.py --graph", "attn_rank"))
    if errors:
        raise GraphError(errors)


def script_plan(plan: Plan) -> dict[str, Any]:
    """What the script needs of the plan, as JSON: the nodes in order, their inputs and settings."""
    nodes = []
    for node_id in plan.order:
        node = plan.graph.nodes[node_id]
        reads = plan.inputs[node_id]
        first = reads.get("in", [None])[0]
        width = plan.values[first].width if first is not None else 0
        rope = plan.values[first].rope if first is not None else None
        nodes.append({"id": node_id, "type": node.type, "params": node.params, "inputs": reads, "width": width,
                      "rope": rope})
    return {"nodes": nodes, "vocab_size": plan.vocab_size, "context_length": plan.context_length,
            "embedding_dropout": plan.standard.drop_rate if plan.standard is not None else 0.0}


def training_script(plan: Plan, data_path: str, tokenizer: str, seed: int = 123) -> str:
    """The script's text; raises GraphError for what it cannot carry (`check_scriptable`)."""
    check_scriptable(plan, tokenizer)
    defaults = TrainConfig()
    settings = {**plan.training, "context_length": plan.context_length, "weight_decay": defaults.weight_decay,
                "betas": [defaults.beta1, defaults.beta2], "eval_iter": defaults.eval_iter, "seed": seed,
                "tokenizer": tokenizer, "data_path": data_path}
    header = f'''"""{plan.graph.name}: a model built in the minigpt studio, as a standalone PyTorch script.

Run it with `python {file_stem(plan.graph.name)}.py [--steps N] [--device cpu|cuda]`. It needs PyTorch{
        " and tiktoken" if tokenizer == "gpt2" else ""} only.
It reads the text at DATA_PATH (change it to train on another file), keeps its last 10% for
validation, builds the graph below layer by layer, and trains it with AdamW as the studio
would; every evaluation prints the training and validation loss and perplexity, and the
weights are saved beside this file at the end.

The graph's nodes, in the order they run (each reads the outputs of its "inputs"):
{chr(10).join(f"    {n['id']}: {NODE_TYPES[n['type']]['label']}" for n in script_plan(plan)['nodes'])}
"""
'''
    return (header + _IMPORTS + f"\nGRAPH = json.loads({json.dumps(json.dumps(script_plan(plan)))})\n"
            f"SETTINGS = json.loads({json.dumps(json.dumps(settings))})\n"
            f"DATA_PATH = SETTINGS[\"data_path\"]\n" + _LAYERS + _MODEL + _TRAINING)


_IMPORTS = '''
import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
'''

_LAYERS = '''

# ---------------------------------------------------------------------------------------
# The layers (minigpt's, written out: same weights in the same order, same arithmetic)
# ---------------------------------------------------------------------------------------

class LayerNorm(nn.Module):
    def __init__(self, width, bias=True, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(width))
        self.shift = nn.Parameter(torch.zeros(width)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.scale, self.shift, self.eps)


class RMSNorm(nn.Module):
    def __init__(self, width, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, x):
        rms = torch.sqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (x.float() / rms).to(x.dtype) * self.scale


def make_norm(kind, width, bias=True, eps=1e-5):
    return RMSNorm(width, eps) if kind == "rmsnorm" else LayerNorm(width, bias, eps)


class Rotary(nn.Module):
    """RoPE: rotate each (i, i + D/2) pair of a query's or key's dimensions by position x theta_i."""

    def __init__(self, head_dim, max_positions, base):
        super().__init__()
        inverse = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inverse)
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x):  # (B, H, T, D)
        cos, sin = self.cos[:x.shape[2]].to(x.dtype), self.sin[:x.shape[2]].to(x.dtype)
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class CausalSelfAttention(nn.Module):
    """A GPT block's attention: one fused q/k/v projection, grouped key/value heads, causal."""

    def __init__(self, width, heads, kv_heads, dropout, qkv_bias, out_bias, rope):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.dropout, self.rope = heads, kv_heads, width // heads, dropout, rope
        self.qkv = nn.Linear(width, (heads + 2 * kv_heads) * self.head_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(width, width, bias=out_bias)

    def forward(self, x):
        batch, tokens, _ = x.shape
        sizes = [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]
        q, k, v = (part.view(batch, tokens, -1, self.head_dim).transpose(1, 2)
                   for part in self.qkv(x).split(sizes, dim=2))            # (B, heads, T, D)
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        if self.kv_heads != self.heads:
            group = self.heads // self.kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, -1))


class Attention(nn.Module):
    """Queries from x, keys and values from `source` (x itself, or an encoder's output); causal or not."""

    def __init__(self, width, heads, causal, qkv_bias=False, dropout=0.0, rope=None):
        super().__init__()
        self.heads, self.causal, self.dropout, self.rope = heads, causal, dropout, rope
        self.query = nn.Linear(width, width, bias=qkv_bias)
        self.key_value = nn.Linear(width, 2 * width, bias=qkv_bias)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, source=None):
        source = x if source is None else source
        batch, tokens, width = x.shape
        q = self.query(x).view(batch, tokens, self.heads, -1).transpose(1, 2)
        k, v = (part.view(batch, source.shape[1], self.heads, -1).transpose(1, 2)
                for part in self.key_value(source).chunk(2, dim=-1))
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, width))


class FeedForward(nn.Module):
    def __init__(self, width, hidden, bias, exact_gelu=False):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(width, hidden, bias=bias), nn.GELU("none" if exact_gelu else "tanh"),
                                    nn.Linear(hidden, width, bias=bias))

    def forward(self, x):
        return self.layers(x)


class SwiGLU(nn.Module):
    def __init__(self, width, hidden, bias):
        super().__init__()
        self.gate = nn.Linear(width, hidden, bias=bias)
        self.up = nn.Linear(width, hidden, bias=bias)
        self.down = nn.Linear(hidden, width, bias=bias)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def hidden_width(kind, width, hidden):
    """minigpt's default MLP widths: 4 x width for GELU, 8/3 x width rounded up to 8 for SwiGLU."""
    if hidden is not None:
        return hidden
    return 4 * width if kind == "gelu" else -(-8 * width // 3 // 8) * 8


def make_ffn(kind, width, hidden, bias, exact_gelu=False):
    hidden = hidden_width(kind, width, hidden)
    return SwiGLU(width, hidden, bias) if kind == "swiglu" else FeedForward(width, hidden, bias, exact_gelu)


class Block(nn.Module):
    """A GPT block: x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, width, p, rope):
        super().__init__()
        self.att = CausalSelfAttention(width, p["n_heads"], p["n_kv_heads"] or p["n_heads"], p["drop_rate"],
                                       p["qkv_bias"], p["bias"], rope)
        self.ff = make_ffn(p["ffn"], width, p["ffn_hidden"], p["bias"], p["activation"] == "gelu")
        self.norm1 = make_norm(p["norm"], width, p["bias"])
        self.norm2 = make_norm(p["norm"], width, p["bias"])
        self.drop_shortcut = nn.Dropout(p["drop_rate"])

    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class BlockStack(nn.Module):
    def __init__(self, width, p, rope):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(width, p, rope) for _ in range(p["n_layers"])])

    def forward(self, x):
        return self.blocks(x)


class EncoderLayer(nn.Module):
    def __init__(self, width, p, rope):
        super().__init__()
        self.norm1, self.norm2 = make_norm(p["norm"], width), make_norm(p["norm"], width)
        self.att = Attention(width, p["n_heads"], p.get("causal", False), dropout=p["drop_rate"], rope=rope)
        self.ff = make_ffn("gelu", width, p["ffn_hidden"], True)
        self.drop = nn.Dropout(p["drop_rate"])

    def forward(self, x):
        x = x + self.drop(self.att(self.norm1(x)))
        return x + self.drop(self.ff(self.norm2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, width, p, rope):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (make_norm(p["norm"], width) for _ in range(3))
        self.att = Attention(width, p["n_heads"], True, dropout=p["drop_rate"], rope=rope)
        self.cross = Attention(width, p["n_heads"], False, dropout=p["drop_rate"])
        self.ff = make_ffn("gelu", width, p["ffn_hidden"], True)
        self.drop = nn.Dropout(p["drop_rate"])

    def forward(self, x, memory):
        x = x + self.drop(self.att(self.norm1(x)))
        x = x + self.drop(self.cross(self.norm2(x), memory))
        return x + self.drop(self.ff(self.norm3(x)))


class Conv1d(nn.Module):
    def __init__(self, width, out_channels, kernel_size, causal):
        super().__init__()
        self.padding = (kernel_size - 1, 0) if causal else (kernel_size // 2, kernel_size // 2)
        self.conv = nn.Conv1d(width, out_channels, kernel_size)

    def forward(self, x):
        return self.conv(F.pad(x.transpose(1, 2), self.padding)).transpose(1, 2)


class Linear(nn.Module):
    def __init__(self, width, out_features, activation, bias):
        super().__init__()
        self.proj = nn.Linear(width, out_features, bias=bias)
        self.activation = {"none": nn.Identity(), "gelu": nn.GELU(), "relu": nn.ReLU()}[activation]

    def forward(self, x):
        return self.activation(self.proj(x))


def sinusoidal_positions(num_positions, width):
    positions = torch.arange(num_positions, dtype=torch.float64).unsqueeze(1)
    frequencies = 10000.0 ** (-torch.arange(0, width, 2, dtype=torch.float64) / width)
    table = torch.zeros(num_positions, width, dtype=torch.float64)
    table[:, 0::2] = torch.sin(positions * frequencies)
    table[:, 1::2] = torch.cos(positions * frequencies[:width // 2])
    return table.float()


class Positions(nn.Module):
    def __init__(self, kind, context_length, width):
        super().__init__()
        self.kind = kind
        self.table = nn.Embedding(context_length, width) if kind == "learned" else None
        if kind == "sinusoidal":
            self.register_buffer("sinusoid", sinusoidal_positions(context_length, width), persistent=False)

    def forward(self, x):
        if self.table is not None:
            return x + self.table(torch.arange(x.shape[1], device=x.device))
        if self.kind == "sinusoidal":
            return x + self.sinusoid[:x.shape[1]].to(x.dtype)
        return x
'''

_MODEL = '''

# ---------------------------------------------------------------------------------------
# The model: the graph's nodes, run in order
# ---------------------------------------------------------------------------------------

def build_layer(node, vocab_size, context_length):
    p, width, kind = node["params"], node["width"], node["type"]
    heads = p.get("n_heads", 1)
    rope = Rotary(width // heads, context_length, node["rope"]) if node["rope"] is not None and kind in (
        "transformer_block", "attention", "encoder_layer", "decoder_layer") else None
    if kind == "token_embedding":
        return nn.Embedding(vocab_size, p["emb_dim"])
    if kind == "positional_encoding":
        return Positions(p["kind"], context_length, width)
    if kind == "transformer_block":
        return BlockStack(width, p, rope)
    if kind == "attention":
        if p["causal"]:
            return CausalSelfAttention(width, heads, heads, p["drop_rate"], p["qkv_bias"], True, rope)
        return Attention(width, heads, False, p["qkv_bias"], p["drop_rate"], rope)
    if kind == "feed_forward":
        return make_ffn(p["ffn"], width, p["ffn_hidden"], p["bias"])
    if kind == "encoder_layer":
        return EncoderLayer(width, p, rope)
    if kind == "decoder_layer":
        return DecoderLayer(width, p, rope)
    if kind == "norm":
        return make_norm(p["kind"], width, p["bias"])
    if kind == "dropout":
        return nn.Dropout(p["rate"])
    if kind == "linear":
        return Linear(width, p["out_features"], p["activation"], p["bias"])
    if kind == "conv1d":
        return Conv1d(width, p["out_channels"], p["kernel_size"], p["causal"])
    if kind == "output_head":
        return nn.Linear(width, vocab_size, bias=False)
    return None  # data, tokenizer, add, losses, the training goal: no weights


def key(node_id):
    return "".join(c if c.isalnum() or c == "_" else "_" for c in node_id)


class GraphModel(nn.Module):
    def __init__(self, graph):
        super().__init__()
        self.nodes = graph["nodes"]
        self.context_length = graph["context_length"]
        self.layers = nn.ModuleDict()
        for node in self.nodes:
            layer = build_layer(node, graph["vocab_size"], graph["context_length"])
            if layer is not None:
                self.layers[key(node["id"])] = layer
        self.embedding_dropout = nn.Dropout(graph["embedding_dropout"])
        losses = sorted((n for n in self.nodes if n["type"] == "next_token_loss"), key=lambda n: -n["params"]["weight"])
        self.heads = [(n["inputs"]["logits"][0], n["params"]["weight"]) for n in losses]
        tied = [n["id"] for n in self.nodes if n["type"] == "output_head" and n["params"]["tie_weights"]]
        embedding = next(n["id"] for n in self.nodes if n["type"] == "token_embedding")
        for head in tied:  # a tied head reuses the token embedding's matrix
            self.layers[key(head)].weight = self.layers[key(embedding)].weight
        self.apply(self.init_weights)
        if tied:
            for layer in self.layers.values():
                if isinstance(layer, Positions) and layer.table is not None:
                    nn.init.normal_(layer.table.weight, mean=0.0, std=0.02)
        depth = sum(len(m.blocks) if isinstance(m, BlockStack) else 1 for m in self.layers.values()
                    if isinstance(m, (BlockStack, EncoderLayer, DecoderLayer)))
        for name, param in self.named_parameters():  # residual writers start smaller (GPT-2)
            if name.endswith(("att.out_proj.weight", "ff.layers.2.weight", "down.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * max(depth, 1)))

    @staticmethod
    def init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, ids):
        """Token ids (B, T) -> [(weight, logits (B, T, V))], the model's own head first."""
        out = {}
        for node in self.nodes:
            kind, reads = node["type"], node["inputs"]
            if kind in ("data", "next_token_loss", "training_goal"):
                continue
            if kind == "tokenizer":
                out[node["id"]] = ids
            elif kind == "add":
                out[node["id"]] = out[reads["a"][0]] + out[reads["b"][0]]
            elif kind == "decoder_layer":
                out[node["id"]] = self.layers[key(node["id"])](out[reads["in"][0]], out[reads["memory"][0]])
            else:
                out[node["id"]] = self.layers[key(node["id"])](out[reads["in"][0]])
                if kind == "positional_encoding":
                    out[node["id"]] = self.embedding_dropout(out[node["id"]])
        return [(weight, out[head]) for head, weight in self.heads]


def loss_of(model, inputs, targets):
    """The weighted sum of the next-token losses while training; the model's own head's when evaluating."""
    heads = model(inputs)
    if not model.training:
        return F.cross_entropy(heads[0][1].flatten(0, 1), targets.flatten())
    if len(heads) == 1 and heads[0][0] == 1.0:
        return F.cross_entropy(heads[0][1].flatten(0, 1), targets.flatten())
    return sum(weight * F.cross_entropy(logits.flatten(0, 1), targets.flatten()) for weight, logits in heads)
'''

_TRAINING = '''

# ---------------------------------------------------------------------------------------
# Data and training
# ---------------------------------------------------------------------------------------

def read_text(path):
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"no text at {path}: set DATA_PATH at the top of this script to a UTF-8 text file")
    return file.read_text(encoding="utf-8")


def make_tokenizer(text):
    """(encode, decode): by characters (the text's own, sorted), or GPT-2's BPE through tiktoken."""
    if SETTINGS["tokenizer"] == "char":
        chars = sorted(set(text))
        index = {ch: i for i, ch in enumerate(chars)}
        return (lambda s: [index[ch] for ch in s if ch in index]), (lambda ids: "".join(chars[i] for i in ids))
    import tiktoken

    encoding = tiktoken.get_encoding("gpt2")
    return (lambda s: encoding.encode(s, allowed_special={"<|endoftext|>"})), encoding.decode


def windows(ids, length):
    """Non-overlapping windows: inputs ids[i : i + length], targets one token later."""
    ids = torch.tensor(ids)
    starts = range(0, len(ids) - length, length)
    return (torch.stack([ids[i:i + length] for i in starts]), torch.stack([ids[i + 1:i + length + 1] for i in starts]))


def load_windows():
    """(train inputs, train targets, val inputs, val targets, decode) from DATA_PATH, 90% / 10%."""
    text = read_text(DATA_PATH)
    encode, decode = make_tokenizer(text)
    split = int(0.9 * len(text))
    length = SETTINGS["context_length"]
    train, val = windows(encode(text[:split]), length), windows(encode(text[split:]), length)
    if len(train[0]) == 0 or len(val[0]) == 0:
        raise SystemExit(f"the text is too short for windows of {length} tokens in both splits")
    return (*train, *val, decode)


def batches(inputs, targets, epoch):
    """The epoch's batches, shuffled by (seed, epoch) with a generator of their own."""
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(SETTINGS["seed"] + epoch))
    size = SETTINGS["batch_size"]
    for start in range(0, len(order) - size + 1, size):
        rows = order[start:start + size]
        yield inputs[rows], targets[rows]


def learning_rate_at(step, total_steps):
    lr, warmup = SETTINGS["learning_rate"], SETTINGS["warmup_steps"]
    if step < warmup:
        return lr * (step + 1) / warmup
    if SETTINGS["lr_schedule"] == "constant":
        return lr
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 0.1 * lr + 0.5 * 0.9 * lr * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model, inputs, targets, device):
    model.eval()
    size, count = SETTINGS["batch_size"], SETTINGS["eval_iter"]
    losses = [loss_of(model, inputs[i:i + size].to(device), targets[i:i + size].to(device)).item()
              for i in range(0, min(len(inputs), size * count), size)]
    model.train()
    return sum(losses) / len(losses)


def build_model():
    """The graph's model, its weights drawn from SETTINGS["seed"] as minigpt draws them."""
    torch.manual_seed(SETTINGS["seed"])
    return GraphModel(GRAPH)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=SETTINGS["max_steps"], help="stop after this many steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    train_x, train_y, val_x, val_y, decode = load_windows()
    model = build_model().to(args.device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": SETTINGS["weight_decay"]},
                                   {"params": rest, "weight_decay": 0.0}], lr=SETTINGS["learning_rate"],
                                  betas=tuple(SETTINGS["betas"]))
    steps_per_epoch = len(train_x) // SETTINGS["batch_size"]
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(train_x)} training windows do not fill one batch of {SETTINGS['batch_size']}")
    total = steps_per_epoch * SETTINGS["num_epochs"]
    total = min(total, args.steps) if args.steps else total
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters; {len(train_x)} training and {len(val_x)} "
          f"validation windows of {SETTINGS['context_length']} tokens; {total} steps on {args.device}")
    step = 0
    for epoch in range(SETTINGS["num_epochs"]):
        for inputs, targets in batches(train_x, train_y, epoch):
            if step >= total:
                break
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(step, total)
            loss = loss_of(model, inputs.to(args.device), targets.to(args.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if SETTINGS["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), SETTINGS["grad_clip"])
            optimizer.step()
            step += 1
            print(f"step {step}: loss {loss.item():.4f}, perplexity {math.exp(min(loss.item(), 50)):.2f}")
            if step % SETTINGS["eval_freq"] == 0 or step == total:
                train_loss = evaluate(model, train_x, train_y, args.device)
                val_loss = evaluate(model, val_x, val_y, args.device)
                print(f"  evaluation at step {step}: train loss {train_loss:.4f} (perplexity "
                      f"{math.exp(min(train_loss, 50)):.2f}), validation loss {val_loss:.4f} (perplexity "
                      f"{math.exp(min(val_loss, 50)):.2f})")
    out = Path(__file__).with_suffix(".pt")
    torch.save(model.state_dict(), out)
    print(f"weights saved to {out}")


if __name__ == "__main__":
    main()
'''
