"""minigpt studio: build a GPT from blocks in a web page, train it with a live loss curve, chat with it.

A local web server (Flask) over the same package: the page sends a *graph* of nodes

    data -> tokenizer -> token embedding -> positional encoding -> transformer block x N
         -> final norm -> output head -> training goal

and every number it shows comes back from here, computed with `GPTConfig`, `GPTModel` and
`minigpt.memory`; training is `minigpt.task_pretrain.pretrain`, the code `python main.py` runs, in a
background thread whose log lines stream to the page as server-sent events; chat is
`minigpt.generation.stream_text`. The page itself (`minigpt/studio/`) is plain HTML, CSS and
JavaScript. The graph format and the HTTP API are described in the handbook's appendix.

The server reads and writes only inside its runs directory and its uploads directory, and
answers every bad request with JSON that says what to change.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from minigpt.config import (FFNS, LR_SCHEDULES, MODEL_PRESETS, NORMS, POSITION_EMBEDDINGS, PRETRAINED_NAMES,
                            ConfigError, GPTConfig, model_config)
from minigpt.data import NAMED_CORPORA, corpus_path, read_text
from minigpt.generation import stream_text
from minigpt.hub import load_pretrained
from minigpt.memory import MIB, estimate_training_memory
from minigpt.model import GPTModel
from minigpt.tokenizer import CharTokenizer
from minigpt.runs import CHECKPOINT_NAME, StopRequest, load_model, resume_settings
from minigpt.settings import resolve_resume_config, resolve_run_config
from minigpt.task_pretrain import pretrain

STATIC = Path(__file__).with_name("studio")   # index.html, studio.css, studio.js
MAX_UPLOAD_BYTES = 10 * 2**20
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # run ids and uploaded file names

# ---------------------------------------------------------------------------------------
# The graph: node types, their parameters, and the one order they chain in
# ---------------------------------------------------------------------------------------

ORDER = ("data", "tokenizer", "token_embedding", "positional_encoding", "transformer_block", "final_norm",
         "output_head", "training_goal")


def _param(name: str, kind: str, default: Any, label: str = "", **more: Any) -> dict[str, Any]:
    return {"name": name, "kind": kind, "default": default, "label": label or name.replace("_", " "), **more}


SCHEMA: dict[str, dict[str, Any]] = {
    "data": {"label": "Data", "help": "the text to train on: a corpus minigpt downloads, or a file you upload",
             "params": [_param("source", "choice", "the-verdict", "text", choices=list(NAMED_CORPORA))]},
    "tokenizer": {"label": "Tokenizer", "help": "text to token ids (chapter 2)",
                  "params": [_param("kind", "choice", "gpt2", "tokenizer", choices=["gpt2", "bpe", "char"]),
                             _param("vocab_size", "int", 512, "BPE vocabulary", min=257, max=65536,
                                    when={"kind": "bpe"})]},
    "token_embedding": {"label": "Token embedding", "help": "one learned vector per token id (chapter 2)",
                        "params": [_param("emb_dim", "int", 128, "width (emb_dim)", min=8, max=4096)]},
    "positional_encoding": {"label": "Positional encoding", "help": "how a token knows where it is (chapters 4, 10)",
                            "params": [_param("kind", "choice", "learned", "positions",
                                              choices=list(POSITION_EMBEDDINGS)),
                                       _param("rope_base", "float", 10000.0, "RoPE base", min=2.0,
                                              when={"kind": "rope"})]},
    "transformer_block": {
        "label": "Transformer block", "help": "attention + feed-forward, repeated N times (chapters 3, 4, 10)",
        "params": [_param("n_layers", "int", 4, "blocks (repeat x N)", min=1, max=96),
                   _param("n_heads", "int", 4, "attention heads", min=1, max=128),
                   _param("n_kv_heads", "int", None, "key/value heads (empty: one per head)", min=1, max=128,
                          optional=True),
                   _param("norm", "choice", "layernorm", "norm", choices=list(NORMS)),
                   _param("ffn", "choice", "gelu", "feed-forward", choices=list(FFNS)),
                   _param("ffn_hidden", "int", None, "hidden width (empty: the default)", min=1, optional=True),
                   _param("n_experts", "int", 4, "experts", min=2, max=64, when={"ffn": "moe"}),
                   _param("moe_top_k", "int", 2, "experts per token", min=1, max=64, when={"ffn": "moe"}),
                   _param("moe_shared_expert", "bool", False, "a shared expert every token uses", when={"ffn": "moe"}),
                   _param("attn_rank", "int", None, "query/key rank per head (empty: the head size)", min=1,
                          optional=True),
                   _param("attn_tau", "bool", False, "tau-gated attention (chapter 11)"),
                   _param("halting", "bool", False, "adaptive depth: tokens may stop early (chapter 11)"),
                   _param("ponder_coef", "float", 0.01, "ponder cost weight", min=0.0, when={"halting": True}),
                   _param("drop_rate", "float", 0.0, "dropout", min=0.0, max=0.9),
                   _param("qkv_bias", "bool", False, "bias in q, k, v"),
                   _param("bias", "bool", True, "other biases")]},
    "final_norm": {"label": "Final norm", "help": "normalises the last block's output (its kind follows the blocks)",
                   "params": []},
    "output_head": {"label": "Output head", "help": "a score for every token of the vocabulary",
                    "params": [_param("tie_weights", "bool", False, "tied to the token embedding")]},
    "training_goal": {
        "label": "Training goal", "help": "next-token cross-entropy, minimised with AdamW (chapter 5)",
        "params": [_param("context_length", "int", 128, "context (tokens per window)", min=2, max=8192),
                   _param("batch_size", "int", 8, "batch size", min=1, max=4096),
                   _param("learning_rate", "float", 4e-4, "learning rate", min=0.0, max=1.0),
                   _param("num_epochs", "int", 1, "epochs", min=1, max=10000),
                   _param("max_steps", "int", None, "stop after steps (empty: all epochs)", min=1, optional=True),
                   _param("eval_freq", "int", 5, "evaluate every (steps)", min=1),
                   _param("lr_schedule", "choice", "constant", "schedule", choices=list(LR_SCHEDULES)),
                   _param("warmup_steps", "int", 0, "warm-up steps", min=0),
                   _param("grad_clip", "float", None, "gradient clip (empty: off)", min=0.0, optional=True)]},
}

# Which node a setting belongs to, for errors that the package raises about a field.
FIELD_NODES = {param["name"]: kind for kind, spec in SCHEMA.items() for param in spec["params"]}
FIELD_NODES.update(source="data", emb_dim="token_embedding", pos_emb="positional_encoding", vocab_size="tokenizer",
                   max_length="training_goal", stride="training_goal", tokenizer="tokenizer",
                   activation="transformer_block", moe_shared_expert="transformer_block")


class GraphError(ValueError):
    """A graph the studio cannot build, with one entry per problem: (node id, field, message)."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(e["message"] for e in errors))
        self.errors = errors


