"""Graphs of blocks, as the studio draws them, checked and compiled to a PyTorch module (appendix).

A graph is JSON: nodes (a type, an id, settings) and edges from an output port to an input
port. Every edge carries a typed value: text, token ids (B, T), hidden states (B, T, C),
logits (B, T, V) or a loss. Checking a graph walks it in dependency order and infers each
edge's shape, so every mistake is reported on the node and port it concerns, before any
weight exists. The standard chain

    data -> tokenizer -> token embedding -> positional encoding -> transformer block x N
         -> norm -> output head -> next-token loss -> training goal

compiles to exactly `GPTModel`; any other wiring compiles to a `GraphModel`, which runs its
nodes in that same dependency order.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minigpt.attention import MultiHeadAttention, RotaryEmbedding
from minigpt.blocks import LayerNorm, RMSNorm, TransformerBlock, make_ffn
from minigpt.config import ACTIVATIONS, FFNS, LR_SCHEDULES, NORMS, POSITION_EMBEDDINGS, ConfigError, GPTConfig
from minigpt.model import GPTModel, LanguageModel, ModelOutput, sinusoidal_positions

GRAPH_VERSION = 2
MAX_WIDTH = 16_384          # widths, hidden sizes and channels: large enough for any model a studio trains
MAX_NODES = 500             # after templates are expanded


# ---------------------------------------------------------------------------------------
# Node types: their ports and settings
# ---------------------------------------------------------------------------------------

def _param(name: str, kind: str, default: Any, label: str = "", **more: Any) -> dict[str, Any]:
    return {"name": name, "kind": kind, "default": default, "label": label or name.replace("_", " "), **more}


def _port(name: str, kind: str, label: str = "", multiple: bool = False) -> dict[str, Any]:
    return {"name": name, "kind": kind, "label": label or name, "multiple": multiple}


_HIDDEN_IN, _HIDDEN_OUT = [_port("in", "hidden")], [_port("out", "hidden")]
_BLOCK_SWITCHES = [
    _param("n_heads", "int", 4, "attention heads", min=1, max=128),
    _param("n_kv_heads", "int", None, "key/value heads (empty: one per head)", min=1, max=128, optional=True),
    _param("norm", "choice", "layernorm", "norm", choices=list(NORMS)),
    _param("ffn", "choice", "gelu", "feed-forward", choices=list(FFNS)),
    _param("ffn_hidden", "int", None, "hidden width (empty: the default)", min=1, max=4 * MAX_WIDTH, optional=True),
    _param("activation", "choice", "gelu_tanh", "GELU", choices=list(ACTIVATIONS), when={"ffn": "gelu"}),
    _param("n_experts", "int", 4, "experts", min=2, max=64, when={"ffn": "moe"}),
    _param("moe_top_k", "int", 2, "experts per token", min=1, max=64, when={"ffn": "moe"}),
    _param("moe_shared_expert", "bool", False, "a shared expert every token uses", when={"ffn": "moe"}),
    _param("attn_rank", "int", None, "query/key rank per head (empty: the head size)", min=1, max=MAX_WIDTH,
           optional=True),
    _param("attn_tau", "bool", False, "tau-gated attention (chapter 11)"),
    _param("halting", "bool", False, "adaptive depth: tokens may stop early (chapter 11)"),
    _param("ponder_coef", "float", 0.01, "ponder cost weight", min=0.0, max=10.0, when={"halting": True}),
    _param("drop_rate", "float", 0.0, "dropout", min=0.0, max=0.9),
    _param("qkv_bias", "bool", False, "bias in q, k, v"),
    _param("bias", "bool", True, "other biases"),
]
_LAYER_SETTINGS = [_param("n_heads", "int", 4, "attention heads", min=1, max=128),
                   _param("ffn_hidden", "int", None, "hidden width (empty: 4 x width)", min=1, max=4 * MAX_WIDTH,
                          optional=True),
                   _param("norm", "choice", "layernorm", "norm", choices=list(NORMS)),
                   _param("drop_rate", "float", 0.0, "dropout", min=0.0, max=0.9)]

NODE_TYPES: dict[str, dict[str, Any]] = {
    "data": {"label": "Data", "group": "data", "inputs": [], "outputs": [_port("text", "text")],
             "help": "the text to train on: a corpus minigpt downloads, or a file you upload",
             "params": [_param("source", "choice", "the-verdict", "text", choices=[])]},  # choices: the studio's
    "tokenizer": {"label": "Tokenizer", "group": "data", "inputs": [_port("text", "text")],
                  "outputs": [_port("ids", "ids", "token ids")], "help": "text to token ids (chapter 2)",
                  "params": [_param("kind", "choice", "gpt2", "tokenizer", choices=["gpt2", "bpe", "char"]),
                             _param("vocab_size", "int", 512, "BPE vocabulary", min=257, max=65536,
                                    when={"kind": "bpe"})]},
    "token_embedding": {"label": "Token embedding", "group": "embedding", "inputs": [_port("in", "ids", "token ids")],
                        "outputs": _HIDDEN_OUT, "help": "one learned vector per token id (chapter 2)",
                        "params": [_param("emb_dim", "int", 128, "width (emb_dim)", min=8, max=MAX_WIDTH)]},
    "positional_encoding": {
        "label": "Positional encoding", "group": "embedding", "inputs": _HIDDEN_IN, "outputs": _HIDDEN_OUT,
        "help": "how a token knows where it is: added vectors, or RoPE inside the attention after it (chapters 4, 10)",
        "params": [_param("kind", "choice", "learned", "positions", choices=list(POSITION_EMBEDDINGS)),
                   _param("rope_base", "float", 10000.0, "RoPE base", min=2.0, max=1e9, when={"kind": "rope"})]},
    "transformer_block": {
        "label": "GPT block", "group": "blocks", "inputs": _HIDDEN_IN, "outputs": _HIDDEN_OUT,
        "help": "causal attention + feed-forward, each pre-normed with a residual, repeated N times (chapters 3, 4, 10)",
        "params": [_param("n_layers", "int", 4, "blocks (repeat x N)", min=1, max=96), *_BLOCK_SWITCHES]},
    "attention": {
        "label": "Multi-head attention", "group": "layers", "inputs": _HIDDEN_IN, "outputs": _HIDDEN_OUT,
        "help": "self-attention alone, no norm and no residual (chapter 3); causal unless told otherwise",
        "params": [_param("n_heads", "int", 4, "heads", min=1, max=128),
                   _param("causal", "bool", True, "causal (each token sees only earlier ones)"),
                   _param("qkv_bias", "bool", False, "bias in q, k, v"),
                   _param("drop_rate", "float", 0.0, "attention dropout", min=0.0, max=0.9)]},
    "feed_forward": {
        "label": "Feed-forward", "group": "layers", "inputs": _HIDDEN_IN, "outputs": _HIDDEN_OUT,
        "help": "the per-token MLP alone, no norm and no residual (chapters 4, 10)",
        "params": [_param("ffn", "choice", "gelu", "kind", choices=["gelu", "swiglu"]),
                   _param("ffn_hidden", "int", None, "hidden width (empty: the default)", min=1,
                          max=4 * MAX_WIDTH, optional=True),
                   _param("bias", "bool", True, "biases")]},
    "encoder_layer": {
        "label": "Transformer encoder layer", "group": "blocks", "inputs": _HIDDEN_IN, "outputs": _HIDDEN_OUT,
        "help": "bidirectional self-attention + feed-forward: every position sees the whole window",
        "params": [*_LAYER_SETTINGS, _param("causal", "bool", False, "causal (see only earlier positions)")]},
    "decoder_layer": {
        "label": "Transformer decoder layer", "group": "blocks",
        "inputs": [_port("in", "hidden"), _port("memory", "hidden", "memory (an encoder's output)")],
        "outputs": _HIDDEN_OUT,
        "help": "causal self-attention, cross-attention to the memory input, feed-forward",
        "params": list(_LAYER_SETTINGS)},
    "norm": {"label": "Norm", "group": "layers", "inputs": _HIDDEN_IN, "outputs": _HIDDEN_OUT,
             "help": "LayerNorm or RMSNorm over each token's vector (chapters 4, 10)",
             "params": [_param("kind", "choice", "layernorm", "norm", choices=list(NORMS)),
                        _param("bias", "bool", True, "shift (LayerNorm)", when={"kind": "layernorm"})]},
    "dropout": {"label": "Dropout", "group": "layers", "inputs": _HIDDEN_IN, "outputs": _HIDDEN_OUT,
                "help": "zeroes a share of the values while training",
                "params": [_param("rate", "float", 0.1, "rate", min=0.0, max=0.9)]},
    "linear": {"label": "Linear", "group": "layers", "inputs": _HIDDEN_IN, "outputs": _HIDDEN_OUT,
               "help": "a learned matrix on each token's vector, optionally followed by GELU",
               "params": [_param("out_features", "int", 128, "output width", min=1, max=MAX_WIDTH),
                          _param("activation", "choice", "none", "then", choices=["none", "gelu", "relu"]),
                          _param("bias", "bool", True, "bias")]},
    "conv1d": {"label": "Convolution (1-D)", "group": "layers", "inputs": _HIDDEN_IN, "outputs": _HIDDEN_OUT,
               "help": "mixes each token with its neighbours along the sequence; causal: only earlier ones",
               "params": [_param("out_channels", "int", 128, "output width", min=1, max=MAX_WIDTH),
                          _param("kernel_size", "int", 3, "kernel (tokens)", min=1, max=64),
                          _param("causal", "bool", True, "causal (pad on the left only)")]},
    "add": {"label": "Add (residual)", "group": "layers", "inputs": [_port("a", "hidden"), _port("b", "hidden")],
            "outputs": _HIDDEN_OUT, "help": "a + b, of the same width: a residual connection", "params": []},
    "output_head": {"label": "Output head", "group": "heads", "inputs": _HIDDEN_IN,
                    "outputs": [_port("logits", "logits")], "help": "a score for every token of the vocabulary",
                    "params": [_param("tie_weights", "bool", False, "tied to the token embedding")]},
    "next_token_loss": {"label": "Next-token loss", "group": "training", "inputs": [_port("logits", "logits")],
                        "outputs": [_port("loss", "loss")],
                        "help": "cross-entropy of each position's scores against the token that follows it (chapter 5)",
                        "params": [_param("weight", "float", 1.0, "weight", min=0.0, max=100.0)]},
    "classification_loss": {
        "label": "Sequence classification loss", "group": "training", "inputs": [_port("in", "hidden")],
        "outputs": [_port("loss", "loss")],
        "help": "a label for each text, read from its last token's vector by a linear head; needs labelled data "
                "(a .csv, .tsv or .jsonl with text and label)",
        "params": [_param("weight", "float", 1.0, "weight", min=0.0, max=100.0)]},
    "training_goal": {
        "label": "Training goal", "group": "training", "inputs": [_port("loss", "loss", "losses", multiple=True)],
        "outputs": [], "help": "the weighted sum of its losses, minimised with AdamW (chapter 5)",
        "params": [_param("context_length", "int", 128, "context (tokens per window)", min=2, max=8192),
                   _param("batch_size", "int", 8, "batch size", min=1, max=4096),
                   _param("learning_rate", "float", 4e-4, "learning rate", min=0.0, max=1.0),
                   _param("num_epochs", "int", 1, "epochs", min=1, max=10000),
                   _param("max_steps", "int", None, "stop after steps (empty: all epochs)", min=1, max=10**7,
                          optional=True),
                   _param("eval_freq", "int", 5, "evaluate every (steps)", min=1, max=10**6),
                   _param("lr_schedule", "choice", "constant", "schedule", choices=list(LR_SCHEDULES)),
                   _param("warmup_steps", "int", 0, "warm-up steps", min=0, max=10**6),
                   _param("grad_clip", "float", None, "gradient clip (empty: off)", min=0.0, max=1e6,
                          optional=True)]},
    "template": {"label": "Template", "group": "templates", "inputs": _HIDDEN_IN, "outputs": _HIDDEN_OUT,
                 "help": "a saved group of nodes, placed again and repeated N times in a row",
                 "params": [_param("template", "text", "", "template"),
                            _param("repeat", "int", 1, "repeat x N", min=1, max=96)]},
}
ONE_PER_GRAPH = ("data", "tokenizer", "training_goal")
STANDARD_CHAIN = ("data", "tokenizer", "token_embedding", "positional_encoding", "transformer_block", "norm",
                  "output_head", "next_token_loss", "training_goal")
TRAINING_SETTINGS = ("batch_size", "learning_rate", "num_epochs", "max_steps", "eval_freq", "lr_schedule",
                     "warmup_steps", "grad_clip")


# ---------------------------------------------------------------------------------------
# Reading a graph: structure and settings
# ---------------------------------------------------------------------------------------

class GraphError(ValueError):
    """A graph that cannot be built, with one entry per problem: {"node", "port", "field", "message"}."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join((f"{e['node']}: " if e.get("node") else "") + e["message"] for e in errors))
        self.errors = errors


