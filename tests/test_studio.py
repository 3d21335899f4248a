"""The studio's HTTP API, through Flask's test client: summaries that equal the package's counts,
bad graphs and bad requests answered with JSON that names the node or field, a training run
whose streamed losses are the run's metrics.json, Stop and resume, chat, and the settings
and command that rebuild the same model outside the studio."""

import copy
import io
from dataclasses import replace
import json
import time
import types

import pytest
import torch

import main
from minigpt.config import MODEL_PRESETS, GPTConfig, model_config
from minigpt.settings import resolve_resume_config, resolve_run_config, settings_from_module
from minigpt.model import GPTModel
from minigpt.studio import MAX_UPLOAD_BYTES, create_app, presets
from minigpt.task_pretrain import pretrain

pytestmark = pytest.mark.xdist_group("studio")


@pytest.fixture
def client(tmp_path, verdict_text):
    app = create_app(tmp_path / "runs", tmp_path / "uploads")
    return app.test_client()


def preset(name):
    return copy.deepcopy(next(p["graph"] for p in presets() if p["name"] == name))


def node(graph, kind):
    return next(n for n in graph["nodes"] if n["type"] == kind)


def meta_parameters(config):
    with torch.device("meta"):
        return GPTModel(GPTConfig(**config)).num_parameters()


def test_every_preset_summary_counts_what_the_package_builds(client):
    names = [p["name"] for p in client.get("/api/presets").get_json()["presets"]]
    assert {"studio-tiny", "gpt-mini", "gpt2-small", "llama-tiny", "moe-tiny"} <= set(names)
    for name in names:
        response = client.post("/api/graph/summary", json=preset(name))
        assert response.status_code == 200, (name, response.get_json())
        summary = response.get_json()
        assert summary["params"] == meta_parameters(summary["config"]), name
        if name in MODEL_PRESETS:  # the preset itself, at the studio's context of at most 128
            preset_cfg = model_config(name)
            preset_cfg = replace(preset_cfg, context_length=min(preset_cfg.context_length, 128), drop_rate=0.0)
            with torch.device("meta"):
                assert summary["params"] == GPTModel(preset_cfg).num_parameters(), name
        assert sum(n["params"] for n in summary["per_node"]) == summary["params"], name
        assert summary["memory"]["training_step_mib"] > summary["memory"]["weights_mib"] > 0
        assert summary["flops_per_token"] > 0


