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

import copy
import ipaddress
import itertools
import json
import math
import os
import re
import shutil
import socket
import threading
import time
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from minigpt.config import MODEL_PRESETS, PRETRAINED_NAMES, ConfigError, GPTConfig, model_config
from minigpt.data import NAMED_CORPORA, corpus_path, read_labeled_texts, read_text
from minigpt.generation import stream_text
from minigpt.graph import (GRAPH_VERSION, KIND_WORDS, NODE_TYPES, GraphError, Plan, check_graph, compile_graph,
                           envelope_config, file_stem, graph_error, module_name, needs_labels, read_graph, standard_graph,
                           upgrade)
from minigpt.graph_script import training_script
from minigpt.hub import load_pretrained
from minigpt.memory import MIB, estimate_training_memory
from minigpt.model import GPTModel
from minigpt.tokenizer import CharTokenizer
from minigpt.runs import (CHECKPOINT_NAME, StopRequest, held_by_another, describe_holder, finished,
                          load_checkpoint, load_model, resume_settings, write_atomically, write_error, write_json)
from minigpt.settings import resolve_resume_config, resolve_run_config
from minigpt.task_pretrain import pretrain

STATIC = Path(__file__).with_name("studio")   # index.html, studio.css, studio.js
EXAMPLE_GRAPH = STATIC / "example-graph.json"
MAX_UPLOAD_BYTES = 10 * 2**20
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # run ids
RECORD_NAME = "studio.json"  # in a run's folder: the studio's record of it, written from its first moment
TRAINING = ("running", "stopping")
CSRF_HEADER = "X-Minigpt-Studio"  # "1" on every request that changes something; other sites cannot send it

# ---------------------------------------------------------------------------------------
# What a graph means: the compiled model, the training settings, how main.py gets them
# ---------------------------------------------------------------------------------------

# Which node a setting of the package's messages belongs to, to put its error on that node.
FIELD_NODES = {"emb_dim": "token_embedding", "pos_emb": "positional_encoding", "rope_base": "positional_encoding",
               "vocab_size": "tokenizer", "tokenizer": "tokenizer", "source": "data", "max_length": "training_goal",
               "stride": "training_goal", "context_length": "training_goal", "tie_weights": "output_head",
               **{p["name"]: "training_goal" for p in NODE_TYPES["training_goal"]["params"]},
               **{p["name"]: "transformer_block" for p in NODE_TYPES["transformer_block"]["params"]}}