def graph_error(node: str | None, message: str, field_name: str | None = None,
                port: str | None = None) -> dict[str, Any]:
    return {"node": node, "port": port, "field": field_name, "message": message}


def check_value(spec: dict[str, Any], value: Any) -> tuple[Any, str | None]:
    """`value` converted to the setting's kind, or an error message."""
    kind, label = spec["kind"], spec["label"]
    if value is None or value == "":
        return (None, None) if spec.get("optional") else (None, f"{label} is required")
    if kind == "bool":
        return (value, None) if isinstance(value, bool) else (None, f"{label} must be true or false")
    if kind == "choice":
        if not spec["choices"]:  # the data source: checked where the files are known
            return (value, None) if isinstance(value, str) else (None, f"{label} must be text")
        return (value, None) if value in spec["choices"] else (
            None, f"{label} must be one of {', '.join(spec['choices'])}, got {value!r}")
    if kind == "text":
        return (value, None) if isinstance(value, str) else (None, f"{label} must be text")
    try:
        number = int(value) if kind == "int" else float(value)
        if isinstance(value, bool) or (kind == "int" and float(value) != number) or not math.isfinite(number):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        return None, f"{label} must be {'a whole number' if kind == 'int' else 'a number'}, got {value!r}"
    if number < spec.get("min", -math.inf) or number > spec.get("max", math.inf):
        bound = f"between {spec.get('min')} and {spec['max']}" if "max" in spec else f"at least {spec['min']}"
        return None, f"{label} must be {bound}, got {value!r}"
    return number, None