def test_tying_the_head_and_changing_the_blocks_move_the_count_as_the_model_does(client):
    graph = preset("gpt-mini")
    before = client.post("/api/graph/summary", json=graph).get_json()
    node(graph, "output_head")["params"]["tie_weights"] = True
    node(graph, "transformer_block")["params"]["n_layers"] = 6
    after = client.post("/api/graph/summary", json=graph).get_json()
    assert after["params"] == meta_parameters(after["config"])
    assert after["config"]["tie_weights"] and after["config"]["n_layers"] == 6
    assert after["params_untied"] - after["params"] == 50257 * 128
    assert before["params_tied"] + 2 * (after["per_node"][4]["params"] // 6) == after["params"]


def errors_of(response):
    assert response.status_code == 400, response.get_json()
    return response.get_json()["errors"]


def test_bad_graphs_get_400_naming_the_node_and_the_server_keeps_serving(client):
    graph = preset("gpt-mini")
    cycle = copy.deepcopy(graph)
    cycle["edges"].append({"from": "training_goal", "to": "data"})
    assert any(e["node"] == "training_goal" for e in errors_of(client.post("/api/graph/summary", json=cycle)))
    back = copy.deepcopy(graph)
    back["edges"][3] = {"from": "positional_encoding", "to": "tokenizer"}
    assert any("cycle" in e["message"] for e in errors_of(client.post("/api/graph/summary", json=back)))

    missing = copy.deepcopy(graph)
    missing["nodes"] = [n for n in missing["nodes"] if n["type"] != "final_norm"]
    missing["edges"] = [e for e in missing["edges"] if "final_norm" not in (e["from"], e["to"])]
    messages = [e["message"] for e in errors_of(client.post("/api/graph/summary", json=missing))]
    assert any("no Final norm node" in m for m in messages)

    heads = copy.deepcopy(graph)
    node(heads, "transformer_block")["params"]["n_heads"] = 5
    [error] = errors_of(client.post("/api/graph/summary", json=heads))
    assert error["node"] == "transformer_block" and error["field"] == "n_heads" and "divide" in error["message"]

    unknown = copy.deepcopy(graph)
    unknown["nodes"].append({"id": "x", "type": "convolution", "params": {}})
    [error] = errors_of(client.post("/api/graph/summary", json=unknown))
    assert error["node"] == "x" and "unknown node type" in error["message"]

    setting = copy.deepcopy(graph)
    node(setting, "token_embedding")["params"]["emb_dim"] = "wide"
    [error] = errors_of(client.post("/api/graph/summary", json=setting))
    assert error["node"] == "token_embedding" and error["field"] == "emb_dim"

    for source in ("../../etc/passwd", "upload:../config_run.py", "upload:/etc/passwd", "/etc/passwd"):
        escape = copy.deepcopy(graph)
        node(escape, "data")["params"]["source"] = source
        [error] = errors_of(client.post("/api/graph/summary", json=escape))
        assert error["node"] == "data" and error["field"] == "source", source

    malformed = client.post("/api/graph/summary", data="{not json", content_type="application/json")
    assert malformed.status_code == 400 and "JSON" in malformed.get_json()["error"]
    assert client.post("/api/graph/summary", json=[1, 2]).status_code == 400
    assert client.post("/api/graph/summary", json={"nodes": "many"}).status_code == 400
    assert client.get("/api/runs/..%2Fetc").status_code == 404
    assert client.get("/static/../studio.py").status_code == 404
    assert client.get("/api/presets").status_code == 200     # still serving


def test_uploads_are_checked_kept_inside_their_folder_and_usable_as_data(client, tmp_path, verdict_text):
    big = io.BytesIO(b"a" * (MAX_UPLOAD_BYTES + 1))
    response = client.post("/api/uploads", data={"file": (big, "big.txt")}, content_type="multipart/form-data")
    assert response.status_code == 413 and "larger than" in response.get_json()["error"]
    response = client.post("/api/uploads", data={"file": (io.BytesIO(b"\xff\xfe\x00bad"), "bad.txt")},
                           content_type="multipart/form-data")
    assert response.status_code == 400 and "UTF-8" in response.get_json()["error"]
    text = "abcabc hello studio\n" * 50
    response = client.post("/api/uploads", data={"file": (io.BytesIO(text.encode()), "../../my text.txt")},
                           content_type="multipart/form-data")
    assert response.status_code == 201
    source = response.get_json()["source"]
    assert source == "upload:my-text.txt" and (tmp_path / "uploads" / "my-text.txt").read_text() == text
    assert source in [s["source"] for s in client.get("/api/data").get_json()["sources"]]
    graph = preset("studio-tiny")
    node(graph, "data")["params"]["source"] = source
    summary = client.post("/api/graph/summary", json=graph).get_json()
    assert summary["vocab_size"] == len(set(text))


def read_events(client, run_id, limit=10_000):
    events = []
    response = client.get(f"/api/runs/{run_id}/events")
    for chunk in response.response:
        for line in (chunk.decode() if isinstance(chunk, bytes) else chunk).splitlines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
        if events and events[-1]["type"] == "end" or len(events) >= limit:
            break
    return events


def test_a_tiny_run_streams_the_losses_its_metrics_file_holds(client, tmp_path):
    response = client.post("/api/runs", json={"graph": preset("studio-tiny")})
    assert response.status_code == 201
    run_id = response.get_json()["run_id"]
    events = read_events(client, run_id)
    assert events[0]["type"] == "start" and events[-1]["type"] == "end" and events[-1]["status"] == "finished"
    steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, len(steps) + 1))  # every step, for the chart
    metrics = json.loads((tmp_path / "runs" / run_id / "metrics.json").read_text())
    evaluated = [e for e in steps if "val_loss" in e]
    assert [e["step"] for e in evaluated] == metrics["eval_steps"]
    assert [e["train_loss"] for e in evaluated] == metrics["train_losses"]
    assert [e["val_loss"] for e in evaluated] == metrics["val_losses"]
    assert [e["batch_loss"] for e in steps] == metrics["batch_losses"]
    assert events[-1]["metrics"]["final_val_loss"] == metrics["final_val_loss"]
    listed = {r["run_id"]: r for r in client.get("/api/runs").get_json()["runs"]}
    assert listed[run_id]["status"] == "finished" and listed[run_id]["steps"] == metrics["steps"]
    # A run directory like main.py's: it loads for generation, and the chat streams its text.
    response = client.post("/api/generate", json={"run_id": run_id, "prompt": "I had", "max_new_tokens": 12,
                                                   "temperature": 0})
    assert response.status_code == 200 and response.mimetype == "text/plain"
    assert 0 < len(response.get_data(as_text=True)) <= 12
    assert client.post("/api/generate", json={"run_id": run_id, "prompt": ""}).status_code == 400
    assert client.post("/api/generate", json={"run_id": run_id, "prompt": "x", "top_p": 3}).status_code == 400
    assert client.post("/api/generate", json={"run_id": "nope", "prompt": "x"}).status_code == 404