@dataclass(frozen=True)
class BuiltGraph:
    """What a valid graph means: its checked plan, the training settings, and how main.py would get them."""

    plan: Plan
    graph: dict[str, Any]     # the graph as JSON (today's version), saved with the run
    settings: dict[str, Any]  # config_run.py's names: MODEL, TOKENIZER, BPE_VOCAB_SIZE, custom_params ...
    data: str                 # --data: a corpus name or a file in the uploads folder

    @property
    def config(self) -> GPTConfig:
        """The model's GPTConfig: exactly it for the standard chain, the graph's envelope otherwise."""
        return self.plan.standard or envelope_config(self.plan)

    def node_of(self, kind: str) -> str | None:
        return next((n.shown_as or n.id for n in self.plan.graph.nodes.values() if n.type == kind), None)


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
        if not isinstance(source, str) or not source.startswith("upload:"):
            raise GraphError([graph_error(node_id, f"data source {source!r} is neither a corpus ({', '.join(NAMED_CORPORA)}) "
                                                   "nor an uploaded file (upload:<name>)", "source")])
        name = source.removeprefix("upload:")
        try:
            path = upload_path(self.uploads_dir, name)
        except UploadNameError as err:
            raise GraphError([graph_error(node_id, f"data source {source!r}: {err}", "source")]) from None
        if not path.is_file():
            raise GraphError([graph_error(node_id, f"no uploaded file {name!r}; upload it first", "source")])
        return str(path)

    def data_sources(self) -> list[dict[str, str]]:
        """What a data node can read: the named corpora, then the uploaded files."""
        sources = [{"source": name, "label": name} for name in NAMED_CORPORA]
        sources += [{"source": f"upload:{name}", "label": f"{name} (uploaded)"} for name in self.uploads()]
        return sources

    @staticmethod
    def labels(data: str, node_id: str) -> list[str]:
        """The classes of labelled data (a .csv, .tsv or .jsonl of text and label), sorted."""
        path = corpus_path(data)
        if path.suffix.lower() not in (".csv", ".tsv", ".jsonl"):
            raise GraphError([graph_error(node_id, f"a sequence-classification loss reads labelled texts: upload a "
                                                   f".csv, .tsv or .jsonl file whose records have a \"text\" and a "
                                                   f"\"label\"; {path.name} is plain text", "source")])
        try:
            return sorted({label for _, label in read_labeled_texts(path)})
        except ConfigError as err:
            raise GraphError([graph_error(node_id, f"a sequence-classification loss reads labelled texts: {err}",
                                          "source")]) from None

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
            raise GraphError([graph_error(node_id, f"a character tokenizer needs the text: {err}")]) from None
        return self._vocab_cache[key]

    # -- graphs -------------------------------------------------------------------------

    def build(self, graph: Any) -> BuiltGraph:
        """Read and check a graph against the data it names; raises GraphError naming each bad node."""
        read = read_graph(graph)
        data_node = next((n for n in read.nodes.values() if n.type == "data"), None)
        tokenizer = next((n for n in read.nodes.values() if n.type == "tokenizer"), None)
        if data_node is None or tokenizer is None:
            check_graph(read, 2)  # says which of them is missing, with any other structural problem
        data = self.data_path(data_node.params["source"], data_node.id)
        kind, bpe_size = tokenizer.params["kind"], tokenizer.params["vocab_size"]
        labels = self.labels(data, data_node.id) if needs_labels(read) else None
        plan = check_graph(read, self.vocab_size(kind, bpe_size, data, tokenizer.id), labels)
        built = BuiltGraph(plan, {**upgrade(graph), "labels": labels} if labels else upgrade(graph), {}, data)
        config, training = built.config, plan.training
        train = {**training, "max_length": plan.context_length, "stride": plan.context_length}
        overrides = {f: getattr(config, f) for f in ("context_length", "emb_dim", "n_heads", "n_layers", "drop_rate",
                                                       "qkv_bias", "bias", "tie_weights", "norm", "pos_emb",
                                                       "rope_base", "ffn", "ffn_hidden", "n_kv_heads", "attn_rank",
                                                       "attn_tau", "halting")}
        if config.ffn == "moe":
            overrides.update(n_experts=config.n_experts, moe_top_k=config.moe_top_k,
                             moe_shared_expert=config.moe_shared_expert)
        if config.halting:
            overrides["ponder_coef"] = config.ponder_coef
        settings = dict(QUICK_MODE=False, CUSTOM_MODE=True, MODEL="gpt-mini",
                        TOKENIZER={"gpt2": "gpt2", "bpe": "train", "char": "char"}[kind],
                        BPE_VOCAB_SIZE=bpe_size if kind == "bpe" else 1024,
                        custom_params={**train, "model_overrides": overrides})
        return replace(built, settings=settings)

    @staticmethod
    def _error_for(message: str, built: BuiltGraph) -> dict[str, Any]:
        """A package error (GPTConfig's, TrainConfig's) put on the node of the setting it names first."""
        named = [(found.start(), name) for name in FIELD_NODES if (found := re.search(rf"\b{name}\b", message))]
        if not named:
            return graph_error(None, message)
        name = min(named)[1]
        return graph_error(built.node_of(FIELD_NODES[name]), message, name)

    def run_config(self, built: BuiltGraph, out: Path):
        """The RunConfig `python main.py --graph` would resolve for this graph, writing into `out`; it
        logs every step (for the chart), and a character model's sample starts with the text's own
        first characters (any other prompt might hold a character the text lacks)."""
        settings = dict(built.settings, LOG_EVERY=1)
        if settings["TOKENIZER"] == "char":
            text = read_labeled_texts(corpus_path(built.data))[0][0] if built.plan.labels else \
                read_text(corpus_path(built.data))[:200]
            opening = " ".join(text.split()[:3]) or "The"
            settings["custom_params"] = {**settings["custom_params"], "start_context": opening}
        try:
            run = resolve_run_config(settings, {"data": built.data, "out": str(out)})
        except ConfigError as err:
            raise GraphError([self._error_for(str(err), built)]) from None
        return replace(run, model_name=f"{built.plan.graph.name} (studio graph)",
                       graph=None if built.plan.standard is not None else built.graph)

    def summary(self, graph: Any) -> dict[str, Any]:
        built = self.build(graph)
        plan, cfg = built.plan, built.config
        with torch.device("meta"):  # shapes only: nothing is allocated
            model = compile_graph(plan)
        goal = built.settings["custom_params"]
        estimate = estimate_training_memory(model, goal["batch_size"], goal["max_length"], "fp32", device_type="cpu")
        return {
            "config": {f: getattr(cfg, f) for f in cfg.__dataclass_fields__} if plan.standard else None,
            "standard": plan.standard is not None,
            "params": model.num_parameters(), "per_node": node_parameters(plan, model, built.data),
            "edges": plan.edge_shapes(),
            "memory": {"weights_mib": round(estimate.weights / MIB, 2),
                       "training_step_mib": round(estimate.total / MIB, 2),
                       "states_mib": round(estimate.states / MIB, 2),
                       "activations_mib": round((estimate.total - estimate.weights - estimate.optimizer) / MIB, 2),
                       "batch": goal["batch_size"], "tokens": goal["max_length"], "precision": "fp32",
                       "exact": plan.standard is not None},
            "flops_per_token": model.flops_per_token(goal["max_length"]),
            "vocab_size": plan.vocab_size,
            "settings": settings_text(built) if plan.standard else None,
            "command": command_text(built),
        }

    # -- runs ---------------------------------------------------------------------------

    def run_dir(self, run_id: str) -> Path:
        """The folder of a run the studio lists: one with the studio's record or a config.json."""
        if not isinstance(run_id, str) or not SAFE_NAME.match(run_id):
            raise LookupError(f"no run {run_id!r}")
        path = (self.runs_dir / run_id).resolve()
        if path.parent != self.runs_dir or not is_run_folder(path):
            raise LookupError(f"no run {run_id!r} in {self.runs_dir}")
        return path

    def training_now(self) -> "StudioRun | None":
        return next((run for run in self.runs.values() if run.status in TRAINING), None)

    def _refuse_if_busy(self) -> None:
        """One run at a time: the refusal names the run that trains, so the page can offer to stop it."""
        busy = self.training_now()
        if busy is not None:
            doing = "is still training" if busy.status == "running" else "is stopping (saving its checkpoint)"
            raise Refused(409, f"run {busy.run_id} {doing}; the studio trains one run at a time: stop it (or wait "
                               "for it to end), then try again", running=busy.run_id)

    @staticmethod
    def _refuse_if_held(path: Path, then: str) -> None:
        """A run another process trains (main.py, another studio) is that process's alone."""
        if held_by_another(path):
            raise Refused(409, f"run {path.name} is training in another process, {describe_holder(path)}; this "
                               f"studio cannot stop it: stop it there (Ctrl-C), then {then}", running=path.name)

    def start(self, graph: Any) -> "StudioRun":
        """Train a graph in a new run folder, claimed and recorded at once: it is listed from this moment."""
        built = self.build(graph)
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", str(graph.get("name") or "model")).strip("-.")[:40] or "model"
        with self.lock:
            self._refuse_if_busy()
            folder = self._claim_folder(name if name.startswith("studio") else f"studio-{name}")
            try:
                run = self.run_config(built, folder)
                studio_run = StudioRun(folder.name, folder, {"name": name, "created": time.time(),
                                                             "data": built.data, "graph": graph})
                studio_run.launch(run)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)  # nothing trained: leave no folder behind
                raise
            self.runs[folder.name] = studio_run
        return studio_run

    def _claim_folder(self, prefix: str) -> Path:
        """The first free folder prefix-1, prefix-2 ...: mkdir makes it, and only one process wins a name."""
        for number in itertools.count(1):
            folder = self.runs_dir / f"{prefix}-{number}"
            if folder.name in self.runs or folder.with_name(f"{folder.name}.graph.json").exists():
                continue  # a run deleted by hand, or one an older studio dated by its graph file
            try:
                self.runs_dir.mkdir(parents=True, exist_ok=True)
                folder.mkdir()
            except FileExistsError:
                continue
            except OSError as err:
                raise write_error(folder, err) from None
            return folder

    def resume(self, run_id: str, more: dict[str, Any] | None = None) -> "StudioRun":
        """Continue a stopped run from its folder alone (a studio restarted since knows it from disk only);
        `more` may raise num_epochs or max_steps, the settings a resumed run may change."""
        path = self.run_dir(run_id)
        with self.lock:
            self._refuse_if_busy()
            self._refuse_if_held(path, "resume it here")
            if not (path / CHECKPOINT_NAME).is_file():
                raise Refused(409, f"run {run_id} has no checkpoint to resume: it ended before its first one; "
                                   "start a new run instead")
            run = resolve_resume_config(resume_settings(path), {"resume": str(path), **(more or {})})
            self._refuse_finished(path, run)
            record = read_json(path / RECORD_NAME) or {"created": path.stat().st_mtime}  # main.py's runs have none
            studio_run = self.runs.get(run_id) or StudioRun(run_id, path, record)
            studio_run.launch(run)
            self.runs[run_id] = studio_run
        return studio_run

    @staticmethod
    def _refuse_finished(path: Path, run) -> None:
        """A finished run resumes only to train further: to more epochs, or past its step limit."""
        if not finished(path):
            return
        state, train = load_checkpoint(path / CHECKPOINT_NAME, mmap=True)["state"], run.train
        if state["epoch"] < train.num_epochs and (train.max_steps is None or state["global_step"] < train.max_steps):
            return
        raise Refused(409, f"run {path.name} finished all its {state['global_step']} steps ({state['epoch']} "
                           f"epochs); start a new run, or resume it with a higher \"epochs\" (now {train.num_epochs}) "
                           f"or \"stop after steps\" (now {train.max_steps or 'none'}) of the Training goal")

    def stop(self, run_id: str) -> str:
        """Ask a run this studio trains to stop at its next step and save; its status after asking."""
        path = self.run_dir(run_id)
        live = self.runs.get(run_id)
        if live is not None and live.status in TRAINING:
            live.request_stop()
            return live.status
        self._refuse_if_held(path, "reload this page")
        raise Refused(409, f"run {run_id} is not training (it is {self.describe_run(path)['status']}); "
                           "there is nothing to stop")

    def delete(self, run_id: str) -> None:
        """Remove a run's folder (and the graph file older studios wrote beside it); never a run that trains."""
        path = self.run_dir(run_id)
        with self.lock:
            live = self.runs.get(run_id)
            if live is not None and live.status in TRAINING:
                raise Refused(409, f"run {run_id} is training; stop it, then delete it", running=run_id)
            self._refuse_if_held(path, "delete it")
            shutil.rmtree(path)
            path.with_name(f"{run_id}.graph.json").unlink(missing_ok=True)
            self.runs.pop(run_id, None)
            self._models = {key: value for key, value in self._models.items() if Path(key[0]).parent != path}

    def describe_run(self, path: Path) -> dict[str, Any]:
        """What the runs list shows of a folder: a run training here, or one an earlier studio or main.py left."""
        record, config, metrics = (read_json(path / name) for name in (RECORD_NAME, "config.json", "metrics.json"))
        status, error, note = self._status(path, record, metrics)
        created = record.get("created")
        if not isinstance(created, (int, float)):
            created = path.stat().st_mtime if path.exists() else 0.0
        return {"run_id": path.name, "status": status, "error": error, "note": note,
                "resumable": status in ("stopped", "failed") and (path / CHECKPOINT_NAME).is_file(),
                "task": config.get("task"), "model": config.get("model_name"),
                "parameters": metrics.get("num_parameters"), "steps": metrics.get("steps"),
                "final_val_loss": metrics.get("final_val_loss"), "best_val_loss": metrics.get("best_val_loss"),
                "created": created}

    def _status(self, path: Path, record: dict[str, Any], metrics: dict[str, Any]) -> tuple[str, Any, Any]:
        """(status, error, note): the thread's, if the run trains here; else what the folder says."""
        live = self.runs.get(path.name)
        if live is not None:
            return live.status, live.error, None
        if held_by_another(path):
            return "running", None, f"trained by another process, {describe_holder(path)}"
        if metrics.get("completed") is True:
            return "finished", None, None
        saved = record.get("status")
        if saved in TRAINING:  # the studio that trained it ended mid-run: closed, restarted or killed
            if (path / CHECKPOINT_NAME).is_file():
                return "stopped", None, "the studio closed while this run trained; Resume continues from its " \
                                        "last checkpoint"
            return "failed", "the studio closed before this run wrote its first checkpoint, so there is " \
                             "nothing to resume; start a new run", None
        if saved in ("finished", "stopped", "failed"):
            return saved, record.get("error"), None
        return ("stopped" if metrics else "saved"), None, None

    def list_runs(self) -> list[dict[str, Any]]:
        if not self.runs_dir.is_dir():
            return []
        runs = [self.describe_run(p) for p in self.runs_dir.iterdir()
                if p.is_dir() and not p.is_symlink() and is_run_folder(p)]
        return sorted(runs, key=lambda r: r["created"], reverse=True)

    # -- uploads ------------------------------------------------------------------------

    def uploads(self) -> list[str]:
        """The names of the uploaded files (not the temporary files of a write under way)."""
        if not self.uploads_dir.is_dir():
            return []
        return sorted(p.name for p in self.uploads_dir.iterdir() if p.is_file() and is_upload_name(p.name))

    def save_upload(self, filename: str, raw: bytes, replace: bool) -> tuple[str, int, bool]:
        """Keep an uploaded text under its own name: (name, characters, whether the file is new). Another
        text under that name is never overwritten unasked: that needs `replace`."""
        name = upload_name(filename)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Refused(400, f"{name} is not UTF-8 text; save it as UTF-8 and upload it again") from None
        if not text.strip():
            raise Refused(400, f"{name} is empty")
        path = upload_path(self.uploads_dir, name)
        with self.lock:
            exists = path.exists()
            if exists and path.is_file() and path.read_bytes() == raw:
                return name, len(text), False  # the same text again: nothing to do
            if exists and (not replace or not path.is_file()):
                raise Refused(409, f"an upload named {name} already exists with other content; rename your "
                                   "file, or upload it with ?replace=1 to replace that one", source=f"upload:{name}")
            self._refuse_if_training_on(path, "replace")
            self.uploads_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(path, lambda tmp: tmp.write_bytes(raw))
        return name, len(text), not exists

    def delete_upload(self, name: str) -> None:
        path = upload_path(self.uploads_dir, name)
        with self.lock:
            if not path.is_file():
                raise LookupError(f"no uploaded file {name!r}")
            self._refuse_if_training_on(path, "delete")
            path.unlink()

    def _refuse_if_training_on(self, path: Path, what: str) -> None:
        busy = self.training_now()
        if busy is not None and busy.record.get("data") == str(path):
            raise Refused(409, f"run {busy.run_id} trains on {path.name}; stop it before you {what} the file",
                          running=busy.run_id)

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