@dataclass
class Node:
    id: str
    type: str
    params: dict[str, Any]
    shown_as: str | None = None  # the node on the canvas an expanded template's copy came from


@dataclass(frozen=True)
class Edge:
    source: str
    source_port: str
    target: str
    target_port: str


@dataclass
class Graph:
    """A graph read and checked for structure and settings, templates expanded."""

    name: str
    nodes: dict[str, Node]
    edges: list[Edge]
    templates: dict[str, dict[str, Any]] = field(default_factory=dict)


def _as_list(graph: dict[str, Any], key: str, errors: list[dict[str, Any]]) -> list[Any]:
    value = graph.get(key, [])
    if not isinstance(value, list):
        errors.append(graph_error(None, f"\"{key}\" must be a list"))
        return []
    return value


def upgrade(graph: dict[str, Any]) -> dict[str, Any]:
    """A version-1 graph (the fixed chain: a final_norm node, a training goal that was its loss) in
    today's form: a norm node of the blocks' kind, and a next-token loss before the goal."""
    if graph.get("version", 1) != 1 or not isinstance(graph.get("nodes"), list):
        return graph
    graph = copy.deepcopy(graph)
    blocks = next((n.get("params") or {} for n in graph["nodes"]
                   if isinstance(n, dict) and n.get("type") == "transformer_block"), {})
    for node in graph["nodes"]:
        if isinstance(node, dict) and node.get("type") == "final_norm":
            node["type"], node["params"] = "norm", {"kind": blocks.get("norm", "layernorm"),
                                                    "bias": blocks.get("bias", True)}
    goals = [n["id"] for n in graph["nodes"] if isinstance(n, dict) and n.get("type") == "training_goal"]
    edges = graph.get("edges") if isinstance(graph.get("edges"), list) else []
    for goal in goals:
        loss_id = f"{goal}-loss"
        graph["nodes"].append({"id": loss_id, "type": "next_token_loss", "params": {}})
        for edge in edges:
            if isinstance(edge, dict) and edge.get("to") == goal:
                edge["to"] = loss_id
        edges.append({"from": loss_id, "to": goal})
    graph["edges"], graph["version"] = edges, GRAPH_VERSION
    return graph


def read_graph(graph: Any) -> Graph:
    """The graph's nodes (settings checked, defaults filled in, templates expanded) and edges;
    raises GraphError naming each bad node, port or setting."""
    if not isinstance(graph, dict):
        raise GraphError([graph_error(None, "a graph is a JSON object with \"nodes\" and \"edges\"")])
    graph = upgrade(graph)
    errors: list[dict[str, Any]] = []
    templates = _read_templates(_as_list(graph, "templates", errors), errors)
    nodes = _read_nodes(_as_list(graph, "nodes", errors), errors, templates)
    edges = _read_edges(_as_list(graph, "edges", errors), nodes, errors)
    if errors:
        raise GraphError(errors)
    name = graph.get("name") if isinstance(graph.get("name"), str) else ""
    read = Graph(name.strip()[:80] or "model", nodes, edges, templates)
    return expand_templates(read)


def _read_nodes(raw: list[Any], errors: list[dict[str, Any]], templates: dict[str, Any]) -> dict[str, Node]:
    nodes: dict[str, Node] = {}
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not item["id"].strip():
            errors.append(graph_error(None, "every node needs an \"id\" (text) and a \"type\""))
            continue
        node_id, kind = item["id"], item.get("type")
        if node_id in nodes:
            errors.append(graph_error(node_id, f"two nodes have the id {node_id!r}; ids must be unique"))
            continue
        if kind not in NODE_TYPES:
            errors.append(graph_error(node_id, f"unknown node type {kind!r}; the types are {', '.join(NODE_TYPES)}"))
            continue
        given = item.get("params") or {}
        if not isinstance(given, dict):
            errors.append(graph_error(node_id, "\"params\" must be an object"))
            continue
        nodes[node_id] = Node(node_id, kind, _read_params(node_id, kind, given, errors))
        if kind == "template" and nodes[node_id].params["template"] not in templates:
            errors.append(graph_error(node_id, f"no template named {nodes[node_id].params['template']!r}; the graph "
                                               f"has {', '.join(map(repr, templates)) or 'none'}", "template"))
    return nodes


def _read_params(node_id: str, kind: str, given: dict[str, Any], errors: list[dict[str, Any]]) -> dict[str, Any]:
    specs = NODE_TYPES[kind]["params"]
    for name in sorted(set(given) - {p["name"] for p in specs}):
        errors.append(graph_error(node_id, f"{NODE_TYPES[kind]['label']} has no setting {name!r}", name))
    values = {}
    for spec in specs:
        value, problem = check_value(spec, given.get(spec["name"], spec["default"]))
        if problem:
            errors.append(graph_error(node_id, problem, spec["name"]))
        values[spec["name"]] = value
    return values


def _read_edges(raw: list[Any], nodes: dict[str, Node], errors: list[dict[str, Any]]) -> list[Edge]:
    edges, taken = [], {}
    for item in raw:
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in ("from", "to")):
            errors.append(graph_error(None, "every edge needs \"from\" and \"to\" node ids"))
            continue
        source, target = item["from"], item["to"]
        if source not in nodes or target not in nodes:
            missing = source if source not in nodes else target
            errors.append(graph_error(source if source in nodes else None,
                                      f"an edge joins {source!r} to {target!r}, but there is no node {missing!r}"))
            continue
        outputs, inputs = NODE_TYPES[nodes[source].type]["outputs"], NODE_TYPES[nodes[target].type]["inputs"]
        source_port = item.get("from_port") or (outputs[0]["name"] if outputs else "")
        target_port = item.get("to_port") or (inputs[0]["name"] if inputs else "")
        out_spec = next((p for p in outputs if p["name"] == source_port), None)
        in_spec = next((p for p in inputs if p["name"] == target_port), None)
        if out_spec is None:
            label = NODE_TYPES[nodes[source].type]["label"]
            errors.append(graph_error(source, f"{label} has no output {source_port!r}" if outputs else
                                      f"{label} has no output: nothing can follow it; remove that edge",
                                      port=source_port or None))
            continue
        if in_spec is None:
            errors.append(graph_error(target, f"{NODE_TYPES[nodes[target].type]['label']} has no input "
                                              f"{target_port!r}", port=target_port))
            continue
        if out_spec["kind"] != in_spec["kind"]:
            errors.append(graph_error(target, f"{in_spec['label']} takes {KIND_WORDS[in_spec['kind']]}, but "
                                              f"{source!r} gives {KIND_WORDS[out_spec['kind']]}", port=target_port))
            continue
        if (target, target_port) in taken and not in_spec["multiple"]:
            errors.append(graph_error(target, f"{in_spec['label']} already has an input (from "
                                              f"{taken[(target, target_port)]!r}); remove one edge", port=target_port))
            continue
        taken[(target, target_port)] = source
        edges.append(Edge(source, source_port, target, target_port))
    return edges