def test_stop_keeps_a_checkpoint_that_resume_continues(client, tmp_path):
    graph = preset("studio-tiny")
    node(graph, "training_goal")["params"].update(max_steps=100_000, num_epochs=1000)
    run_id = client.post("/api/runs", json={"graph": graph}).get_json()["run_id"]
    assert client.post("/api/runs", json={"graph": graph}).status_code == 409  # one run at a time
    events = read_events(client, run_id, limit=4)
    assert events[-1]["type"] == "step"
    assert client.post(f"/api/runs/{run_id}/stop").get_json()["status"] == "stopping"
    deadline = time.time() + 60
    while client.get(f"/api/runs/{run_id}").get_json()["status"] == "stopping" and time.time() < deadline:
        time.sleep(0.1)
    info = client.get(f"/api/runs/{run_id}").get_json()
    assert info["status"] == "stopped" and not info["metrics"]["completed"]
    stopped_at = info["metrics"]["steps"]
    run_dir = tmp_path / "runs" / run_id
    assert (run_dir / "checkpoint.pt").is_file()
    # main.py's --resume continues it, as for any run.
    saved = json.loads((run_dir / "config.json").read_text())
    _, _, metrics, _ = pretrain(resolve_resume_config(saved, {"resume": str(run_dir), "max_steps": stopped_at + 3}))
    assert metrics["completed"] and metrics["steps"] == stopped_at + 3


def test_the_settings_and_the_command_rebuild_the_same_model(client, tmp_path, monkeypatch):
    graph = preset("llama-tiny")
    node(graph, "transformer_block")["params"].update(n_layers=3, ffn_hidden=200)
    node(graph, "output_head")["params"]["tie_weights"] = True
    summary = client.post("/api/graph/summary", json=graph).get_json()
    # config_run.py pasted with the settings text, then python main.py
    module = types.ModuleType("config_run")
    exec(summary["settings"], module.__dict__)
    run = resolve_run_config(settings_from_module(module), {})
    assert run.train.batch_size == 8 and run.tokenizer == "gpt2"
    with torch.device("meta"):
        assert GPTModel(run.model).num_parameters() == summary["params"]
    # The exported graph with the command: python main.py --graph llama-tiny.json
    assert summary["command"] == "python main.py --graph llama-tiny.json"
    path = tmp_path / "llama-tiny.json"
    path.write_text(json.dumps(graph))
    monkeypatch.chdir(tmp_path)
    cli = main.parse_args(["--graph", str(path)])
    run = resolve_run_config(main.graph_settings(cli), cli)
    with torch.device("meta"):
        assert GPTModel(run.model).num_parameters() == summary["params"]


def test_studio_flags_are_checked(capsys):
    assert main.main(["--task", "studio", "--epochs", "3"]) == 2
    assert "--task studio takes --host, --port and --no-browser only" in capsys.readouterr().err
    assert main.main(["--port", "5001"]) == 2
    assert "only apply to --task studio" in capsys.readouterr().err