def _error(node: str | None, message: str, field_name: str | None = None) -> dict[str, Any]:
    return {"node": node, "field": field_name, "message": message}


def _check_value(spec: dict[str, Any], value: Any) -> tuple[Any, str | None]:
    """`value` converted to the parameter's kind, or an error message."""
    name, kind = spec["name"], spec["kind"]
    if value is None or value == "":
        return (None, None) if spec.get("optional") else (None, f"{spec['label']} is required")
    if kind == "bool":
        return (value, None) if isinstance(value, bool) else (None, f"{spec['label']} must be true or false")
    if kind == "choice":
        choices = spec["choices"]
        if name == "source" and isinstance(value, str) and value.startswith("upload:"):
            return value, None  # checked against the uploads folder later
        return (value, None) if value in choices else (None, f"{spec['label']} must be one of {', '.join(choices)}")
    if kind == "text":
        return (value, None) if isinstance(value, str) else (None, f"{spec['label']} must be text")
    try:
        number = int(value) if kind == "int" else float(value)
        if isinstance(value, bool) or (kind == "int" and float(value) != number):
            raise ValueError
    except (TypeError, ValueError):
        return None, f"{spec['label']} must be {'a whole number' if kind == 'int' else 'a number'}, got {value!r}"
    if "min" in spec and number < spec["min"] or "max" in spec and number > spec["max"]:
        bound = f"between {spec.get('min')} and {spec.get('max')}" if "max" in spec else f"at least {spec['min']}"
        return None, f"{spec['label']} must be {bound}, got {number}"
    return number, None


