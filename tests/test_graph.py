"""The studio's graph compiler (minigpt.graph): the standard chain is exactly GPTModel; other
wirings (an encoder-decoder, a convolution, two losses, templates) compile, train and refuse
what cannot train with the node and port at fault; the exported script builds the same model."""

import copy
import importlib.util
import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, find_verdict
from minigpt.config import model_config
from minigpt.generation import generate
from minigpt.graph import (GraphError, GraphModel, check_graph, compile_graph, read_graph, standard_graph,
                           upgrade)
from minigpt.graph_script import training_script
from minigpt.model import GPTModel
from minigpt.config import ConfigError
from minigpt.runs import export_run, load_model, starting_point
from minigpt.settings import resolve_run_config
from minigpt.task_pretrain import pretrain

EXAMPLE = ROOT / "minigpt" / "studio" / "example-graph.json"
TRAINING = dict(batch_size=4, learning_rate=3e-3, num_epochs=1, max_steps=None, eval_freq=5)


def example():
    return json.loads(EXAMPLE.read_text(encoding="utf-8"))


def plan_of(graph, vocab_size=60):
    return check_graph(read_graph(graph), vocab_size)


def refusal(graph, vocab_size=60):
    with pytest.raises(GraphError) as caught:
        plan_of(graph, vocab_size)
    return caught.value.errors


def node(graph, node_id):
    return next(n for n in graph["nodes"] if n["id"] == node_id)


def chain(*layers, emb_dim=32, context_length=16, losses=((1.0, "head"),)):
    """data -> tokenizer -> embedding -> layers... -> head -> loss -> goal, as a graph."""
    nodes = [{"id": "data", "type": "data", "params": {}}, {"id": "tok", "type": "tokenizer", "params": {"kind": "char"}},
             {"id": "emb", "type": "token_embedding", "params": {"emb_dim": emb_dim}}]
    nodes += [{"id": f"l{i}", "type": kind, "params": params} for i, (kind, params) in enumerate(layers)]
    nodes += [{"id": "head", "type": "output_head", "params": {}},
              {"id": "goal", "type": "training_goal", "params": {"context_length": context_length, **TRAINING}}]
    ids = [n["id"] for n in nodes[2:-1]]
    edges = [{"from": "data", "to": "tok"}, {"from": "tok", "to": "emb"}]
    edges += [{"from": a, "to": b} for a, b in zip(ids, ids[1:])]
    for i, (weight, source) in enumerate(losses):
        nodes.append({"id": f"loss{i}", "type": "next_token_loss", "params": {"weight": weight}})
        edges += [{"from": source, "to": f"loss{i}"}, {"from": f"loss{i}", "to": "goal"}]
    return {"version": 2, "name": "test", "nodes": nodes, "edges": edges}


# ---------------------------------------------------------------------------------------
# The standard chain is GPTModel
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["gpt-mini", "llama-tiny", "gpt-char", "moe-tiny"])
def test_the_standard_chain_compiles_to_exactly_gptmodel(preset):
    cfg = model_config(preset, context_length=32, vocab_size=70, drop_rate=0.0)
    plan = plan_of(standard_graph(preset, cfg, "char", TRAINING), vocab_size=70)
    assert plan.standard == cfg
    torch.manual_seed(5)
    compiled = compile_graph(plan)
    torch.manual_seed(5)
    reference = GPTModel(cfg)
    assert type(compiled) is GPTModel
    ids = torch.randint(70, (2, 32))
    assert list(compiled.state_dict()) == list(reference.state_dict())
    assert torch.equal(compiled(ids), reference(ids))