def command_text(built: BuiltGraph) -> str:
    """The command that trains the same model from the graph saved as a file (Export)."""
    return f"python main.py --graph {file_stem(built.plan.graph.name)}.json"


def settings_from_graph(graph: Any, uploads_dir: str | Path = "uploads"
                        ) -> tuple[dict[str, Any], dict[str, Any] | None, str]:
    """config_run.py-style settings (and DATA) for `python main.py --graph FILE`, the graph itself when
    it is not the standard chain (the run then trains the compiled graph), and the graph's name."""
    built = Studio(Path("runs"), uploads_dir).build(graph)
    free_graph = None if built.plan.standard is not None else built.graph
    return {**built.settings, "DATA": built.data}, free_graph, built.plan.graph.name


def node_parameters(plan: Plan, model: torch.nn.Module, data: str) -> list[dict[str, Any]]:
    """Each canvas node's weights and a note on what it holds (a template's copies added together)."""
    counts: dict[str, int] = {}
    if isinstance(model, GPTModel):  # the standard chain: GPTModel's parts, by the node they stand for
        parts = {"token_embedding": model.tok_emb, "positional_encoding": model.pos_emb,
                 "transformer_block": (model.trf_blocks, model.halt_units), "norm": model.final_norm,
                 "output_head": None if model.cfg.tie_weights else model.out_head}
        for node in plan.graph.nodes.values():
            modules = parts.get(node.type)
            modules = modules if isinstance(modules, tuple) else (modules,)
            counts[node.id] = sum(p.numel() for m in modules if m is not None for p in m.parameters())
    else:
        seen: set[int] = set()
        for node_id in plan.order:
            module = model.layers[module_name(node_id)] if module_name(node_id) in model.layers else None
            fresh = [p for p in (module.parameters() if module is not None else []) if id(p) not in seen]
            seen.update(id(p) for p in fresh)
            counts[node_id] = sum(p.numel() for p in fresh)
    rows: dict[str, dict[str, Any]] = {}
    for node_id in plan.order:
        node = plan.graph.nodes[node_id]
        shown = node.shown_as or node_id
        row = rows.setdefault(shown, {"node": shown, "params": 0, "note": node_note(plan, node, data)})
        row["params"] += counts.get(node_id, 0)
    return list(rows.values())