def read_graph(graph: Any) -> dict[str, dict[str, Any]]:
    """The graph's parameters by node type ({"data": {...}, "tokenizer": {...}, ...}, defaults filled
    in), after checking that it is one chain in ORDER; raises GraphError naming each bad node."""
    if not isinstance(graph, dict):
        raise GraphError([_error(None, "the body must be a graph: a JSON object with \"nodes\" and \"edges\"")])
    nodes, edges = graph.get("nodes"), graph.get("edges", [])
    if not isinstance(nodes, list) or not isinstance(edges, list):
        raise GraphError([_error(None, "a graph needs a list of \"nodes\" and a list of \"edges\"")])
    errors: list[dict[str, Any]] = []
    by_id: dict[str, dict[str, Any]] = {}
    for node in nodes:
        if not isinstance(node, dict) or not isinstance(node.get("id"), str) or not node["id"]:
            errors.append(_error(None, "every node needs an \"id\" (text) and a \"type\""))
            continue
        if node["id"] in by_id:
            errors.append(_error(node["id"], f"two nodes have the id {node['id']!r}; ids must be unique"))
        elif node.get("type") not in SCHEMA:
            errors.append(_error(node["id"], f"unknown node type {node.get('type')!r}; the types are "
                                             f"{', '.join(ORDER)}"))
        by_id[node["id"]] = node
    if errors:
        raise GraphError(errors)
    by_type: dict[str, list[str]] = {kind: [] for kind in ORDER}
    for node_id, node in by_id.items():
        by_type[node["type"]].append(node_id)
    for kind in ORDER:
        if not by_type[kind]:
            errors.append(_error(None, f"the graph has no {SCHEMA[kind]['label']} node; add one"))
        for extra in by_type[kind][1:]:
            errors.append(_error(extra, f"a second {SCHEMA[kind]['label']} node; the graph is one chain, "
                                        "so keep one"))
    following: dict[str, str] = {}
    for edge in edges:
        source, target = (edge.get("from"), edge.get("to")) if isinstance(edge, dict) else (None, None)
        if source not in by_id or target not in by_id:
            errors.append(_error(source if source in by_id else None,
                                 f"an edge joins {source!r} to {target!r}, and not both are nodes"))
            continue
        if source in following:
            errors.append(_error(source, f"{source!r} has two outgoing edges; the graph is one chain"))
        following[source] = target
    if errors:
        raise GraphError(errors)
    # Walk the chain from the data node: each edge must lead to the next type in ORDER.
    node_id, seen = by_type["data"][0], set()
    for kind in ORDER[1:]:
        seen.add(node_id)
        target = following.get(node_id)
        expected = SCHEMA[kind]["label"]
        if target is None:
            errors.append(_error(node_id, f"connect {node_id!r} to the {expected} node"))
            break
        if target in seen:
            errors.append(_error(target, f"the edge from {node_id!r} back to {target!r} makes a cycle"))
            break
        if by_id[target]["type"] != kind:
            errors.append(_error(target, f"{SCHEMA[by_id[target]['type']]['label']} cannot follow "
                                         f"{SCHEMA[by_id[node_id]['type']]['label']}; the next node must be {expected}"))
            break
        node_id = target
    if not errors and node_id in following:
        errors.append(_error(node_id, "nothing follows the Training goal; remove that edge"))
    values: dict[str, dict[str, Any]] = {}
    for kind in ORDER:
        node_id = by_type[kind][0]
        given = by_id[node_id].get("params") or {}
        if not isinstance(given, dict):
            errors.append(_error(node_id, "\"params\" must be an object"))
            continue
        unknown = set(given) - {p["name"] for p in SCHEMA[kind]["params"]}
        for name in sorted(unknown):
            errors.append(_error(node_id, f"{SCHEMA[kind]['label']} has no setting {name!r}", name))
        values[kind] = {"id": node_id}
        for spec in SCHEMA[kind]["params"]:
            value, problem = _check_value(spec, given.get(spec["name"], spec["default"]))
            if problem:
                errors.append(_error(node_id, problem, spec["name"]))
            values[kind][spec["name"]] = value
    if errors:
        raise GraphError(errors)
    return values


@dataclass(frozen=True)
class BuiltGraph:
    """What a valid graph means: the model, the training settings, and how main.py would get them."""

    config: GPTConfig
    settings: dict[str, Any]  # config_run.py's names: MODEL, TOKENIZER, BPE_VOCAB_SIZE, custom_params ...
    data: str                 # --data: a corpus name or a file in the uploads folder
    node_ids: dict[str, str]  # node id of each type