@pytest.mark.parametrize("preset", ["gpt-mini", "llama-tiny", "gpt-char", "moe-tiny"])
def test_the_general_compiler_builds_gptmodel_weight_for_weight(preset):
    """GraphModel, the interpreter every other wiring runs through, on the standard chain: the same
    weights drawn in the same order as GPTModel's, and the same logits."""
    cfg = model_config(preset, context_length=32, vocab_size=70, drop_rate=0.0)
    plan = plan_of(standard_graph(preset, cfg, "char", TRAINING), vocab_size=70)
    torch.manual_seed(7)
    general = GraphModel(plan)
    torch.manual_seed(7)
    reference = GPTModel(cfg)
    ours, theirs = general.state_dict(), reference.state_dict()
    assert len(ours) == len(theirs)
    assert all(torch.equal(a, b) for a, b in zip(ours.values(), theirs.values()))
    ids = torch.randint(70, (3, 32))
    torch.testing.assert_close(general(ids), reference(ids), rtol=0, atol=1e-5)
    assert general.num_parameters() == reference.num_parameters()


def test_a_version_one_graph_still_compiles_to_the_same_model():
    cfg = model_config("gpt-mini", context_length=16, vocab_size=60, drop_rate=0.0)
    today = standard_graph("old", cfg, "char", TRAINING)
    old = copy.deepcopy(today)
    old["version"] = 1
    old["nodes"] = [n for n in old["nodes"] if n["type"] != "next_token_loss"]
    node(old, "norm").update(type="final_norm", params={})
    old["edges"] = [e for e in old["edges"] if "next_token_loss" not in (e["from"], e["to"])]
    old["edges"].append({"from": "output_head", "to": "training_goal"})
    assert upgrade(old)["version"] == 2
    assert plan_of(old).standard == plan_of(today).standard == cfg


# ---------------------------------------------------------------------------------------
# Other wirings train
# ---------------------------------------------------------------------------------------