def node_note(plan: Plan, node, data: str) -> str:
    value = plan.values.get(node.id)
    if node.type == "data":
        return data if "/" not in data else Path(data).name
    if node.type == "tokenizer":
        return f"{plan.vocab_size:,} tokens"
    if node.type == "output_head" and node.params["tie_weights"]:
        return "shares the token embedding"
    if node.type == "training_goal":
        return f"{plan.training['batch_size']} x {plan.context_length} tokens per step"
    if node.shown_as:
        return f"repeats its template ({value.shape() if value else ''})"
    return value.shape() if value is not None else ""


# ---------------------------------------------------------------------------------------
# A training run in the background, and its events
# ---------------------------------------------------------------------------------------

@dataclass
class StudioRun:
    """One run the studio trains: a thread running `pretrain`, the events it has sent, and its record
    (studio.json in its folder), which lists the run from its first moment and outlives the server."""

    run_id: str
    folder: Path
    record: dict[str, Any] = field(default_factory=dict)  # name, created, data, graph; status and error
    status: str = "saved"
    error: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    stop_request: StopRequest | None = None
    changed: threading.Condition = field(default_factory=threading.Condition)

    def emit(self, event: dict[str, Any]) -> None:
        with self.changed:
            self.events.append({"id": len(self.events) + 1, "time": time.time(), **event})
            self.changed.notify_all()

    def save(self, status: str, error: str | None = None) -> None:
        """Write the record whole or not at all, so a listing never reads half of one."""
        self.record.setdefault("created", time.time())
        self.record.update(run_id=self.run_id, status=status, error=error, updated=time.time(), pid=os.getpid(),
                           host=socket.gethostname())
        write_json(self.folder / RECORD_NAME, self.record)

    def launch(self, run) -> None:
        self.save("running")  # first: a record that cannot be written starts nothing
        self.stop_request, self.status, self.error = StopRequest(), "running", None
        threading.Thread(target=self._train, args=(run, self.stop_request), daemon=True,
                         name=f"studio-{self.run_id}").start()

    def _train(self, run, stop: StopRequest) -> None:
        try:
            _, _, metrics, _ = pretrain(run, stop=stop, on_event=self.emit)
        except Exception as err:  # noqa: BLE001 - the page shows any failure, and the server keeps serving
            message = str(err) if isinstance(err, ConfigError) else f"{type(err).__name__}: {err}"
            self._end("failed", studio_words(message), None)
            return
        shown = {k: v for k, v in metrics.items() if not isinstance(v, list)}
        shown.update(train_losses=metrics["train_losses"], val_losses=metrics["val_losses"],
                     eval_steps=metrics["eval_steps"])
        self._end("finished" if metrics["completed"] else "stopped", None, shown)

    def _end(self, status: str, error: str | None, metrics: dict[str, Any] | None) -> None:
        """Record how the run ended before saying so: a page reloaded after the news reads the same."""
        try:
            self.save(status, error)
        except ConfigError as err:  # a full disk: the run's own files are as the package left them
            note = f"the studio could not record the run's end: {studio_words(str(err))}"
            error = f"{error}; {note}" if error else note
        self.status, self.error = status, error
        self.emit({"type": "end", "status": status, "metrics": metrics, "error": error})

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
                if index >= len(self.events) and self.status in TRAINING:
                    self.changed.wait(timeout=15)
                pending = self.events[index:]
            if not pending:
                if self.status not in TRAINING:
                    return
                yield ": still training\n\n"  # a comment keeps proxies and the browser connected
                continue
            for event in pending:
                index = event["id"]
                yield f"id: {event['id']}\ndata: {json.dumps(event)}\n\n"
                if event["type"] == "end" and index == len(self.events):
                    return