class Studio:
    """The server's state: where runs and uploads live, and the training runs it started."""

    def __init__(self, runs_dir: str | Path, uploads_dir: str | Path) -> None:
        self.runs_dir = Path(runs_dir).resolve()
        self.uploads_dir = Path(uploads_dir).resolve()
        self.runs: dict[str, "StudioRun"] = {}
        self.lock = threading.Lock()
        self._vocab_cache: dict[tuple[str, float], int] = {}
        self._models: dict[tuple[str, float], tuple[GPTModel, Any]] = {}

    # -- data ---------------------------------------------------------------------------

    def data_path(self, source: str, node_id: str = "data") -> str:
        """`--data` for a data node's source: a corpus name, or a file inside the uploads folder."""
        if source in NAMED_CORPORA:
            return source
        name = source.removeprefix("upload:")
        if not source.startswith("upload:") or not SAFE_NAME.match(name) or ".." in name:
            raise GraphError([_error(node_id, f"data source {source!r} is neither a corpus ({', '.join(NAMED_CORPORA)}) "
                                              "nor an uploaded file (upload:<name>, no folders)", "source")])
        path = (self.uploads_dir / name).resolve()
        if path.parent != self.uploads_dir or not path.is_file():
            raise GraphError([_error(node_id, f"no uploaded file {name!r}; upload it first", "source")])
        return str(path)

    def vocab_size(self, kind: str, vocab: int | None, data: str, node_id: str) -> int:
        """The tokenizer's vocabulary: GPT-2's, the BPE's size, or the text's distinct characters."""
        if kind == "gpt2":
            return 50257
        if kind == "bpe":
            return int(vocab)
        try:
            path = corpus_path(data)
            key = (str(path), path.stat().st_mtime)
            if key not in self._vocab_cache:
                self._vocab_cache[key] = CharTokenizer.from_text(read_text(path)).vocab_size
        except ConfigError as err:
            raise GraphError([_error(node_id, f"a character tokenizer needs the text: {err}")]) from None
        return self._vocab_cache[key]

    # -- graphs -------------------------------------------------------------------------

    def build(self, graph: Any) -> BuiltGraph:
        values = read_graph(graph)
        ids = {kind: values[kind]["id"] for kind in ORDER}
        data = self.data_path(values["data"]["source"], ids["data"])
        tok, block, goal = values["tokenizer"], values["transformer_block"], values["training_goal"]
        width = values["token_embedding"]["emb_dim"]
        if width % block["n_heads"]:  # spans two nodes: put it on the block, where the heads are chosen
            raise GraphError([_error(ids["transformer_block"], f"{block['n_heads']} heads do not divide the width "
                                     f"{width}: pick heads from {[d for d in range(1, width + 1) if width % d == 0]}",
                                     "n_heads")])
        overrides = dict(
            emb_dim=width, context_length=goal["context_length"], n_layers=block["n_layers"],
            n_heads=block["n_heads"], n_kv_heads=block["n_kv_heads"], norm=block["norm"], ffn=block["ffn"],
            ffn_hidden=block["ffn_hidden"], drop_rate=block["drop_rate"], qkv_bias=block["qkv_bias"],
            bias=block["bias"], pos_emb=values["positional_encoding"]["kind"],
            rope_base=values["positional_encoding"]["rope_base"],
            tie_weights=values["output_head"]["tie_weights"])
        if block["ffn"] == "moe":
            overrides.update(n_experts=block["n_experts"], moe_top_k=block["moe_top_k"],
                             moe_shared_expert=block["moe_shared_expert"])
        overrides.update(attn_rank=block["attn_rank"], attn_tau=block["attn_tau"], halting=block["halting"])
        if block["halting"]:
            overrides["ponder_coef"] = block["ponder_coef"]
        vocab = self.vocab_size(tok["kind"], tok["vocab_size"], data, ids["tokenizer"])
        try:
            config = GPTConfig(vocab_size=vocab, **overrides)
        except ConfigError as err:
            raise GraphError([self._error_for(str(err), ids)]) from None
        train = {key: goal[key] for key in ("batch_size", "learning_rate", "num_epochs", "max_steps", "eval_freq",
                                            "lr_schedule", "warmup_steps", "grad_clip")}
        train.update(max_length=goal["context_length"], stride=goal["context_length"])
        settings = dict(QUICK_MODE=False, CUSTOM_MODE=True, MODEL="gpt-mini",
                        TOKENIZER={"gpt2": "gpt2", "bpe": "train", "char": "char"}[tok["kind"]],
                        BPE_VOCAB_SIZE=tok["vocab_size"] if tok["kind"] == "bpe" else 1024,
                        custom_params={**train, "model_overrides": overrides})
        return BuiltGraph(config, settings, data, ids)

    @staticmethod
    def _error_for(message: str, ids: dict[str, str]) -> dict[str, Any]:
        """A package error (GPTConfig's, TrainConfig's) put on the node of the setting it names first."""
        named = [(found.start(), name) for name in FIELD_NODES if (found := re.search(rf"\b{name}\b", message))]
        if not named:
            return _error(None, message)
        name = min(named)[1]
        return _error(ids[FIELD_NODES[name]], message, name)

    def run_config(self, built: BuiltGraph, out: Path, name: str):
        """The RunConfig `python main.py` would resolve for these settings, writing into `out`; it
        logs every step (for the chart), and a character model's sample starts with the text's own
        first characters (any other prompt might hold a character the text lacks)."""
        settings = dict(built.settings, LOG_EVERY=1)
        if settings["TOKENIZER"] == "char":
            opening = " ".join(read_text(corpus_path(built.data))[:200].split()[:3]) or "The"
            settings["custom_params"] = {**settings["custom_params"], "start_context": opening}
        try:
            run = resolve_run_config(settings, {"data": built.data, "out": str(out)})
        except ConfigError as err:
            raise GraphError([self._error_for(str(err), built.node_ids)]) from None
        return replace(run, model_name=f"{name} (studio graph)")

    def summary(self, graph: Any) -> dict[str, Any]:
        built = self.build(graph)
        cfg, ids = built.config, built.node_ids
        with torch.device("meta"):  # shapes only: nothing is allocated
            model = GPTModel(cfg)
        goal = built.settings["custom_params"]

        def count(module: torch.nn.Module | None) -> int:
            return 0 if module is None else sum(p.numel() for p in module.parameters())

        block = count(model.trf_blocks[0])
        per_node = [
            {"node": ids["data"], "params": 0, "note": built.data if "/" not in built.data else Path(built.data).name},
            {"node": ids["tokenizer"], "params": 0, "note": f"{cfg.vocab_size:,} tokens"},
            {"node": ids["token_embedding"], "params": count(model.tok_emb),
             "note": f"{cfg.vocab_size:,} x {cfg.emb_dim}"},
            {"node": ids["positional_encoding"], "params": count(model.pos_emb),
             "note": f"{cfg.context_length:,} x {cfg.emb_dim}" if model.pos_emb is not None else "no weights"},
            {"node": ids["transformer_block"], "params": block * cfg.n_layers + count(model.halt_units),
             "note": f"{cfg.n_layers} x {block:,}" + (f" + {count(model.halt_units):,} halting" if cfg.halting else "")},
            {"node": ids["final_norm"], "params": count(model.final_norm), "note": cfg.norm},
            {"node": ids["output_head"], "params": 0 if cfg.tie_weights else model.out_head.weight.numel(),
             "note": "shares the token embedding" if cfg.tie_weights else f"{cfg.emb_dim} x {cfg.vocab_size:,}"},
            {"node": ids["training_goal"], "params": 0,
             "note": f"{goal['batch_size']} x {goal['max_length']} tokens per step"},
        ]
        params = model.num_parameters()
        untied = params + (model.out_head.weight.numel() if cfg.tie_weights else 0)
        estimate = estimate_training_memory(model, goal["batch_size"], goal["max_length"], "fp32", device_type="cpu")
        return {
            "config": {f: getattr(cfg, f) for f in cfg.__dataclass_fields__},
            "params": params, "params_tied": untied - cfg.vocab_size * cfg.emb_dim, "params_untied": untied,
            "per_node": per_node,
            "memory": {"weights_mib": round(estimate.weights / MIB, 2),
                       "training_step_mib": round(estimate.total / MIB, 2),
                       "states_mib": round(estimate.states / MIB, 2),
                       "activations_mib": round((estimate.total - estimate.weights - estimate.optimizer) / MIB, 2),
                       "batch": goal["batch_size"], "tokens": goal["max_length"], "precision": "fp32"},
            "flops_per_token": model.flops_per_token(goal["max_length"]),
            "vocab_size": cfg.vocab_size,
            "settings": settings_text(built),
            "command": command_text(built, graph),
        }

    # -- runs ---------------------------------------------------------------------------

    def run_dir(self, run_id: str) -> Path:
        if not isinstance(run_id, str) or not SAFE_NAME.match(run_id):
            raise LookupError(f"no run {run_id!r}")
        path = (self.runs_dir / run_id).resolve()
        if path.parent != self.runs_dir or not (path / "config.json").is_file() and run_id not in self.runs:
            raise LookupError(f"no run {run_id!r} in {self.runs_dir}")
        return path

    def training_now(self) -> "StudioRun | None":
        return next((run for run in self.runs.values() if run.status in ("running", "stopping")), None)

    def start(self, graph: Any) -> "StudioRun":
        built = self.build(graph)
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", str(graph.get("name") or "model")).strip("-.")[:40] or "model"
        with self.lock:
            busy = self.training_now()
            if busy is not None:
                raise RuntimeError(f"run {busy.run_id} is still training; stop it first (one run at a time)")
            prefix = name if name.startswith("studio") else f"studio-{name}"
            number = 1
            while (self.runs_dir / f"{prefix}-{number}").exists() or f"{prefix}-{number}" in self.runs:
                number += 1
            run_id = f"{prefix}-{number}"
            run = self.run_config(built, self.runs_dir / run_id, name)
            self.runs_dir.mkdir(parents=True, exist_ok=True)
            studio_run = StudioRun(run_id)
            self.runs[run_id] = studio_run
        (self.runs_dir / f"{run_id}.graph.json").write_text(json.dumps(graph, indent=2) + "\n")
        studio_run.launch(run)
        return studio_run

    def resume(self, run_id: str) -> "StudioRun":
        path = self.run_dir(run_id)
        with self.lock:
            busy = self.training_now()
            if busy is not None:
                raise RuntimeError(f"run {busy.run_id} is still training; stop it first (one run at a time)")
            if not (path / CHECKPOINT_NAME).is_file():
                raise LookupError(f"run {run_id} has no checkpoint to resume yet")
            run = resolve_resume_config(resume_settings(path), {"resume": str(path)})
            studio_run = self.runs.get(run_id) or StudioRun(run_id)
            self.runs[run_id] = studio_run
        studio_run.launch(run)
        return studio_run

    def describe_run(self, path: Path) -> dict[str, Any]:
        run_id = path.name
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        metrics_file = path / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        live = self.runs.get(run_id)
        status = live.status if live is not None else ("finished" if metrics.get("completed") else
                                                       "stopped" if metrics else "saved")
        return {"run_id": run_id, "status": status, "task": config.get("task"), "model": config.get("model_name"),
                "parameters": metrics.get("num_parameters"), "steps": metrics.get("steps"),
                "final_val_loss": metrics.get("final_val_loss"), "best_val_loss": metrics.get("best_val_loss"),
                "created": path.stat().st_mtime if path.exists() else live.started if live is not None else 0.0,
                "error": live.error if live is not None else None}

    def list_runs(self) -> list[dict[str, Any]]:
        if not self.runs_dir.is_dir():
            return []
        folders = [p for p in self.runs_dir.iterdir() if p.is_dir() and (p / "config.json").is_file()]
        folders += [self.runs_dir / run_id for run_id in self.runs if not (self.runs_dir / run_id).exists()]
        runs = [self.describe_run(p) for p in folders if p.exists()]
        return sorted(runs, key=lambda r: r["created"], reverse=True)

    # -- chat ---------------------------------------------------------------------------

    def model_for(self, request: dict[str, Any]) -> tuple[GPTModel, Any]:
        if request.get("pretrained") is not None:
            if request["pretrained"] not in PRETRAINED_NAMES:
                raise ValueError(f"pretrained must be one of {', '.join(PRETRAINED_NAMES)}")
            key = (request["pretrained"], 0.0)
            if key not in self._models:
                try:
                    self._models[key] = load_pretrained(request["pretrained"])
                except ConfigError as err:  # offline: say so in a line, not with the whole download story
                    raise ValueError(f"{request['pretrained']}'s weights are not here and could not be downloaded "
                                     f"({str(err).splitlines()[0][:160]}); chat with one of your runs instead, or "
                                     f"run python main.py --task generate --pretrained {request['pretrained']} "
                                     "once online.") from None
            return self._models[key]
        path = self.run_dir(request.get("run_id"))
        checkpoint = path / CHECKPOINT_NAME
        if not checkpoint.is_file():
            raise LookupError(f"run {path.name} has no checkpoint yet; wait for its first epoch or stop it")
        key = (str(checkpoint), checkpoint.stat().st_mtime)
        if key not in self._models:
            model, tokenizer, saved = load_model(path)
            if saved.get("task") not in (None, "pretrain", "sft", "dpo", "ppo", "grpo"):
                raise ValueError(f"run {path.name} is a {saved.get('task')} model; it scores texts, it does not "
                                 "write them: pick a pretraining or instruction run")
            self._models[key] = (model.eval(), tokenizer)
        return self._models[key]