KIND_WORDS = {"text": "text", "ids": "token ids (B, T)", "hidden": "hidden states (B, T, C)",
              "logits": "logits (B, T, V)", "loss": "a loss"}


# ---------------------------------------------------------------------------------------
# Templates: a saved group of hidden -> hidden nodes, placed again and repeated
# ---------------------------------------------------------------------------------------

def _read_templates(raw: list[Any], errors: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{name: template}; each is {"name", "nodes", "edges", "input": node id, "output": node id}."""
    templates = {}
    for item in raw:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name.strip():
            errors.append(graph_error(None, "every template needs a \"name\""))
            continue
        inner_errors: list[dict[str, Any]] = []
        nodes = _read_nodes(_as_list(item, "nodes", inner_errors), inner_errors, {})
        edges = _read_edges(_as_list(item, "edges", inner_errors), nodes, inner_errors)
        for node in nodes.values():
            if node.type in ONE_PER_GRAPH + ("template", "output_head", "next_token_loss", "classification_loss",
                                             "token_embedding"):
                inner_errors.append(graph_error(node.id, f"a template holds layers between hidden states; "
                                                         f"move the {NODE_TYPES[node.type]['label']} out of it"))
        for key, port in (("input", "in"), ("output", "out")):  # the ports a placed copy is joined by
            node = nodes.get(item[key]) if isinstance(item.get(key), str) else None
            if node is None or port not in [p["name"] for p in NODE_TYPES[node.type][key + "s"]]:
                inner_errors.append(graph_error(None, f"its {key} must name one of its nodes that has an "
                                                      f"{key} port {port!r}"))
        errors.extend(graph_error(None, f"template {name!r}: " + (f"{e['node']}: " if e["node"] else "")
                                  + e["message"]) for e in inner_errors)
        if not inner_errors:
            templates[name] = {"name": name, "nodes": nodes, "edges": edges, "input": item["input"],
                               "output": item["output"]}
    return templates


def expand_templates(graph: Graph) -> Graph:
    """Each template node replaced by `repeat` copies of its template in a row; a copy's nodes are
    named "<template node>/<copy>/<inner node>" and remember the canvas node they stand for."""
    nodes, edges = dict(graph.nodes), list(graph.edges)
    for node in [n for n in graph.nodes.values() if n.type == "template"]:
        template = graph.templates[node.params["template"]]
        del nodes[node.id]
        entry = exit_ = None
        for copy_number in range(1, node.params["repeat"] + 1):
            prefix = f"{node.id}/{copy_number}/"
            for inner in template["nodes"].values():
                nodes[prefix + inner.id] = replace(inner, id=prefix + inner.id, params=dict(inner.params),
                                                   shown_as=node.id)
            edges += [replace(e, source=prefix + e.source, target=prefix + e.target) for e in template["edges"]]
            if exit_ is not None:
                edges.append(Edge(exit_, "out", prefix + template["input"], "in"))
            entry = entry or prefix + template["input"]
            exit_ = prefix + template["output"]
        edges = [replace(e, target=entry) if e.target == node.id else
                 replace(e, source=exit_) if e.source == node.id else e for e in edges]
    if len(nodes) > MAX_NODES:
        raise GraphError([graph_error(None, f"the graph has {len(nodes)} nodes once its templates are repeated; "
                                            f"keep it under {MAX_NODES} (fewer repeats)")])
    return replace(graph, nodes=nodes, edges=edges)


# ---------------------------------------------------------------------------------------
# Checking: order, shapes and what each value may have seen
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Value:
    """What flows along an edge: its kind, its last dimension, and whether position t has seen
    tokens after t (`sees_future`), which next-token prediction must not."""

    kind: str
    width: int = 0
    sees_future: bool = False
    rope: float | None = None  # positions by rotation (RoPE, its base): the attention after applies them

    def shape(self) -> str:
        return {"text": "text", "ids": "B x T", "hidden": f"B x T x {self.width}", "logits": f"B x T x {self.width}",
                "loss": "scalar"}[self.kind]


@dataclass
class Plan:
    """A checked graph: nodes in dependency order, each node's inputs, each edge's value."""

    graph: Graph
    order: list[str]
    inputs: dict[str, dict[str, list[str]]]  # node -> port -> source nodes
    values: dict[str, Value]                 # node -> its output's value (every type has one output at most)
    vocab_size: int
    context_length: int
    training: dict[str, Any]
    standard: GPTConfig | None = None        # the GPTConfig when the graph is the standard chain
    labels: list[str] = field(default_factory=list)  # labelled data's classes (a sequence-classification loss)

    def edge_shapes(self) -> list[dict[str, Any]]:
        return [{"from": e.source, "from_port": e.source_port, "to": e.target, "to_port": e.target_port,
                 "kind": self.values[e.source].kind, "shape": self.values[e.source].shape()}
                for e in self.graph.edges if e.source in self.values]


def check_graph(graph: Graph, vocab_size: int, labels: list[str] | None = None) -> Plan:
    """Order the nodes, infer every edge's value and refuse what cannot train; raises GraphError.
    `labels` are the classes of labelled data, which a sequence-classification loss needs."""
    errors = _check_counts(graph)
    for node in graph.nodes.values():
        if node.type == "classification_loss" and not labels:
            errors.append(graph_error(_shown(node), "a sequence-classification loss needs labelled data: give the "
                                                    "Data node a .csv, .tsv or .jsonl file whose records have a "
                                                    "\"text\" and a \"label\" (two classes at least)"))
    inputs: dict[str, dict[str, list[str]]] = {node_id: {} for node_id in graph.nodes}
    for edge in graph.edges:
        inputs[edge.target].setdefault(edge.target_port, []).append(edge.source)
    for node in graph.nodes.values():
        for port in NODE_TYPES[node.type]["inputs"]:
            if not inputs[node.id].get(port["name"]):
                errors.append(graph_error(_shown(node), f"connect {port['label']}: {_missing_input(node, port)}",
                                          port=port["name"]))
    order = _dependency_order(graph, inputs, errors)
    if errors:
        raise GraphError(errors)
    errors += _unused_nodes(graph, inputs)
    goal = next(n for n in graph.nodes.values() if n.type == "training_goal")
    context = goal.params["context_length"]
    values: dict[str, Value] = {}
    for node_id in order:
        node = graph.nodes[node_id]
        value, problem = infer_value(node, {p: [values[s] for s in sources] for p, sources in inputs[node_id].items()},
                                     vocab_size, context, graph)
        if problem:
            errors.append(graph_error(_shown(node), problem[1], problem[0], problem[2]))
            break  # later shapes would only repeat this one
        values[node_id] = value
    if errors:
        raise GraphError(errors)
    training = {key: goal.params[key] for key in TRAINING_SETTINGS}
    plan = Plan(graph, order, inputs, values, vocab_size, context, training, labels=list(labels or []))
    plan.standard = standard_config(plan)
    halting = [_shown(n) for n in graph.nodes.values() if n.type == "transformer_block" and n.params["halting"]]
    if plan.standard is None and halting:
        raise GraphError([graph_error(node_id, "adaptive depth runs in the standard chain only (the whole model "
                                               "decides when a token stops); switch halting off here", "halting")
                          for node_id in halting])
    return plan


def _shown(node: Node) -> str:
    return node.shown_as or node.id


def _missing_input(node: Node, port: dict[str, Any]) -> str:
    if node.type == "decoder_layer" and port["name"] == "memory":
        return "a decoder cross-attends to an encoder's output; join an encoder layer (or any hidden states) to it"
    if node.type == "training_goal":
        return "the training goal minimises losses; join a Next-token loss to it"
    return f"it needs {KIND_WORDS[port['kind']]} from an earlier node"


def _check_counts(graph: Graph) -> list[dict[str, Any]]:
    errors = []
    for kind in ONE_PER_GRAPH:
        found = [n.id for n in graph.nodes.values() if n.type == kind]
        if not found:
            errors.append(graph_error(None, f"the graph has no {NODE_TYPES[kind]['label']} node; add one"))
        for extra in found[1:]:
            errors.append(graph_error(extra, f"a second {NODE_TYPES[kind]['label']} node; a graph has one"))
    if not any(n.type == "next_token_loss" for n in graph.nodes.values()):
        errors.append(graph_error(None, "the graph has no loss, so nothing would train: add a Next-token loss "
                                        "after an Output head and join it to the Training goal"))
    return errors


def _dependency_order(graph: Graph, inputs: dict[str, dict[str, list[str]]],
                      errors: list[dict[str, Any]]) -> list[str]:
    """The nodes with every node after the nodes it reads (Kahn's algorithm); a cycle is an error."""
    waiting = {node_id: sum(len(s) for s in ports.values()) for node_id, ports in inputs.items()}
    readers: dict[str, list[str]] = {node_id: [] for node_id in graph.nodes}
    for edge in graph.edges:
        readers[edge.source].append(edge.target)
    ready = [node_id for node_id in graph.nodes if waiting[node_id] == 0]
    order = []
    while ready:
        node_id = ready.pop(0)
        order.append(node_id)
        for reader in readers[node_id]:
            waiting[reader] -= 1
            if waiting[reader] == 0:
                ready.append(reader)
    if len(order) < len(graph.nodes):
        stuck = {n for n in graph.nodes if n not in order}
        while True:  # what only reads from a cycle is not part of it: peel such nodes off the end
            ends = {n for n in stuck if not any(reader in stuck for reader in readers[n])}
            if not ends:
                break
            stuck -= ends
        stuck = sorted({_shown(graph.nodes[n]) for n in stuck})
        errors.append(graph_error(stuck[0], f"the edges between {', '.join(map(repr, stuck))} make a cycle: a value "
                                            "cannot depend on itself; remove the edge that goes back"))
    return order


def _unused_nodes(graph: Graph, inputs: dict[str, dict[str, list[str]]]) -> list[dict[str, Any]]:
    """Nodes whose output no loss reads: their weights would never train."""
    goal = next(n.id for n in graph.nodes.values() if n.type == "training_goal")
    reached, stack = {goal}, [goal]
    while stack:
        for sources in inputs[stack.pop()].values():
            for source in sources:
                if source not in reached:
                    reached.add(source)
                    stack.append(source)
    shown = sorted({_shown(n) for n in graph.nodes.values() if n.id not in reached})
    return [graph_error(node_id, "no loss reads this node's output, so it would never train; connect it on the "
                                 "way to a loss, or delete it") for node_id in shown]


def infer_value(node: Node, given: dict[str, list[Value]], vocab_size: int, context_length: int,
                graph: Graph) -> tuple[Value | None, tuple[str | None, str, str | None] | None]:
    """The node's output value from its inputs', or (field, message, port) saying what is wrong."""
    p, x = node.params, (given.get("in") or [None])[0]
    kind = node.type
    if kind == "data":
        return Value("text"), None
    if kind == "tokenizer":
        return Value("ids", vocab_size), None
    if kind == "token_embedding":
        return Value("hidden", p["emb_dim"]), None
    if kind in ("transformer_block", "attention", "encoder_layer", "decoder_layer"):
        return _attention_value(node, given, context_length)
    if kind == "positional_encoding":
        if p["kind"] == "rope":
            return replace(x, rope=p["rope_base"]), None
        return x, None
    if kind in ("norm", "dropout", "feed_forward"):  # each token's vector in, one as wide out
        return x, None
    if kind == "linear":
        return replace(x, width=p["out_features"]), None
    if kind == "conv1d":
        if not p["causal"] and p["kernel_size"] % 2 == 0:
            return None, ("kernel_size", "a non-causal convolution needs an odd kernel to keep the length "
                                         f"(it pads kernel // 2 on each side), got {p['kernel_size']}", None)
        return replace(x, width=p["out_channels"], sees_future=x.sees_future or not p["causal"]), None
    if kind == "add":
        a, b = given["a"][0], given["b"][0]
        if a.width != b.width:
            return None, (None, f"a has width {a.width} and b width {b.width}; both inputs of an Add must have the "
                                "same width (put a Linear on one)", "b")
        return Value("hidden", a.width, a.sees_future or b.sees_future, a.rope or b.rope), None
    if kind == "output_head":
        if p["tie_weights"]:
            embeddings = [n for n in graph.nodes.values() if n.type == "token_embedding"]
            if len(embeddings) != 1 or embeddings[0].params["emb_dim"] != x.width:
                return None, ("tie_weights", f"a tied head reuses the token embedding, so it needs one Token "
                                             f"embedding of the head's input width {x.width}", None)
        return Value("logits", vocab_size, x.sees_future), None
    if kind == "next_token_loss":
        logits = given["logits"][0]
        if logits.sees_future:
            return None, (None, "these scores were computed by a layer that sees the whole window (an encoder, a "
                                "non-causal attention or convolution), so position t has read the token it must "
                                "predict and the loss would fall to zero without learning anything; make those "
                                "layers causal", "logits")
        return Value("loss"), None
    if kind == "classification_loss":  # one label per text: reading the whole window is allowed
        return Value("loss"), None
    if kind == "training_goal":
        return Value("loss"), None
    raise AssertionError(f"no rule for {kind}")  # every type of NODE_TYPES has one above


def _attention_value(node: Node, given: dict[str, list[Value]], context_length: int
                     ) -> tuple[Value | None, tuple[str | None, str, str | None] | None]:
    """Attention-bearing nodes: the heads must divide the width; a decoder's memory must match it."""
    p, x = node.params, given["in"][0]
    if x.width % p["n_heads"]:
        divisors = [d for d in range(1, min(x.width, 128) + 1) if x.width % d == 0]
        return None, ("n_heads", f"{p['n_heads']} heads do not divide the width {x.width}: pick one of {divisors}",
                      None)
    if x.rope is not None and (x.width // p["n_heads"]) % 2:
        return None, ("n_heads", f"RoPE rotates pairs of dimensions, so each head needs an even width; "
                                 f"{x.width} / {p['n_heads']} = {x.width // p['n_heads']}", None)
    sees_future = x.sees_future
    if node.type == "transformer_block":
        try:
            block_config(p, x.width, context_length, 2, x.rope)
        except ConfigError as err:
            return None, (_field_named(str(err), p), str(err), None)
    if node.type == "attention" and not p["causal"] or node.type == "encoder_layer" and not p["causal"]:
        sees_future = True
    if node.type == "decoder_layer":
        memory = given["memory"][0]
        if memory.width != x.width:
            return None, (None, f"the memory has width {memory.width} but the decoder's input {x.width}; they must "
                                "match (put a Linear on one)", "memory")
        sees_future = sees_future or memory.sees_future
    return replace(x, sees_future=sees_future), None


def _field_named(message: str, params: dict[str, Any]) -> str | None:
    found = [(m.start(), name) for name in params if (m := re.search(rf"\b{name}\b", message))]
    return min(found)[1] if found else None


def block_config(p: dict[str, Any], width: int, context_length: int, vocab_size: int,
                 rope: float | None) -> GPTConfig:
    """The GPTConfig a GPT block node's settings mean at this width (its vocabulary unused)."""
    overrides = dict(n_kv_heads=p["n_kv_heads"], ffn_hidden=p["ffn_hidden"], attn_rank=p["attn_rank"],
                     attn_tau=p["attn_tau"], halting=p["halting"])
    if p["ffn"] == "moe":
        overrides.update(n_experts=p["n_experts"], moe_top_k=p["moe_top_k"], moe_shared_expert=p["moe_shared_expert"])
    if p["halting"]:
        overrides["ponder_coef"] = p["ponder_coef"]
    return GPTConfig(vocab_size=vocab_size, context_length=context_length, emb_dim=width, n_heads=p["n_heads"],
                     n_layers=p["n_layers"], drop_rate=p["drop_rate"], qkv_bias=p["qkv_bias"], bias=p["bias"],
                     norm=p["norm"], ffn=p["ffn"], activation=p["activation"], pos_emb="rope" if rope is not None else "learned",
                     rope_base=rope if rope is not None else 10000.0, **overrides)


def standard_config(plan: Plan) -> GPTConfig | None:
    """The GPTConfig of a graph that is exactly the standard chain (one node of each type, each
    joined to the next), whose final norm is the blocks' kind; else None."""
    nodes = plan.graph.nodes
    links = sorted((nodes[e.source].type, nodes[e.target].type) for e in plan.graph.edges)
    if sorted(n.type for n in nodes.values()) != sorted(STANDARD_CHAIN) or \
            links != sorted(zip(STANDARD_CHAIN, STANDARD_CHAIN[1:])):
        return None
    by_type = {n.type: n for n in nodes.values()}
    block, norm, positions = (by_type[k].params for k in ("transformer_block", "norm", "positional_encoding"))
    if norm["kind"] != block["norm"] or (norm["kind"] == "layernorm" and norm["bias"] != block["bias"]):
        return None
    width = by_type["token_embedding"].params["emb_dim"]
    rope = positions["rope_base"] if positions["kind"] == "rope" else None
    config = block_config(block, width, plan.context_length, plan.vocab_size, rope)
    return replace(config, pos_emb=positions["kind"], tie_weights=by_type["output_head"].params["tie_weights"])


# ---------------------------------------------------------------------------------------
# The layers only a graph has: attention that may look ahead or across, whole layers
# ---------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head attention of queries from `x` over keys and values from `source` (x itself for
    self-attention, an encoder's output for cross-attention); causal or not."""

    def __init__(self, width: int, num_heads: int, causal: bool, qkv_bias: bool = False, dropout: float = 0.0,
                 rope: RotaryEmbedding | None = None) -> None:
        super().__init__()
        self.num_heads, self.causal, self.dropout, self.rope = num_heads, causal, dropout, rope
        self.query = nn.Linear(width, width, bias=qkv_bias)
        self.key_value = nn.Linear(width, 2 * width, bias=qkv_bias)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        source = x if source is None else source
        batch, num_tokens, width = x.shape
        queries = self.query(x).view(batch, num_tokens, self.num_heads, -1).transpose(1, 2)  # (B, H, T, D)
        keys, values = (part.view(batch, source.shape[1], self.num_heads, -1).transpose(1, 2)
                        for part in self.key_value(source).chunk(2, dim=-1))               # each (B, H, S, D)
        if self.rope is not None:
            queries, keys = self.rope(queries), self.rope(keys)
        context = F.scaled_dot_product_attention(queries, keys, values, is_causal=self.causal,
                                                 dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(context.transpose(1, 2).reshape(batch, num_tokens, width))  # (B, T, C)


def _norm(kind: str, width: int, bias: bool = True) -> nn.Module:
    return RMSNorm(width) if kind == "rmsnorm" else LayerNorm(width, bias=bias)


def _feed_forward(width: int, kind: str, hidden: int | None, bias: bool) -> nn.Module:
    return make_ffn(GPTConfig(vocab_size=2, emb_dim=width, n_heads=1, n_layers=1, ffn=kind, ffn_hidden=hidden,
                              bias=bias))


class EncoderLayer(nn.Module):
    """A transformer encoder layer, pre-norm: x + attention(norm(x)), then x + MLP(norm(x)); every
    position sees the whole window unless `causal`."""

    def __init__(self, width: int, p: dict[str, Any], rope: RotaryEmbedding | None) -> None:
        super().__init__()
        self.norm1, self.norm2 = _norm(p["norm"], width), _norm(p["norm"], width)
        self.att = Attention(width, p["n_heads"], p.get("causal", False), dropout=p["drop_rate"], rope=rope)
        self.ff = _feed_forward(width, "gelu", p["ffn_hidden"], True)
        self.drop = nn.Dropout(p["drop_rate"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.att(self.norm1(x)))  # (B, T, C)
        return x + self.drop(self.ff(self.norm2(x)))


class DecoderLayer(nn.Module):
    """A transformer decoder layer, pre-norm: causal self-attention, cross-attention from each
    position to every position of `memory`, then the MLP; each added to the residual stream."""

    def __init__(self, width: int, p: dict[str, Any], rope: RotaryEmbedding | None) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (_norm(p["norm"], width) for _ in range(3))
        self.att = Attention(width, p["n_heads"], causal=True, dropout=p["drop_rate"], rope=rope)
        self.cross = Attention(width, p["n_heads"], causal=False, dropout=p["drop_rate"])
        self.ff = _feed_forward(width, "gelu", p["ffn_hidden"], True)
        self.drop = nn.Dropout(p["drop_rate"])

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.att(self.norm1(x)))              # (B, T, C)
        x = x + self.drop(self.cross(self.norm2(x), memory))    # queries from x, keys and values from memory
        return x + self.drop(self.ff(self.norm3(x)))


class BlockStack(nn.Module):
    """A GPT block node: n_layers `TransformerBlock`s in a row (the blocks `GPTModel` stacks)."""

    def __init__(self, cfg: GPTConfig, rope: RotaryEmbedding | None) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[TransformerBlock(cfg, rope) for _ in range(cfg.n_layers)])
        self.moe = cfg.ffn == "moe"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def aux_loss(self) -> torch.Tensor | None:
        """The experts' load-balancing terms of the last forward pass (chapter 10), or None."""
        return sum(block.ff.aux_loss for block in self.blocks) if self.moe else None


class Conv1d(nn.Module):
    """A 1-D convolution along the sequence, (B, T, C) -> (B, T, out); causal: padded on the left
    only, so position t mixes positions t - k + 1 .. t."""

    def __init__(self, width: int, out_channels: int, kernel_size: int, causal: bool) -> None:
        super().__init__()
        self.padding = (kernel_size - 1, 0) if causal else (kernel_size // 2, kernel_size // 2)
        self.conv = nn.Conv1d(width, out_channels, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x.transpose(1, 2), self.padding)       # (B, C, T + k - 1)
        return self.conv(x).transpose(1, 2)              # (B, T, out)


class Linear(nn.Module):
    def __init__(self, width: int, out_features: int, activation: str, bias: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(width, out_features, bias=bias)
        self.activation = {"none": nn.Identity(), "gelu": nn.GELU(), "relu": nn.ReLU()}[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.proj(x))


class Positions(nn.Module):
    """Positions added to the token vectors: a learned table or fixed sine waves (RoPE adds none here)."""

    def __init__(self, kind: str, context_length: int, width: int) -> None:
        super().__init__()
        self.kind = kind
        self.table = nn.Embedding(context_length, width) if kind == "learned" else None
        if kind == "sinusoidal":
            self.register_buffer("sinusoid", sinusoidal_positions(context_length, width), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[1]
        if self.table is not None:
            return x + self.table(torch.arange(num_tokens, device=x.device))  # + (T, C)
        if self.kind == "sinusoidal":
            return x + self.sinusoid[:num_tokens].to(x.dtype)
        return x


# ---------------------------------------------------------------------------------------
# The compiled model
# ---------------------------------------------------------------------------------------

def module_name(node_id: str) -> str:
    """A node id as a state-dict key (no dots: PyTorch reads them as nesting)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", node_id)


class GraphModel(LanguageModel):
    """Any checked graph as one module: its nodes run in dependency order, token ids (B, T) in,
    the first next-token loss's logits (B, T, V) out; `details=True` adds the other losses'
    logits with their weights, and the experts' balancing terms."""

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        self.plan = plan
        self.cfg = envelope_config(plan)
        self.layers = nn.ModuleDict()
        for node_id in plan.order:
            module = self._build(plan.graph.nodes[node_id])
            if module is not None:
                self.layers[module_name(node_id)] = module
        # The loss of the largest weight (the first in the file among equals) is the model's: its
        # logits are what generation and the validation loss read; the others train alongside.
        losses = [n for n in plan.graph.nodes.values() if n.type == "next_token_loss"]
        losses.sort(key=lambda n: -n.params["weight"])
        self.heads = [(plan.inputs[n.id]["logits"][0], n.params["weight"]) for n in losses]
        tied = [n for n in plan.order if plan.graph.nodes[n].type == "output_head"
                and plan.graph.nodes[n].params["tie_weights"]]
        for head in tied:  # a tied head shares the (one) token embedding's matrix
            embedding = next(n for n in plan.order if plan.graph.nodes[n].type == "token_embedding")
            self.layers[module_name(head)].weight = self.layers[module_name(embedding)].weight
        self.apply(GPTModel._init_weights)  # GPT-2's initialisation, as GPTModel's (chapter 4)
        if tied:  # token vectors now start at N(0, 0.02): so must positions
            for positions in self.layers.values():
                if isinstance(positions, Positions) and positions.table is not None:
                    nn.init.normal_(positions.table.weight, mean=0.0, std=0.02)
        # The layers that write into a residual stream start smaller by 1 / sqrt(2 x residual layers).
        depth = sum(len(m.blocks) if isinstance(m, BlockStack) else 1 for m in self.layers.values()
                    if isinstance(m, (BlockStack, EncoderLayer, DecoderLayer)))
        for name, param in self.named_parameters():
            if name.endswith(("att.out_proj.weight", "ff.layers.2.weight", "down.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * max(depth, 1)))

    @property
    def out_head(self) -> nn.Linear:
        """The output head of the model's own loss (the one generation reads)."""
        return self.layers[module_name(self.heads[0][0])]

    def _build(self, node: Node) -> nn.Module | None:
        plan, p = self.plan, node.params
        x = self.plan.values[self.plan.inputs[node.id]["in"][0]] if "in" in self.plan.inputs[node.id] else None
        width = x.width if x is not None else 0
        rope = None
        if x is not None and x.rope is not None and node.type in ("transformer_block", "attention", "encoder_layer",
                                                                   "decoder_layer"):
            rope = RotaryEmbedding(width // p["n_heads"], plan.context_length, x.rope)
        if node.type == "token_embedding":
            return nn.Embedding(plan.vocab_size, p["emb_dim"])
        if node.type == "positional_encoding":
            return Positions(p["kind"], plan.context_length, width)
        if node.type == "transformer_block":
            return BlockStack(block_config(p, width, plan.context_length, plan.vocab_size, x.rope), rope)
        if node.type == "attention":
            if p["causal"]:
                return MultiHeadAttention(width, width, p["n_heads"], p["drop_rate"], p["qkv_bias"], rope=rope)
            return Attention(width, p["n_heads"], False, p["qkv_bias"], p["drop_rate"], rope)
        if node.type == "feed_forward":
            return _feed_forward(width, p["ffn"], p["ffn_hidden"], p["bias"])
        if node.type == "encoder_layer":
            return EncoderLayer(width, p, rope)
        if node.type == "decoder_layer":
            return DecoderLayer(width, p, rope)
        if node.type == "norm":
            return _norm(p["kind"], width, p["bias"])
        if node.type == "dropout":
            return nn.Dropout(p["rate"])
        if node.type == "linear":
            return Linear(width, p["out_features"], p["activation"], p["bias"])
        if node.type == "conv1d":
            return Conv1d(width, p["out_channels"], p["kernel_size"], p["causal"])
        if node.type == "output_head":
            return nn.Linear(width, plan.vocab_size, bias=False)
        if node.type == "classification_loss":  # its head: the classes' scores from the last position
            return nn.Linear(width, len(plan.labels))
        return None  # data, tokenizer, add, losses, the training goal: no weights

    def forward(self, in_idx: torch.Tensor, cache: None = None, details: bool = False,
                last_only: bool = False) -> torch.Tensor | ModelOutput:
        if in_idx.shape[1] > self.cfg.context_length:
            raise ValueError(f"the input has {in_idx.shape[1]} tokens but the graph's context_length is "
                             f"{self.cfg.context_length}; crop the input to its last {self.cfg.context_length} tokens.")
        outputs: dict[str, torch.Tensor] = {}
        for node_id in self.plan.order:
            node, read = self.plan.graph.nodes[node_id], self.plan.inputs[node_id]
            if node.type in ("data", "next_token_loss", "training_goal"):
                continue
            if node.type == "classification_loss":  # texts are padded on the left: the last position is real
                outputs[node_id] = self.layers[module_name(node_id)](outputs[read["in"][0]][:, -1])  # (B, K)
                continue
            if node.type == "tokenizer":
                outputs[node_id] = in_idx                                        # (B, T)
            elif node.type == "add":
                outputs[node_id] = outputs[read["a"][0]] + outputs[read["b"][0]]
            elif node.type == "decoder_layer":
                outputs[node_id] = self.layers[module_name(node_id)](outputs[read["in"][0]],
                                                                      outputs[read["memory"][0]])
            else:
                x = outputs[read["in"][0]]
                if node.type == "output_head" and last_only:
                    x = x[:, -1:]                                                # (B, 1, C)
                outputs[node_id] = self.layers[module_name(node_id)](x)
        logits = outputs[self.heads[0][0]]                                       # (B, T, V)
        if not details:
            return logits
        aux = [loss for m in self.layers.values() if isinstance(m, BlockStack) and (loss := m.aux_loss()) is not None]
        classes = [(n.params["weight"], outputs[n.id]) for n in self.plan.graph.nodes.values()
                   if n.type == "classification_loss"]
        return ModelOutput(logits, sum(aux) if aux else None, weight=self.heads[0][1],
                           heads=[(weight, outputs[head]) for head, weight in self.heads[1:]], classes=classes)

    def describe(self) -> str:
        """One line for a run's header: what the graph holds."""
        counts: dict[str, int] = {}
        for node in self.plan.graph.nodes.values():
            if node.type not in ("data", "tokenizer", "training_goal"):
                label = NODE_TYPES[node.type]["label"]
                counts[label] = counts.get(label, 0) + (node.params["n_layers"] if node.type == "transformer_block"
                                                        else 1)
        parts = ", ".join(f"{count} x {label}" for label, count in counts.items())
        return (f"a graph of {len(self.plan.graph.nodes)} nodes ({parts}); context {self.cfg.context_length}, "
                f"vocab {self.cfg.vocab_size:,}")

    def new_kv_cache(self, batch_size: int, max_tokens: int | None = None) -> None:
        """A graph keeps no KV cache: generation runs the whole window again for each new token."""
        return None

    def num_parameters(self, exclude_output_head: bool = False) -> int:
        return sum(p.numel() for p in self.parameters())

    def parameter_memory_bytes(self, dtype: torch.dtype = torch.float32) -> int:
        return self.num_parameters() * torch.empty((), dtype=dtype).element_size()

    def flops_per_token(self, seq_len: int) -> float:
        """6 FLOPs per matrix weight a token meets (forward and backward) plus attention's scores and
        weighted sums, 12 x width x seq_len per attention layer (the same estimate as GPTModel's)."""
        lookups = {id(m.weight) for m in self.modules() if isinstance(m, (nn.Embedding,))}
        lookups -= {id(self.out_head.weight)}
        weights = sum(p.numel() for p in self.parameters() if p.dim() >= 2 and id(p) not in lookups)
        attention = sum(m.out_proj.in_features for m in self.modules()
                        if isinstance(m, (Attention, MultiHeadAttention)))
        return 6 * weights + 12 * attention * seq_len


def envelope_config(plan: Plan) -> GPTConfig:
    """A GPTConfig that stands for a graph where code reads one: the vocabulary and context, the
    widest hidden state, and one "layer" per attention-bearing layer (the activation estimate's
    unit; an estimate for wirings that are not a stack of blocks)."""
    widths = [v.width for v in plan.values.values() if v.kind == "hidden"]
    layers = 0
    for node in plan.graph.nodes.values():
        layers += node.params["n_layers"] if node.type == "transformer_block" else \
            1 if node.type in ("attention", "encoder_layer", "decoder_layer", "feed_forward", "conv1d") else 0
    width = max(widths)
    heads = max((d for d in range(1, 65) if width % d == 0 and (width // d) % 2 == 0), default=1)
    return GPTConfig(vocab_size=plan.vocab_size, context_length=plan.context_length, emb_dim=width, n_heads=heads,
                     n_layers=max(layers, 1), drop_rate=0.0)


def compile_graph(plan: Plan) -> LanguageModel:
    """The model a checked graph means: exactly `GPTModel` for the standard chain, else a `GraphModel`."""
    return GPTModel(plan.standard) if plan.standard is not None else GraphModel(plan)


def build_graph_model(graph: dict[str, Any], vocab_size: int) -> LanguageModel:
    """Read, check and compile a graph (JSON) for a tokenizer of `vocab_size` tokens (and, for a
    sequence-classification loss, the classes a run saved with it as "labels")."""
    return compile_graph(check_graph(read_graph(graph), vocab_size, graph.get("labels")))


def needs_labels(graph: Graph) -> bool:
    """Whether the graph has a sequence-classification loss, which reads labelled records."""
    return any(node.type == "classification_loss" for node in graph.nodes.values())


# ---------------------------------------------------------------------------------------
# Graphs of presets
# ---------------------------------------------------------------------------------------

def file_stem(name: str) -> str:
    """A graph's name as a file or run name: letters (any script), digits, '.', '_' and '-'."""
    return re.sub(r"[^\w.-]+", "-", name).strip("-.")[:40] or "model"


def standard_graph(name: str, cfg: GPTConfig, tokenizer: str, training: dict[str, Any],
                   source: str = "the-verdict", vocab_size: int = 512) -> dict[str, Any]:
    """The standard chain for a model config, one node per stage, laid out top to bottom."""
    params = {
        "data": {"source": source},
        "tokenizer": {"kind": tokenizer, "vocab_size": vocab_size},
        "token_embedding": {"emb_dim": cfg.emb_dim},
        "positional_encoding": {"kind": cfg.pos_emb, "rope_base": cfg.rope_base},
        "transformer_block": {"n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
                              "norm": cfg.norm, "ffn": cfg.ffn, "ffn_hidden": cfg.ffn_hidden,
                              "n_experts": cfg.n_experts, "moe_top_k": cfg.moe_top_k,
                              "moe_shared_expert": cfg.moe_shared_expert, "attn_rank": cfg.attn_rank,
                              "attn_tau": cfg.attn_tau, "halting": cfg.halting, "ponder_coef": cfg.ponder_coef,
                              "drop_rate": cfg.drop_rate, "qkv_bias": cfg.qkv_bias, "bias": cfg.bias,
                              "activation": cfg.activation},
        "norm": {"kind": cfg.norm, "bias": cfg.bias},
        "output_head": {"tie_weights": cfg.tie_weights},
        "next_token_loss": {"weight": 1.0},
        "training_goal": {"context_length": cfg.context_length, "lr_schedule": "constant", "warmup_steps": 0,
                          "grad_clip": None, **training},
    }
    nodes = [{"id": kind, "type": kind, "x": 40 + 230 * (i % 2), "y": 20 + 80 * i, "params": params[kind]}
             for i, kind in enumerate(STANDARD_CHAIN)]
    edges = [{"from": a, "to": b} for a, b in zip(STANDARD_CHAIN, STANDARD_CHAIN[1:])]
    return {"version": GRAPH_VERSION, "name": name, "nodes": nodes, "edges": edges, "templates": []}