def is_run_folder(path: Path) -> bool:
    return (path / RECORD_NAME).is_file() or (path / "config.json").is_file()


def read_json(path: Path) -> dict[str, Any]:
    """A run file's JSON object, or {} if it is missing or unreadable: one bad folder never breaks the list."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


class Refused(Exception):
    """A request the studio turns down: its HTTP status, a message that says what to change, and
    more fields for the page (`running`: the run that trains, which the page can offer to stop)."""

    def __init__(self, status: int, message: str, **more: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.more = status, message, more


# main.py's flags that package messages name, and what the page calls them: (field, node).
STUDIO_FIELDS = {"--epochs": ("epochs", "Training goal"), "--max-steps": ("stop after steps", "Training goal"),
                 "--lr": ("learning rate", "Training goal"), "--batch-size": ("batch size", "Training goal"),
                 "--max-length": ("context", "Training goal"), "--context-length": ("context", "Training goal"),
                 "--vocab-size": ("BPE vocabulary", "Tokenizer"), "--tokenizer": ("tokenizer", "Tokenizer"),
                 "--data": ("text", "Data")}
CLI_PHRASES = ((re.compile(r"(?:python main\.py )?--resume(?: [^\s,;)]*[/\\][^\s,;)]*?(?=[\s,;)]|\.?$|\.\s))?"),
                "Resume"),
               (re.compile(r"(?:choose another|start a new run with) --out(?: directory)?"), "start a new run"))


def studio_words(message: str) -> str:
    """A package message as the page's user reads it: main.py's flags become the studio's fields
    ('raise --epochs' becomes 'raise "epochs" on the Training goal') and its buttons."""
    for pattern, words in CLI_PHRASES:
        message = pattern.sub(words, message)
    return re.sub(r"--[a-z][a-z-]*", lambda flag: '"{}" on the {}'.format(*STUDIO_FIELDS[flag[0]])
                  if flag[0] in STUDIO_FIELDS else flag[0], message)


# ---------------------------------------------------------------------------------------
# Uploaded texts: their names, and the one way from a name to a path
# ---------------------------------------------------------------------------------------

UPLOAD_NAME_LENGTH = 100
NOT_IN_NAMES = '/\\<>:"|?*'  # folders, and what Windows refuses in a file name


class UploadNameError(Refused):
    """An upload's name the studio will not keep or look up; it says why and what to rename."""

    def __init__(self, message: str) -> None:
        super().__init__(400, message)