def train_graph(graph, tmp_path, steps=24):
    """Pretrain the graph on The Verdict through the studio's own path; its metrics."""
    from minigpt.studio import Studio

    if find_verdict() is None:
        pytest.skip("the-verdict.txt is not available offline")
    graph = copy.deepcopy(graph)
    goal = next(n for n in graph["nodes"] if n["type"] == "training_goal")
    goal["params"].update(max_steps=steps, eval_freq=steps // 3, batch_size=4, learning_rate=3e-3)
    studio = Studio(tmp_path / "runs", tmp_path / "uploads")
    built = studio.build(graph)
    run = replace(studio.run_config(built, tmp_path / "runs" / "graph-run"), log_every=100)
    model, _, metrics, run_dir = pretrain(run)
    return model, metrics, run_dir


def loss_fell(metrics, vocab_size=62):
    """From ln(vocab) (a uniform guess, where a new model starts) to well below, on held-out text too."""
    return metrics["final_val_loss"] < math.log(vocab_size) - 0.8 and \
        metrics["train_losses"][-1] < metrics["train_losses"][0]


def test_the_example_encoder_decoder_with_a_convolution_and_two_losses_trains(tmp_path):
    model, metrics, run_dir = train_graph(example(), tmp_path)
    assert isinstance(model, GraphModel) and len(model.heads) == 2
    assert loss_fell(metrics), (metrics["train_losses"], metrics["val_losses"])
    # The run keeps its graph: the checkpoint loads back as the same model, and it generates.
    loaded, tokenizer, saved = load_model(run_dir)
    assert saved["graph"]["name"] == "encoder-decoder example"
    ids = torch.tensor([tokenizer.encode("I had always")])
    torch.testing.assert_close(loaded(ids), model.eval()(ids))
    out = generate(loaded, ids, max_new_tokens=5)  # no KV cache: the window runs again for each token
    window = out[:, :-1]
    assert out[0, -1] == loaded(window)[0, -1].argmax()
    # transformers has no class for it, and fine-tuning starts from a GPT: both say so.
    with pytest.raises(ConfigError, match="studio graph model"):
        export_run(run_dir, tmp_path / "hf")
    with pytest.raises(ConfigError, match="studio graph model"):
        starting_point(replace(saved_run(run_dir), checkpoint=str(run_dir)), torch.device("cpu"))


def saved_run(run_dir):
    from minigpt.config import RunConfig

    return RunConfig.from_dict(json.loads((run_dir / "config.json").read_text()))


def test_a_graph_with_a_convolution_and_a_residual_add_trains(tmp_path):
    graph = chain(("positional_encoding", {"kind": "sinusoidal"}), ("conv1d", {"out_channels": 32, "kernel_size": 4}),
                  ("linear", {"out_features": 32, "activation": "gelu"}), ("norm", {"kind": "rmsnorm"}))
    graph["nodes"].append({"id": "add", "type": "add", "params": {}})
    graph["edges"] = [e for e in graph["edges"] if e["from"] != "l3"]
    graph["edges"] += [{"from": "l3", "to": "add", "to_port": "a"}, {"from": "l0", "to": "add", "to_port": "b"},
                       {"from": "add", "to": "head"}]
    _, metrics, _ = train_graph(graph, tmp_path)
    assert loss_fell(metrics), (metrics["train_losses"], metrics["val_losses"])


def test_two_losses_add_up_with_their_weights_and_train(tmp_path):
    graph = chain(("transformer_block", {"n_layers": 1, "n_heads": 4}), ("norm", {}),
                  losses=((1.0, "head"), (0.5, "early")))
    graph["nodes"] += [{"id": "early", "type": "output_head", "params": {}}]
    graph["edges"].append({"from": "l0", "to": "early"})
    plan = plan_of(graph)
    model = compile_graph(plan).train()
    ids, targets = torch.randint(60, (2, 16)), torch.randint(60, (2, 16))
    from minigpt.train import loss_and_output

    loss, output = loss_and_output(ids, targets, model, "cpu")
    hidden = model.layers["l0"](model.layers["emb"](ids))
    by_hand = F.cross_entropy(model.layers["head"](model.layers["l1"](hidden)).flatten(0, 1), targets.flatten()) + \
        0.5 * F.cross_entropy(model.layers["early"](hidden).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss, by_hand)
    _, metrics, _ = train_graph(graph, tmp_path)
    assert loss_fell(metrics), (metrics["train_losses"], metrics["val_losses"])


def test_a_template_repeats_its_nodes_and_their_weights():
    template = {"name": "mlp block", "input": "n", "output": "a",
                "nodes": [{"id": "n", "type": "norm", "params": {}}, {"id": "f", "type": "feed_forward", "params": {}},
                          {"id": "a", "type": "linear", "params": {"out_features": 32}}],
                "edges": [{"from": "n", "to": "f"}, {"from": "f", "to": "a"}]}
    once, thrice = (chain(("template", {"template": "mlp block", "repeat": repeat})) for repeat in (1, 3))
    once["templates"] = thrice["templates"] = [template]
    base = compile_graph(plan_of(chain())).num_parameters()
    one = compile_graph(plan_of(once)).num_parameters() - base
    assert one == (2 * 32) + (32 * 128 + 128 + 128 * 32 + 32) + (32 * 32 + 32)  # norm, MLP, linear
    plan = plan_of(thrice)
    assert compile_graph(plan).num_parameters() - base == 3 * one
    assert [n.shown_as for n in plan.graph.nodes.values() if n.id.startswith("l0/")] == ["l0"] * 9
    assert {"l0/1/a", "l0/2/n"} <= set(plan.order) and plan.order.index("l0/1/a") < plan.order.index("l0/2/n")


# ---------------------------------------------------------------------------------------
# Refusals: each on the node (and port) at fault
# ---------------------------------------------------------------------------------------

def test_a_graph_without_a_loss_is_refused():
    graph = chain()
    graph["nodes"] = [n for n in graph["nodes"] if n["type"] != "next_token_loss"]
    graph["edges"] = [e for e in graph["edges"] if not e["to"].startswith("loss") and not e["from"].startswith("loss")]
    messages = " ".join(e["message"] for e in refusal(graph))
    assert "no loss" in messages and "Next-token loss" in messages


def test_a_cycle_is_refused():
    graph = chain(("linear", {"out_features": 32}), ("linear", {"out_features": 32}), ("add", {}))
    graph["edges"] = [e for e in graph["edges"] if e["to"] != "l2"]
    graph["edges"] += [{"from": "l1", "to": "l2", "to_port": "a"}, {"from": "l2", "to": "l0"}]  # l0 has two inputs now
    errors = refusal(graph)
    assert any("already has an input" in e["message"] and e["node"] == "l0" and e["port"] == "in" for e in errors)
    graph["edges"] = [e for e in graph["edges"] if not (e["from"] == "emb" and e["to"] == "l0")]
    graph["edges"].append({"from": "emb", "to": "l2", "to_port": "b"})
    errors = refusal(graph)
    assert any("cycle" in e["message"] and e["node"] in ("l0", "l1", "l2") for e in errors), errors


def test_a_decoder_without_its_encoder_input_is_refused():
    graph = chain(("decoder_layer", {"n_heads": 4}))
    [error] = refusal(graph)
    assert error["node"] == "l0" and error["port"] == "memory" and "encoder" in error["message"]


def test_a_bidirectional_encoder_cannot_feed_next_token_prediction():
    graph = chain(("encoder_layer", {"n_heads": 4}))
    [error] = refusal(graph)
    assert error["node"] == "loss0" and error["port"] == "logits"
    assert "whole window" in error["message"] and "causal" in error["message"]
    node(graph, "l0")["params"]["causal"] = True
    assert plan_of(graph).standard is None  # causal, it compiles


def test_the_example_with_a_bidirectional_encoder_is_refused_at_its_losses():
    graph = example()
    node(graph, "encoder")["params"]["causal"] = False
    assert {e["node"] for e in refusal(graph)} <= {"loss", "encoder-loss"}


@pytest.mark.parametrize("break_it, at, port, words", [
    (lambda g: node(g, "l0")["params"].update(n_heads=5), "l0", None, "do not divide the width 32"),
    (lambda g: node(g, "l0").update(type="linear", params={"out_features": 16}), "head", None, None),
    (lambda g: g["edges"].append({"from": "tok", "to": "head"}), "head", "in", "takes hidden states"),
    (lambda g: node(g, "l0").update(type="warp_drive"), "l0", None, "unknown node type"),
    (lambda g: node(g, "l0")["params"].update(ffn_hidden=10**12), "l0", None, "between 1 and"),
    (lambda g: g["nodes"].append({"id": "spare", "type": "norm", "params": {}})
     or g["edges"].append({"from": "l0", "to": "spare"}), "spare", None, "never train"),
])
def test_each_mistake_is_reported_on_its_node(break_it, at, port, words):
    graph = chain(("transformer_block", {"n_layers": 1, "n_heads": 4}))
    if at == "head":  # a tied head must match the embedding's width
        node(graph, "head")["params"]["tie_weights"] = True
    break_it(graph)
    errors = refusal(graph)
    assert any(e["node"] == at and (port is None or e["port"] == port)
               and (words is None or words in e["message"]) for e in errors), errors


def test_an_add_of_two_widths_is_refused_on_its_second_port():
    graph = chain(("linear", {"out_features": 16}), ("add", {}))
    graph["edges"] = [e for e in graph["edges"] if e["to"] != "l1"]
    graph["edges"] += [{"from": "l0", "to": "l1", "to_port": "a"}, {"from": "emb", "to": "l1", "to_port": "b"}]
    [error] = refusal(graph)
    assert (error["node"], error["port"]) == ("l1", "b") and "same width" in error["message"]


# ---------------------------------------------------------------------------------------
# The exported script
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("graph", ["example", "standard"])
def test_the_exported_script_trains_the_same_model(graph, tmp_path):
    """The script runs alone (a subprocess, PyTorch only) and its first loss is minigpt's model's on
    the same batch from the same seed."""
    verdict = find_verdict()
    if verdict is None:
        pytest.skip("the-verdict.txt is not available offline")
    if graph == "example":
        graph = example()
    else:
        cfg = model_config("gpt-char", context_length=32, drop_rate=0.0)
        graph = standard_graph("standard", cfg, "char", TRAINING)
    vocab = len(set(verdict.read_text(encoding="utf-8")))
    plan = plan_of(graph, vocab)
    script = tmp_path / "model.py"
    script.write_text(training_script(plan, str(verdict), "char", seed=11))
    done = subprocess.run([sys.executable, str(script), "--steps", "2"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    first_loss = float(done.stdout.split("step 1: loss ")[1].split(",")[0])
    assert "validation loss" in done.stdout and (tmp_path / "model.pt").is_file()
    spec = importlib.util.spec_from_file_location("exported", script)
    exported = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(exported)
    train_x, train_y, *_ = exported.load_windows()
    inputs, targets = next(exported.batches(train_x, train_y, 0))
    torch.manual_seed(11)
    model = compile_graph(plan).train()
    from minigpt.train import loss_and_output

    ours = loss_and_output(inputs, targets, model, "cpu")[0].item()
    assert math.isclose(first_loss, ours, abs_tol=1e-4), (first_loss, ours)


def test_the_script_refuses_what_it_does_not_carry():
    cfg = model_config("moe-tiny", context_length=16, vocab_size=60)
    plan = plan_of(standard_graph("moe", cfg, "char", TRAINING))
    with pytest.raises(GraphError) as caught:
        training_script(plan, "text.txt", "char")
    assert caught.value.errors[0]["field"] == "ffn"
    with pytest.raises(GraphError) as caught:
        training_script(plan_of(chain()), "text.txt", "bpe")
    assert caught.value.errors[0]["node"] == "tok"


def test_main_trains_a_graph_file(tmp_path, monkeypatch):
    import main

    if find_verdict() is None:
        pytest.skip("the-verdict.txt is not available offline")
    graph = example()
    node(graph, "goal")["params"].update(max_steps=2, eval_freq=1)
    path = tmp_path / "example.json"
    path.write_text(json.dumps(graph))
    monkeypatch.chdir(tmp_path)
    cli = main.parse_args(["--graph", str(path), "--out", str(tmp_path / "run")])
    settings, free_graph, name = main.graph_settings(cli)
    run = replace(resolve_run_config(settings, cli), graph=free_graph)
    assert run.graph["name"] == name == "encoder-decoder example" and run.model.vocab_size
    assert main.main(["--graph", str(path), "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["completed"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model_name"] == \
        "encoder-decoder example (studio graph)"


# ---------------------------------------------------------------------------------------
# A sequence-classification loss beside the next-token loss (labelled texts)
# ---------------------------------------------------------------------------------------

def reviews(path, count=240, seed=0):
    """Labelled texts whose class a word decides: "pos" reviews say good things, "neg" ones bad."""
    import random

    draw = random.Random(seed)
    words = {"pos": ["good", "great", "lovely", "fine", "kind"], "neg": ["bad", "awful", "rude", "poor", "cold"]}
    things = ["the food", "the room", "the staff", "the music", "the view", "the tea"]
    lines = []
    for _ in range(count):
        label = draw.choice(["pos", "neg"])
        text = " and ".join(f"{draw.choice(things)} was {draw.choice(words[label])}" for _ in range(2))
        lines.append(json.dumps({"text": text, "label": label}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def classifying_chain():
    graph = chain(("positional_encoding", {"kind": "learned"}), ("transformer_block", {"n_layers": 2, "n_heads": 4}),
                  ("norm", {}), context_length=48)
    graph["nodes"].append({"id": "cls", "type": "classification_loss", "params": {"weight": 0.5}})
    graph["edges"] += [{"from": "l2", "to": "cls"}, {"from": "cls", "to": "goal"}]
    return graph


def test_labelled_texts_are_padded_on_the_left_with_their_next_tokens_and_class():
    from minigpt.data import IGNORE_INDEX, labelled_sequence_collate

    inputs, targets, classes = labelled_sequence_collate([([5, 6, 7], 1), ([1, 2, 3, 4, 5, 6, 7], 0)], length=4)
    assert inputs.tolist() == [[0, 0, 5, 6], [1, 2, 3, 4]]
    assert targets.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 6, 7], [2, 3, 4, 5]]
    assert classes.tolist() == [1, 0]


def test_a_classification_loss_needs_labelled_data(tmp_path):
    from minigpt.studio import Studio

    [error] = refusal(classifying_chain())  # no labels given
    assert error["node"] == "cls" and "labelled data" in error["message"]
    if find_verdict() is None:
        pytest.skip("the-verdict.txt is not available offline")
    with pytest.raises(GraphError) as caught:  # plain text: said on the data node
        Studio(tmp_path / "runs", tmp_path / "uploads").build(classifying_chain())
    assert caught.value.errors[0]["node"] == "data" and ".jsonl" in caught.value.errors[0]["message"]
    with pytest.raises(GraphError) as caught:  # the exported script trains next-token losses only
        training_script(check_graph(read_graph(classifying_chain()), 60, ["neg", "pos"]), "t.txt", "char")
    assert caught.value.errors[0]["node"] == "cls"


def test_next_token_and_classification_losses_train_together(tmp_path):
    from minigpt.studio import Studio
    from minigpt.train import loss_and_output

    (tmp_path / "uploads").mkdir()
    reviews(tmp_path / "uploads" / "reviews.jsonl")
    graph = classifying_chain()
    node(graph, "data")["params"]["source"] = "upload:reviews.jsonl"
    node(graph, "goal")["params"].update(max_steps=150, eval_freq=50, batch_size=8, learning_rate=3e-3, num_epochs=10)
    studio = Studio(tmp_path / "runs", tmp_path / "uploads")
    built = studio.build(graph)
    assert built.plan.labels == ["neg", "pos"] and built.graph["labels"] == ["neg", "pos"]
    counts = {row["node"]: row["params"] for row in studio.summary(graph)["per_node"]}
    assert counts["cls"] == 32 * 2 + 2  # its head: width x classes, and a bias per class
    # The loss: next-token cross-entropy plus 0.5 x the classes' cross-entropy at the last position.
    model = compile_graph(built.plan).train()
    ids, targets, classes = torch.randint(30, (3, 48)), torch.randint(30, (3, 48)), torch.tensor([0, 1, 1])
    loss, _ = loss_and_output(ids, targets, model, "cpu", classes)
    hidden = model.layers["l2"](model.layers["l1"](model.layers["l0"](model.layers["emb"](ids))))
    by_hand = F.cross_entropy(model.layers["head"](hidden).flatten(0, 1), targets.flatten()) + \
        0.5 * F.cross_entropy(model.layers["cls"](hidden[:, -1]), classes)
    torch.testing.assert_close(loss, by_hand)

    node(graph, "cls")["params"]["weight"] = 1.0
    run = replace(studio.run_config(studio.build(graph), tmp_path / "runs" / "labelled"), log_every=100)
    trained, tokenizer, metrics, run_dir = pretrain(run)
    assert metrics["val_accuracy"] >= 0.9  # chance: 0.5
    assert metrics["final_val_loss"] < metrics["val_losses"][0]
    loaded, _, saved = load_model(run_dir)  # the classes travel with the graph
    assert saved["graph"]["labels"] == ["neg", "pos"] and isinstance(loaded, GraphModel)
    text = torch.tensor([tokenizer.encode("the food was lovely")])
    assert loaded(text, details=True).classes[0][1].argmax().item() == 1  # "pos"


def test_a_template_must_be_joined_by_in_and_out_ports():
    graph = chain(("template", {"template": "sum", "repeat": 1}))
    graph["templates"] = [{"name": "sum", "input": "a", "output": "a",
                           "nodes": [{"id": "a", "type": "add"}], "edges": []}]
    errors = refusal(graph)
    assert any("template 'sum'" in e["message"] and "input port 'in'" in e["message"] for e in errors), errors