def settings_text(built: BuiltGraph) -> str:
    """The config_run.py lines that make `python main.py` train this model (custom mode)."""
    s = built.settings
    lines = ["# config_run.py: paste over these names (custom mode), then run python main.py",
             "QUICK_MODE = False", "CUSTOM_MODE = True", f"MODEL = {s['MODEL']!r}  # every size below overrides it",
             f"TOKENIZER = {s['TOKENIZER']!r}"]
    if s["TOKENIZER"] == "train":
        lines.append(f"BPE_VOCAB_SIZE = {s['BPE_VOCAB_SIZE']}")
    lines.append(f"DATA = {built.data!r}")
    lines.append("custom_params = {")
    for key, value in s["custom_params"].items():
        if key != "model_overrides":
            lines.append(f"    {key!r}: {value!r},")
    lines.append("    'model_overrides': {")
    for key, value in s["custom_params"]["model_overrides"].items():
        lines.append(f"        {key!r}: {value!r},")
    lines += ["    },", "}"]
    return "\n".join(lines) + "\n"


def command_text(built: BuiltGraph, graph: dict[str, Any]) -> str:
    """The command that trains the same model from the graph saved as a file (Export)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", str(graph.get("name") or "model")).strip("-.") or "model"
    return f"python main.py --graph {name}.json"


def settings_from_graph(graph: Any, uploads_dir: str | Path = "uploads") -> dict[str, Any]:
    """config_run.py-style settings (and DATA) for `python main.py --graph FILE`."""
    built = Studio(Path("runs"), uploads_dir).build(graph)
    return {**built.settings, "DATA": built.data}


# ---------------------------------------------------------------------------------------
# A training run in the background, and its events
# ---------------------------------------------------------------------------------------

@dataclass
class StudioRun:
    """One run the studio trains: a thread running `pretrain`, and the events it has sent."""

    run_id: str
    status: str = "saved"
    error: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    stop_request: StopRequest | None = None
    changed: threading.Condition = field(default_factory=threading.Condition)
    started: float = field(default_factory=time.time)  # a run that failed before writing has no folder to date

    def emit(self, event: dict[str, Any]) -> None:
        with self.changed:
            self.events.append({"id": len(self.events) + 1, "time": time.time(), **event})
            self.changed.notify_all()

    def launch(self, run) -> None:
        self.stop_request, self.status, self.error = StopRequest(), "running", None
        threading.Thread(target=self._train, args=(run, self.stop_request), daemon=True,
                         name=f"studio-{self.run_id}").start()

    def _train(self, run, stop: StopRequest) -> None:
        try:
            _, _, metrics, _ = pretrain(run, stop=stop, on_event=self.emit)
        except Exception as err:  # noqa: BLE001 - the page shows any failure, and the server keeps serving
            self.status, self.error = "failed", str(err) if isinstance(err, ConfigError) else f"{type(err).__name__}: {err}"
            self.emit({"type": "end", "status": "failed", "metrics": None, "error": self.error})
            return
        self.status = "finished" if metrics["completed"] else "stopped"
        shown = {k: v for k, v in metrics.items() if not isinstance(v, list)}
        shown.update(train_losses=metrics["train_losses"], val_losses=metrics["val_losses"],
                     eval_steps=metrics["eval_steps"])
        self.emit({"type": "end", "status": self.status, "metrics": shown, "error": None})

    def request_stop(self) -> None:
        if self.status == "running" and self.stop_request is not None:
            self.stop_request.requested = True
            self.status = "stopping"

    def stream(self, after: int = 0, timeout: float = 3600.0) -> Iterator[str]:
        """Server-sent events from number `after` on, until the run's "end" event."""
        deadline = time.time() + timeout
        index = after
        while time.time() < deadline:
            with self.changed:
                if index >= len(self.events) and self.status in ("running", "stopping"):
                    self.changed.wait(timeout=15)
                pending = self.events[index:]
            if not pending:
                if self.status not in ("running", "stopping"):
                    return
                yield ": still training\n\n"  # a comment keeps proxies and the browser connected
                continue
            for event in pending:
                index = event["id"]
                yield f"id: {event['id']}\ndata: {json.dumps(event)}\n\n"
                if event["type"] == "end" and index == len(self.events):
                    return