def check_upload_name(name: Any) -> str:
    """`name` in Unicode's composed form (macOS sends decomposed names) if it is a plain file name:
    no folders, no hidden file, no control or invisible characters, at most 100 characters."""
    if not isinstance(name, str) or not name.strip():
        raise UploadNameError("the file has no name; give it one, such as my-text.txt")
    name = unicodedata.normalize("NFC", name)
    bad = sorted({c for c in name if c in NOT_IN_NAMES or unicodedata.category(c).startswith("C")})
    if bad:
        raise UploadNameError(f"the file name {name!r} holds {', '.join(map(repr, bad))}, which an uploaded "
                              "file's name cannot; rename the file without them")
    if name.startswith("."):
        raise UploadNameError(f"the file name {name!r} starts with a dot (a hidden file); rename it")
    if name != name.strip() or name.endswith("."):
        raise UploadNameError(f"the file name {name!r} starts or ends with a space, or ends with a dot; rename it")
    if len(name) > UPLOAD_NAME_LENGTH:
        raise UploadNameError(f"the file name {name[:30]!r}... has {len(name)} characters; rename the file to "
                              f"at most {UPLOAD_NAME_LENGTH}")
    return name


def is_upload_name(name: str) -> bool:
    try:
        return check_upload_name(name) == name
    except UploadNameError:
        return False


def upload_name(filename: Any) -> str:
    """The name an uploaded file is kept under: the browser's file name without its folders (some
    send C:\\Users\\...\\text.txt), non-ASCII letters kept, checked by `check_upload_name`."""
    if not isinstance(filename, str):
        raise UploadNameError("the file has no name; give it one, such as my-text.txt")
    return check_upload_name(re.split(r"[/\\]", filename)[-1].strip())


def upload_path(uploads_dir: str | Path, name: str) -> Path:
    """The file `name` inside `uploads_dir` (which need not exist yet): the one way from an upload's
    name (a graph's "upload:<name>", a URL) to a path, so that no name leads out of the folder."""
    folder = Path(uploads_dir).resolve()
    path = folder / check_upload_name(name)
    if path.resolve().parent != folder:  # a link inside the folder that points out of it
        raise UploadNameError(f"{name!r} is a link out of the uploads folder; upload the file itself")
    return path


# ---------------------------------------------------------------------------------------
# Requests: only from this machine's own page, with bodies checked before use
# ---------------------------------------------------------------------------------------

LOOPBACK = ("127.0.0.1", "localhost", "::1")
EVERY_ADDRESS = ("0.0.0.0", "::", "")


def host_name(host: str) -> str:
    """The name in a Host header, without its port: "[::1]:5000" -> "::1", "localhost:5000" -> "localhost"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def known_host(name: str, listen: str | None) -> bool:
    """Whether a request names this studio: a loopback name, the name it listens on, or (listening on
    every address) an address or this machine's name. A name a DNS-rebinding page uses is none of them."""
    if name in LOOPBACK or listen is not None and name == host_name(listen):
        return True
    if listen not in EVERY_ADDRESS:
        return False
    try:
        ipaddress.ip_address(name)  # an address names no DNS record an attacker could rebind
        return True
    except ValueError:
        return name == socket.gethostname().lower()


def check_request(request, listen: str | None) -> None:
    """Refuse (403) a request for another host name (DNS rebinding), and a request that changes
    something unless it comes from the studio's own page: no foreign Origin, and CSRF_HEADER, which
    a page of another site cannot send (the studio grants no CORS preflight)."""
    name = host_name(request.host)
    if not known_host(name, listen):
        also = f" or {listen}" if listen not in (None, *EVERY_ADDRESS) else ""
        raise Refused(403, f"the studio answers requests for 127.0.0.1 or localhost{also}, not for {name!r}: open "
                           "it at http://127.0.0.1 with its port, or start it with python main.py --task studio "
                           f"--host {name}")
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    own, origin = request.host_url.rstrip("/"), request.headers.get("Origin")
    if origin is not None and origin.lower() != own.lower():
        raise Refused(403, f"a page at {origin} asked the studio to change something; it takes such requests "
                           f"only from its own page at {own}")
    if request.headers.get(CSRF_HEADER) != "1":
        raise Refused(403, f"a request that changes something must carry the header \"{CSRF_HEADER}: 1\" (the "
                           "studio's page sends it; pages of other sites cannot); add it to your request")