# ---------------------------------------------------------------------------------------
# The web app
# ---------------------------------------------------------------------------------------

def presets() -> list[dict[str, Any]]:
    """Every model preset as a graph, plus studio-tiny: a character model that trains in seconds."""
    found = [("studio-tiny", "2 blocks of width 32 on The Verdict, one token per character: an epoch in about a second",
              model_config("gpt-nano", context_length=32, drop_rate=0.0), "char",
              dict(batch_size=8, learning_rate=3e-3, num_epochs=1, max_steps=None, eval_freq=10))]
    for name in MODEL_PRESETS:
        cfg = model_config(name)
        context = min(cfg.context_length, 128)
        found.append((name, f"the {name} preset (minigpt.config.MODEL_PRESETS), context {context} to train on a CPU",
                      replace(cfg, context_length=context, drop_rate=0.0), "gpt2",
                      dict(batch_size=8, learning_rate=4e-4, num_epochs=1, max_steps=None, eval_freq=5)))
    return [{"name": name, "description": text, "graph": graph_for(name, cfg, tokenizer, train)}
            for name, text, cfg, tokenizer, train in found]


def graph_for(name: str, cfg: GPTConfig, tokenizer: str, train: dict[str, Any]) -> dict[str, Any]:
    """The studio graph of a model config: one node per stage, laid out top to bottom."""
    params = {
        "data": {"source": "the-verdict"},
        "tokenizer": {"kind": tokenizer, "vocab_size": 512},
        "token_embedding": {"emb_dim": cfg.emb_dim},
        "positional_encoding": {"kind": cfg.pos_emb, "rope_base": cfg.rope_base},
        "transformer_block": {"n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
                              "norm": cfg.norm, "ffn": cfg.ffn, "ffn_hidden": cfg.ffn_hidden,
                              "n_experts": cfg.n_experts, "moe_top_k": cfg.moe_top_k,
                              "moe_shared_expert": cfg.moe_shared_expert, "attn_rank": cfg.attn_rank,
                              "attn_tau": cfg.attn_tau, "halting": cfg.halting, "ponder_coef": cfg.ponder_coef,
                              "drop_rate": cfg.drop_rate, "qkv_bias": cfg.qkv_bias, "bias": cfg.bias},
        "final_norm": {},
        "output_head": {"tie_weights": cfg.tie_weights},
        "training_goal": {"context_length": cfg.context_length, "lr_schedule": "constant", "warmup_steps": 0,
                          "grad_clip": None, **train},
    }
    nodes = [{"id": kind, "type": kind, "x": 60 + 250 * (i % 2), "y": 30 + 95 * i, "params": params[kind]}
             for i, kind in enumerate(ORDER)]
    edges = [{"from": a, "to": b} for a, b in zip(ORDER, ORDER[1:])]
    return {"version": 1, "name": name, "nodes": nodes, "edges": edges}