def _exact_int(text: str) -> int:
    if len(text.lstrip("-")) > 15:
        raise ValueError(f"the number {text[:20]} is too large; numbers here stay below 10^15")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} is too large")
    return value


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def json_kind(value: Any) -> str:
    """What a JSON value is, in the words of a message."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return {dict: "an object", list: "a list", str: "text"}.get(type(value), "a number")


def json_body(request, optional: bool = False) -> dict[str, Any]:
    """The request's JSON object ({} if `optional` and there is no body); anything else, from text that
    is not JSON to a list, NaN or a number too large to be exact, is a 400 that says what was sent."""
    raw = request.get_data(cache=True)
    if optional and not raw.strip():
        return {}
    if not request.is_json:
        raise Refused(400, "send the body as JSON, with the header Content-Type: application/json")
    try:
        data = json.loads(raw, parse_int=_exact_int, parse_float=_finite_float, parse_constant=_not_json)
    except (ValueError, RecursionError) as err:
        raise Refused(400, f"the body is not valid JSON ({err}); send one JSON object") from None
    if not isinstance(data, dict):
        raise Refused(400, f"the body must be a JSON object {{...}}, not {json_kind(data)}")
    return data


def number_option(data: dict[str, Any], key: str, kind: type, default: Any, low: float, high: float) -> Any:
    """A chat option: a number between `low` and `high` (a whole one if `kind` is int), or its default."""
    value = data.get(key, default)
    if value is None or value == "":
        return None if default is None or key == "top_k" else default
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        number = float(value)
        if not math.isfinite(number) or kind is int and number != int(number):
            raise ValueError
    except ValueError:
        raise Refused(400, f"{key} must be {'a whole number' if kind is int else 'a number'}, got "
                           f"{json.dumps(value)[:40]}") from None
    if not low <= number <= high:
        raise Refused(400, f"{key} must be between {low} and {high}, got {kind(number)}")
    return kind(number)


CHAT_OPTIONS = {"max_new_tokens": (int, 60, 1, 2048), "temperature": (float, 0.8, 0.0, 5.0),
                "top_k": (int, 40, 1, 1_000_000), "top_p": (float, None, 0.0, 1.0)}


def chat_request(data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The prompt and decoding options of /api/generate, each checked; which model is named too."""
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise Refused(400, "write a prompt for the model to continue (\"prompt\": text)")
    pretrained = data.get("pretrained")
    if pretrained is not None and not isinstance(pretrained, str):
        raise Refused(400, f"pretrained must be one of {', '.join(PRETRAINED_NAMES)}, not {json_kind(pretrained)}")
    if pretrained is None and not isinstance(data.get("run_id"), str):
        raise Refused(400, "say which model to chat with: \"run_id\" (one of your runs' ids, as text) or "
                           f"\"pretrained\" (one of {', '.join(PRETRAINED_NAMES)}); got run_id "
                           f"{json.dumps(data.get('run_id'))[:40]}")
    return prompt, {key: number_option(data, key, *limits) for key, limits in CHAT_OPTIONS.items()}


# ---------------------------------------------------------------------------------------
# The web app
# ---------------------------------------------------------------------------------------

def presets() -> list[dict[str, Any]]:
    """studio-tiny (a character model that trains in seconds), the example graph, and every model preset."""
    fast = dict(batch_size=8, learning_rate=3e-3, num_epochs=1, max_steps=None, eval_freq=10)
    found = [{"name": "studio-tiny", "description": "2 blocks of width 32 on The Verdict, one token per character: "
                                                    "an epoch in a few seconds, its curves drawn as it trains",
              "graph": standard_graph("studio-tiny", model_config("gpt-nano", context_length=32, drop_rate=0.0),
                                      "char", fast)},
             {"name": "example", "description": "an encoder-decoder with a convolution and two next-token losses "
                                                "(minigpt/studio/example-graph.json)", "graph": example_graph()}]
    for name in MODEL_PRESETS:
        cfg = model_config(name)
        cfg = replace(cfg, context_length=min(cfg.context_length, 128), drop_rate=0.0)
        found.append({"name": name, "description": f"the {name} preset ({cfg.architecture() or 'GPT-2 style'}), "
                                                   f"context {cfg.context_length} to train on a CPU",
                      "graph": standard_graph(name, cfg, "gpt2", dict(batch_size=8, learning_rate=4e-4, num_epochs=1,
                                                                      max_steps=None, eval_freq=5))})
    return found


def example_graph() -> dict[str, Any]:
    """The example graph that ships with the studio (the README's first studio step loads it)."""
    return json.loads(EXAMPLE_GRAPH.read_text(encoding="utf-8"))


def create_app(runs_dir: str | Path = "runs", uploads_dir: str | Path = "uploads", host: str | None = None):
    """The studio's Flask app, reading and writing only inside `runs_dir` and `uploads_dir`; `host` is
    the name it listens on, which (with the loopback names) is the only Host it answers."""
    from flask import Flask, Response, jsonify, request, send_from_directory

    studio = Studio(runs_dir, uploads_dir)
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD_BYTES
    app.json.sort_keys = False  # the schema's node types and settings keep their reading order
    app.extensions["minigpt_studio"] = studio
    app.before_request(lambda: check_request(request, host))
    answer_errors_as_json(app)
    add_upload_routes(app, studio)
    add_run_routes(app, studio)
    add_chat_route(app, studio)

    def body() -> dict[str, Any]:
        return json_body(request)

    @app.get("/")
    def index():
        return send_from_directory(STATIC, "index.html")

    @app.get("/static/<path:name>")
    def static_file(name: str):
        return send_from_directory(STATIC, name)

    @app.get("/api/schema")
    def schema():
        types = copy.deepcopy(NODE_TYPES)
        source = next(p for p in types["data"]["params"] if p["name"] == "source")
        source["choices"] = [s["source"] for s in studio.data_sources()]
        return jsonify(types=types, kinds=KIND_WORDS, version=GRAPH_VERSION)

    @app.get("/api/example")
    def example():
        return jsonify(example_graph())

    @app.post("/api/graph/upgrade")
    def graph_upgrade():  # an older studio's export (version 1) in today's form, to draw it
        return jsonify(upgrade(body()))

    @app.post("/api/graph/script")
    def graph_script():
        built = studio.build(body())
        name = file_stem(built.plan.graph.name)
        tokenizer = next(n for n in built.plan.graph.nodes.values() if n.type == "tokenizer").params["kind"]
        return Response(training_script(built.plan, str(corpus_path(built.data)), tokenizer),
                        mimetype="text/x-python",
                        headers={"Content-Disposition": f"attachment; filename=\"{name}.py\""})

    @app.get("/api/presets")
    def preset_list():
        return jsonify(presets=presets())

    @app.get("/api/data")
    def data_sources():
        return jsonify(sources=studio.data_sources())

    @app.post("/api/graph/summary")
    def graph_summary():
        return jsonify(studio.summary(body()))

    return app


def answer_errors_as_json(app) -> None:
    """Every error as JSON the page shows: what was wrong and what to change; the server keeps serving."""
    from flask import jsonify
    from werkzeug.exceptions import HTTPException

    @app.errorhandler(Refused)
    def refused(err: Refused):
        return jsonify(error=err.message, **err.more), err.status

    @app.errorhandler(GraphError)
    def bad_graph(err: GraphError):
        return jsonify(errors=err.errors), 400

    @app.errorhandler(ConfigError)
    def bad_setting(err: ConfigError):
        return jsonify(error=studio_words(str(err))), 400

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
    def unexpected(err):
        app.logger.exception("studio request failed")
        return jsonify(error=f"{type(err).__name__}: {err}"), 500


def add_upload_routes(app, studio: Studio) -> None:
    """POST /api/uploads (a multipart "file"; ?replace=1 replaces another text of that name) and
    DELETE /api/uploads/<name>."""
    from flask import jsonify, request

    @app.post("/api/uploads")
    def upload():
        file = request.files.get("file")
        if file is None or not file.filename:
            raise Refused(400, "send the text as a multipart form with a field named \"file\"")
        replace = request.args.get("replace", "0")
        if replace not in ("0", "1"):
            raise Refused(400, f"replace must be 1 (replace the upload of that name) or 0, got {replace!r}")
        name, characters, created = studio.save_upload(file.filename, file.read(), replace == "1")
        return jsonify(source=f"upload:{name}", name=name, characters=characters), 201 if created else 200

    @app.delete("/api/uploads/<name>")
    def delete_upload(name: str):
        studio.delete_upload(name)
        return jsonify(deleted=f"upload:{name}")


def add_run_routes(app, studio: Studio) -> None:
    """The runs: list, start, describe, stream, stop, resume, delete."""
    from flask import Response, jsonify, request, stream_with_context

    @app.get("/api/runs")
    def runs():
        return jsonify(runs=studio.list_runs())

    @app.post("/api/runs")
    def start_run():
        data = json_body(request)
        run = studio.start(data.get("graph", data))
        return jsonify(run_id=run.run_id, status=run.status), 201

    @app.get("/api/runs/<run_id>")
    def run_info(run_id: str):
        path = studio.run_dir(run_id)
        live = studio.runs.get(run_id)
        return jsonify(**studio.describe_run(path), config=read_json(path / "config.json") or None,
                       metrics=read_json(path / "metrics.json") or None,
                       graph=read_json(path / RECORD_NAME).get("graph"), events=len(live.events) if live else 0)

    @app.get("/api/runs/<run_id>/events")
    def run_events(run_id: str):
        studio.run_dir(run_id)
        live = studio.runs.get(run_id)
        if live is None:
            raise LookupError(f"run {run_id} was not trained by this studio session; its metrics are at "
                              f"/api/runs/{run_id}")
        after = request.headers.get("Last-Event-ID") or request.args.get("after") or "0"
        if not after.isdigit():
            raise Refused(400, "Last-Event-ID must be an event number")
        return Response(stream_with_context(live.stream(int(after))), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/api/runs/<run_id>/stop")
    def stop_run(run_id: str):
        return jsonify(status=studio.stop(run_id))

    @app.post("/api/runs/<run_id>/resume")
    def resume_run(run_id: str):
        more = json_body(request, optional=True)  # {} or more training: {"num_epochs": 3, "max_steps": 500}
        for key, value in more.items():
            if key not in ("num_epochs", "max_steps"):
                raise Refused(400, f"a resumed run keeps its settings but num_epochs and max_steps; {key!r} "
                                   "cannot change: start a new run to change it")
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise Refused(400, f"{key} must be a whole number, not {json_kind(value)}")
        run = studio.resume(run_id, more)
        return jsonify(run_id=run.run_id, status=run.status)

    @app.delete("/api/runs/<run_id>")
    def delete_run(run_id: str):
        studio.delete(run_id)
        return jsonify(deleted=run_id)


def add_chat_route(app, studio: Studio) -> None:
    """POST /api/generate: a run's model (or a pretrained one) continues a prompt, streamed as text."""
    from flask import Response, request, stream_with_context

    @app.post("/api/generate")
    def generate():
        data = json_body(request)
        prompt, options = chat_request(data)
        try:
            model, tokenizer = studio.model_for(data)
        except (ValueError, ConfigError) as err:
            raise Refused(400, studio_words(str(err))) from None
        pieces = stream_text(model, tokenizer, prompt, **options)
        try:
            first = next(pieces, "")  # errors in the prompt (e.g. unknown characters) surface here, as JSON
        except (ValueError, ConfigError) as err:
            raise Refused(400, studio_words(str(err))) from None

        def chunks() -> Iterator[str]:
            yield first
            yield from pieces

        return Response(stream_with_context(chunks()), mimetype="text/plain; charset=utf-8",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def serve(host: str = "127.0.0.1", port: int = 5000, open_browser: bool = True,
          runs_dir: str | Path = "runs", uploads_dir: str | Path = "uploads") -> None:
    """Run the studio until Ctrl-C; open it in the browser unless told not to."""
    import webbrowser

    from werkzeug.serving import make_server

    if host not in LOOPBACK:
        print(f"warning: the studio listens on {host}: anyone who can reach this address can train models "
              "and read your runs; it has no authentication. Use --host 127.0.0.1 unless you mean it.")
    try:
        server = make_server(host, port, create_app(runs_dir, uploads_dir, host), threaded=True)
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