def create_app(runs_dir: str | Path = "runs", uploads_dir: str | Path = "uploads"):
    """The studio's Flask app, reading and writing only inside `runs_dir` and `uploads_dir`."""
    from flask import Flask, Response, jsonify, request, send_from_directory, stream_with_context
    from werkzeug.exceptions import HTTPException

    studio = Studio(runs_dir, uploads_dir)
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD_BYTES
    app.extensions["minigpt_studio"] = studio

    def body() -> dict[str, Any]:
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise BadRequest("the request body must be a JSON object (Content-Type: application/json)")
        return data

    class BadRequest(Exception):
        pass

    @app.errorhandler(BadRequest)
    def bad_request(err):
        return jsonify(error=str(err)), 400

    @app.errorhandler(GraphError)
    def bad_graph(err: GraphError):
        return jsonify(errors=err.errors), 400

    @app.errorhandler(LookupError)
    def not_found(err):
        return jsonify(error=str(err.args[0]) if err.args else "not found"), 404

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException):
        message = err.description
        if err.code == 413:
            message = f"the upload is larger than {MAX_UPLOAD_BYTES // 2**20} MB; upload a smaller text file"
        return jsonify(error=message), err.code

    @app.errorhandler(Exception)
    def unexpected(err):  # the server keeps serving; the page shows what went wrong
        app.logger.exception("studio request failed")
        return jsonify(error=f"{type(err).__name__}: {err}"), 500

    @app.get("/")
    def index():
        return send_from_directory(STATIC, "index.html")

    @app.get("/static/<path:name>")
    def static_file(name: str):
        return send_from_directory(STATIC, name)

    @app.get("/api/schema")
    def schema():
        return jsonify(order=list(ORDER), types=SCHEMA)

    @app.get("/api/presets")
    def preset_list():
        return jsonify(presets=presets())

    @app.get("/api/data")
    def data_sources():
        sources = [{"source": name, "label": name} for name in NAMED_CORPORA]
        if studio.uploads_dir.is_dir():
            sources += [{"source": f"upload:{p.name}", "label": f"{p.name} (uploaded)"}
                        for p in sorted(studio.uploads_dir.iterdir()) if p.is_file()]
        return jsonify(sources=sources)

    @app.post("/api/uploads")
    def upload():
        file = request.files.get("file")
        if file is None or not file.filename:
            raise BadRequest("send the text as a multipart form with a field named \"file\"")
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(file.filename).name).strip("-.")[:100]
        if not name or not SAFE_NAME.match(name):
            raise BadRequest(f"the file name {file.filename!r} has no usable characters; rename it")
        raw = file.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"{name} is not UTF-8 text; save it as UTF-8 and upload it again") from None
        if not text.strip():
            raise BadRequest(f"{name} is empty")
        studio.uploads_dir.mkdir(parents=True, exist_ok=True)
        (studio.uploads_dir / name).write_text(text, encoding="utf-8")
        return jsonify(source=f"upload:{name}", characters=len(text)), 201

    @app.post("/api/graph/summary")
    def graph_summary():
        return jsonify(studio.summary(body()))

    @app.get("/api/runs")
    def runs():
        return jsonify(runs=studio.list_runs())

    @app.post("/api/runs")
    def start_run():
        data = body()
        try:
            run = studio.start(data.get("graph", data))
        except RuntimeError as err:
            return jsonify(error=str(err)), 409
        return jsonify(run_id=run.run_id), 201

    @app.get("/api/runs/<run_id>")
    def run_info(run_id: str):
        path = studio.run_dir(run_id)
        info = studio.describe_run(path)
        metrics = path / "metrics.json"
        config = path / "config.json"
        live = studio.runs.get(run_id)
        return jsonify(**info, config=json.loads(config.read_text()) if config.is_file() else None,
                       metrics=json.loads(metrics.read_text()) if metrics.is_file() else None,
                       events=len(live.events) if live else 0)

    @app.get("/api/runs/<run_id>/events")
    def run_events(run_id: str):
        studio.run_dir(run_id)
        live = studio.runs.get(run_id)
        if live is None:
            raise LookupError(f"run {run_id} was not trained by this studio session; its metrics are at "
                              f"/api/runs/{run_id}")
        after = request.headers.get("Last-Event-ID") or request.args.get("after") or "0"
        if not after.isdigit():
            raise BadRequest("Last-Event-ID must be an event number")
        return Response(stream_with_context(live.stream(int(after))), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/api/runs/<run_id>/stop")
    def stop_run(run_id: str):
        studio.run_dir(run_id)
        live = studio.runs.get(run_id)
        if live is None or live.status not in ("running", "stopping"):
            return jsonify(error=f"run {run_id} is not training"), 409
        live.request_stop()
        return jsonify(status=live.status)

    @app.post("/api/runs/<run_id>/resume")
    def resume_run(run_id: str):
        try:
            run = studio.resume(run_id)
        except RuntimeError as err:
            return jsonify(error=str(err)), 409
        except ConfigError as err:
            return jsonify(error=str(err)), 400
        return jsonify(run_id=run.run_id)

    @app.post("/api/generate")
    def generate():
        data = body()
        prompt = data.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRequest("write a prompt for the model to continue")
        options = {}
        for key, kind, default, low, high in (("max_new_tokens", int, 60, 1, 2048),
                                              ("temperature", float, 0.8, 0.0, 5.0),
                                              ("top_k", int, 40, 1, 1_000_000), ("top_p", float, None, 0.0, 1.0)):
            value = data.get(key, default)
            if value is None or value == "":
                options[key] = None if key in ("top_k", "top_p") else default
                continue
            try:
                value = kind(value)
            except (TypeError, ValueError):
                raise BadRequest(f"{key} must be a number, got {data.get(key)!r}") from None
            if not low <= value <= high:
                raise BadRequest(f"{key} must be between {low} and {high}, got {value}")
            options[key] = value
        try:
            model, tokenizer = studio.model_for(data)
        except (ValueError, ConfigError) as err:
            raise BadRequest(str(err)) from None
        pieces = stream_text(model, tokenizer, prompt, **options)
        try:
            first = next(pieces, "")  # errors in the prompt (e.g. unknown characters) surface here, as JSON
        except (ValueError, ConfigError) as err:
            raise BadRequest(str(err)) from None

        def chunks() -> Iterator[str]:
            yield first
            yield from pieces

        return Response(stream_with_context(chunks()), mimetype="text/plain; charset=utf-8",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(host: str = "127.0.0.1", port: int = 5000, open_browser: bool = True,
          runs_dir: str | Path = "runs", uploads_dir: str | Path = "uploads") -> None:
    """Run the studio until Ctrl-C; open it in the browser unless told not to."""
    import webbrowser

    from werkzeug.serving import make_server

    if host not in LOOPBACK:
        print(f"warning: the studio listens on {host}: anyone who can reach this address can train models "
              "and read your runs; it has no authentication. Use --host 127.0.0.1 unless you mean it.")
    try:
        server = make_server(host, port, create_app(runs_dir, uploads_dir), threaded=True)
    except OSError as err:
        raise ConfigError(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port.") from None
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{server.server_port}/"
    print(f"minigpt studio at {url} (runs in {Path(runs_dir).resolve()}, uploads in "
          f"{Path(uploads_dir).resolve()}); Ctrl-C stops it")
    if open_browser:
        threading.Timer(0.5, webbrowser.open, args=(url,)).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nstudio stopped")
    finally:
        server.server_close()
