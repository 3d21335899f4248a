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
import unicodedata
from urllib.parse import quote

import pytest
import torch

import main
import minigpt.studio as studio_module
from minigpt.config import MODEL_PRESETS, ConfigError, GPTConfig, model_config
from minigpt.settings import resolve_resume_config, resolve_run_config, settings_from_module
from minigpt.graph import build_graph_model
from minigpt.model import GPTModel
from minigpt.studio import (CSRF_HEADER, MAX_UPLOAD_BYTES, RECORD_NAME, UploadNameError, create_app, presets,
                            studio_words, upload_name, upload_path)
from minigpt.task_pretrain import pretrain

pytestmark = pytest.mark.xdist_group("studio")


@pytest.fixture
def client(tmp_path, verdict_text):
    return studio_client(tmp_path)


def studio_client(tmp_path):
    """A client like the page: every request that changes something carries CSRF_HEADER."""
    client = create_app(tmp_path / "runs", tmp_path / "uploads").test_client()
    client.environ_base["HTTP_" + CSRF_HEADER.upper().replace("-", "_")] = "1"
    return client


def preset(name):
    return copy.deepcopy(next(p["graph"] for p in presets() if p["name"] == name))


def node(graph, kind):
    return next(n for n in graph["nodes"] if n["type"] == kind)


def meta_parameters(config):
    with torch.device("meta"):
        return GPTModel(GPTConfig(**config)).num_parameters()


def test_every_preset_summary_counts_what_the_package_builds(client):
    names = [p["name"] for p in client.get("/api/presets").get_json()["presets"]]
    assert {"studio-tiny", "example", "gpt-mini", "gpt2-small", "llama-tiny", "moe-tiny"} <= set(names)
    for name in names:
        response = client.post("/api/graph/summary", json=preset(name))
        assert response.status_code == 200, (name, response.get_json())
        summary = response.get_json()
        if summary["standard"]:
            assert summary["params"] == meta_parameters(summary["config"]), name
        else:  # the example: the compiled graph, counted by the package directly
            with torch.device("meta"):
                model = build_graph_model(preset(name), summary["vocab_size"])
            assert summary["params"] == sum(p.numel() for p in model.parameters()) and summary["config"] is None
        if name in MODEL_PRESETS:  # the preset itself, at the studio's context of at most 128
            preset_cfg = model_config(name)
            preset_cfg = replace(preset_cfg, context_length=min(preset_cfg.context_length, 128), drop_rate=0.0)
            with torch.device("meta"):
                assert summary["params"] == GPTModel(preset_cfg).num_parameters(), name
        assert sum(n["params"] for n in summary["per_node"]) == summary["params"], name
        assert {n["id"] for n in preset(name)["nodes"]} == {n["node"] for n in summary["per_node"]}
        assert len(summary["edges"]) == len(preset(name)["edges"]) and all(e["shape"] for e in summary["edges"])
        assert summary["memory"]["training_step_mib"] > summary["memory"]["weights_mib"] > 0
        assert summary["flops_per_token"] > 0


def test_tying_the_head_and_changing_the_blocks_move_the_count_as_the_model_does(client):
    graph = preset("gpt-mini")
    before = client.post("/api/graph/summary", json=graph).get_json()
    node(graph, "output_head")["params"]["tie_weights"] = True
    tied = client.post("/api/graph/summary", json=graph).get_json()
    assert before["params"] - tied["params"] == 50257 * 128
    node(graph, "transformer_block")["params"]["n_layers"] = 6
    after = client.post("/api/graph/summary", json=graph).get_json()
    assert after["params"] == meta_parameters(after["config"])
    assert after["config"]["tie_weights"] and after["config"]["n_layers"] == 6
    blocks = next(n["params"] for n in after["per_node"] if n["node"] == "transformer_block")
    assert tied["params"] + 2 * (blocks // 6) == after["params"]
    shapes = {(e["from"], e["to"]): e["shape"] for e in after["edges"]}
    assert shapes[("transformer_block", "norm")] == "B x T x 128"
    assert shapes[("output_head", "next_token_loss")] == "B x T x 50257"


def errors_of(response):
    assert response.status_code == 400, response.get_json()
    return response.get_json()["errors"]


def test_bad_graphs_get_400_naming_the_node_and_the_server_keeps_serving(client):
    graph = preset("gpt-mini")
    out_of_goal = copy.deepcopy(graph)
    out_of_goal["edges"].append({"from": "training_goal", "to": "data"})
    assert any(e["node"] == "training_goal" for e in errors_of(client.post("/api/graph/summary", json=out_of_goal)))
    back = copy.deepcopy(graph)
    back["edges"][2] = {"from": "transformer_block", "to": "positional_encoding"}
    assert any("cycle" in e["message"] for e in errors_of(client.post("/api/graph/summary", json=back)))
    wrong_kind = copy.deepcopy(graph)
    wrong_kind["edges"][3] = {"from": "positional_encoding", "to": "tokenizer"}
    [error, *_] = errors_of(client.post("/api/graph/summary", json=wrong_kind))
    assert error["node"] == "tokenizer" and error["port"] == "text" and "hidden states" in error["message"]

    missing = copy.deepcopy(graph)
    missing["nodes"] = [n for n in missing["nodes"] if n["type"] != "training_goal"]
    missing["edges"] = [e for e in missing["edges"] if "training_goal" not in (e["from"], e["to"])]
    messages = [e["message"] for e in errors_of(client.post("/api/graph/summary", json=missing))]
    assert any("no Training goal node" in m for m in messages)

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
    response = client.post("/api/uploads", data={"file": (io.BytesIO(text.encode()), "../../my-text.txt")},
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
    settings, free_graph, name = main.graph_settings(cli)
    assert free_graph is None and name == "llama-tiny"  # the standard chain trains as GPTModel, from its config
    run = resolve_run_config(settings, cli)
    with torch.device("meta"):
        assert GPTModel(run.model).num_parameters() == summary["params"]


def test_studio_flags_are_checked(capsys):
    assert main.main(["--task", "studio", "--epochs", "3"]) == 2
    assert "--task studio takes --host, --port and --no-browser only" in capsys.readouterr().err
    assert main.main(["--port", "5001"]) == 2
    assert "only apply to --task studio" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# Runs from their first moment, across a restart of the server, until deleted
# ---------------------------------------------------------------------------------------

def wait_until_trained(client, run_id, timeout=60):
    deadline = time.time() + timeout
    while client.get(f"/api/runs/{run_id}").get_json()["status"] in ("running", "stopping"):
        assert time.time() < deadline, f"run {run_id} still training after {timeout} s"
        time.sleep(0.05)
    return client.get(f"/api/runs/{run_id}").get_json()


def test_a_run_is_listed_from_its_first_moment_refuses_a_second_and_stays_listed_when_it_fails(
        client, tmp_path, monkeypatch):
    def pretrain_until_stopped(run, stop, on_event):  # a first epoch that lasts until Stop, then fails
        while not stop.requested:
            time.sleep(0.01)
        raise ConfigError("the run already finished 5 steps (1 epochs); raise --epochs (or --max-steps, if it "
                          "set one) to train it further.")

    monkeypatch.setattr(studio_module, "pretrain", pretrain_until_stopped)
    graph = preset("studio-tiny")
    run_id = client.post("/api/runs", json={"graph": graph}).get_json()["run_id"]
    folder = tmp_path / "runs" / run_id
    assert not (folder / "config.json").exists()  # the package has written nothing yet
    listed = {r["run_id"]: r for r in client.get("/api/runs").get_json()["runs"]}
    assert listed[run_id]["status"] == "running"
    assert client.get(f"/api/runs/{run_id}").get_json()["graph"] == graph
    second = client.post("/api/runs", json={"graph": graph})
    assert second.status_code == 409 and second.get_json()["running"] == run_id
    assert f"run {run_id} is still training" in second.get_json()["error"] and "stop" in second.get_json()["error"]
    refused = client.delete(f"/api/runs/{run_id}")
    assert refused.status_code == 409 and refused.get_json()["running"] == run_id and folder.is_dir()
    assert client.post(f"/api/runs/{run_id}/stop").get_json()["status"] == "stopping"
    info = wait_until_trained(client, run_id)
    assert info["status"] == "failed" and '"epochs" on the Training goal' in info["error"]
    assert "--" not in info["error"]
    # The record keeps the failure: a restarted server lists the run with its error.
    [again] = studio_client(tmp_path).get("/api/runs").get_json()["runs"]
    assert again["run_id"] == run_id and again["status"] == "failed" and again["error"] == info["error"]
    assert json.loads((folder / RECORD_NAME).read_text())["status"] == "failed"
    assert client.post(f"/api/runs/{run_id}/stop").status_code == 409  # nothing to stop
    assert client.delete(f"/api/runs/{run_id}").get_json() == {"deleted": run_id}
    assert not folder.exists() and client.get("/api/runs").get_json()["runs"] == []
    assert client.get(f"/api/runs/{run_id}").status_code == 404


def test_a_stopped_run_resumes_after_a_restart_and_a_finished_one_says_how_to_go_on(client, tmp_path):
    graph = preset("studio-tiny")
    node(graph, "training_goal")["params"].update(max_steps=100_000, num_epochs=1000)
    run_id = client.post("/api/runs", json={"graph": graph}).get_json()["run_id"]
    assert read_events(client, run_id, limit=3)[-1]["type"] == "step"
    client.post(f"/api/runs/{run_id}/stop")
    stopped_at = wait_until_trained(client, run_id)["steps"]
    # A new server on the same folders: the run is stopped and resumable from its folder alone.
    client = studio_client(tmp_path)
    [listed] = client.get("/api/runs").get_json()["runs"]
    assert listed["status"] == "stopped" and listed["resumable"] and listed["steps"] == stopped_at
    # A server killed mid-run left its record saying "running": with a checkpoint, that is stopped too.
    record_file = tmp_path / "runs" / run_id / RECORD_NAME
    record_file.write_text(json.dumps({**json.loads(record_file.read_text()), "status": "running"}))
    [listed] = client.get("/api/runs").get_json()["runs"]
    assert listed["status"] == "stopped" and listed["resumable"] and "closed" in listed["note"]
    response = client.post(f"/api/runs/{run_id}/resume", json={"max_steps": stopped_at + 2})
    assert response.status_code == 200 and response.get_json()["status"] == "running"
    events = read_events(client, run_id)
    assert events[-1]["status"] == "finished" and events[-1]["metrics"]["steps"] == stopped_at + 2
    finished = client.post(f"/api/runs/{run_id}/resume", json={})
    assert finished.status_code == 409, finished.get_json()
    message = finished.get_json()["error"]
    assert f"finished all its {stopped_at + 2} steps" in message and '"epochs"' in message and "--" not in message


def test_a_run_whose_server_died_before_its_first_checkpoint_is_listed_as_failed(client, tmp_path):
    folder = tmp_path / "runs" / "studio-gone-1"
    folder.mkdir(parents=True)
    (folder / RECORD_NAME).write_text(json.dumps({"run_id": folder.name, "status": "running", "created": 1.0}))
    [run] = client.get("/api/runs").get_json()["runs"]
    assert run["status"] == "failed" and "nothing to resume" in run["error"] and not run["resumable"]
    response = client.post(f"/api/runs/{folder.name}/resume", json={})
    assert response.status_code == 409 and "no checkpoint" in response.get_json()["error"]


def test_package_messages_name_the_studio_fields_not_main_py_flags():
    text = studio_words("raise --epochs (or --max-steps, if it set one) to train it further.")
    assert text == ('raise "epochs" on the Training goal (or "stop after steps" on the Training goal, if it set '
                    'one) to train it further.')
    assert studio_words("python main.py --resume /tmp/runs/a continues from it.") == "Resume continues from it."
    assert studio_words("Make room, or choose another --out directory.") == "Make room, or start a new run."
    assert studio_words("use --task pretrain") == "use --task pretrain"  # no studio field: as it was


# ---------------------------------------------------------------------------------------
# Safety: only the studio's own page changes anything; every bad body is a 400
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, url", [("post", "/api/uploads"), ("post", "/api/runs"),
                                         ("post", "/api/runs/studio-x-1/resume"), ("post", "/api/generate"),
                                         ("delete", "/api/runs/studio-x-1"), ("delete", "/api/uploads/a.txt")])
def test_a_page_of_another_site_cannot_change_anything(client, tmp_path, method, url):
    foreign = getattr(client, method)(url, headers={"Origin": "http://evil.example"})
    assert foreign.status_code == 403 and "evil.example" in foreign.get_json()["error"]
    # A plain form from another site carries no custom header (and some browsers send no Origin).
    form = getattr(create_app(tmp_path / "runs", tmp_path / "uploads").test_client(), method)(
        url, data={"file": (io.BytesIO(b"some text"), "a.txt")}, content_type="multipart/form-data")
    assert form.status_code == 403 and CSRF_HEADER in form.get_json()["error"]
    assert not (tmp_path / "uploads").exists() and not (tmp_path / "runs").exists()


def test_the_page_itself_may_send_its_origin(client):
    response = client.post("/api/uploads", data={"file": (io.BytesIO(b"some text"), "a.txt")},
                           content_type="multipart/form-data", headers={"Origin": "http://localhost"})
    assert response.status_code == 201


def test_only_the_loopback_names_and_the_listening_name_are_answered(tmp_path):
    def status(host, listen=None):
        app = create_app(tmp_path / "runs", tmp_path / "uploads", listen)
        return app.test_client().get("/api/runs", headers={"Host": host}).status_code

    for host in ("evil.example", "evil.example:5000", "127.0.0.1.evil.example:5000"):
        assert status(host) == 403, host
    response = create_app(tmp_path / "r", tmp_path / "u").test_client().get("/", headers={"Host": "evil.example"})
    assert response.status_code == 403 and "evil.example" in response.get_json()["error"]
    for host in ("localhost", "localhost:5000", "127.0.0.1:8080", "[::1]:5000"):
        assert status(host) == 200, host
    assert status("studio.lan:5000", "studio.lan") == 200 and status("evil.example", "studio.lan") == 403
    assert status("192.168.1.20:5000", "0.0.0.0") == 200 and status("evil.example:5000", "0.0.0.0") == 403


MALFORMED_BODIES = [
    ("/api/graph/summary", "null"), ("/api/graph/summary", "[1, 2]"), ("/api/graph/summary", "{not json"),
    ("/api/graph/summary", '{"nodes": [], "x": 1e999}'), ("/api/graph/summary", '{"x": 123456789012345678901}'),
    ("/api/graph/summary", '{"x": NaN}'), ("/api/graph/summary", "[" * 100_000),
    ("/api/runs", "null"), ("/api/runs", '"x"'), ("/api/runs", "5"), ("/api/runs", '{"graph": "x"}'),
    ("/api/runs", '{"graph": [1]}'), ("/api/runs", '{"graph": {"nodes": 5}}'), ("/api/runs", b"\xff\xfe{"),
    ("/api/generate", '{"run_id": 5, "prompt": "x"}'), ("/api/generate", "[1, 2]"), ("/api/generate", '{"prompt": 3}'),
    ("/api/generate", '{"prompt": "x"}'), ("/api/generate", '{"pretrained": 5, "prompt": "x"}'),
    ("/api/generate", '{"run_id": "r", "prompt": "x", "max_new_tokens": true}'),
    ("/api/generate", '{"run_id": "r", "prompt": "x", "max_new_tokens": 2.5}'),
    ("/api/generate", '{"run_id": "r", "prompt": "x", "top_k": [1]}'),
    ("/api/generate", '{"run_id": "r", "prompt": "x", "temperature": "hot"}'),
    ("/api/runs/studio-x-1/resume", "[1]"), ("/api/runs/studio-x-1/resume", '{"max_steps": "many"}'),
    ("/api/runs/studio-x-1/resume", '{"num_epochs": 1.5}'), ("/api/runs/studio-x-1/resume", '{"learning_rate": 1}'),
]


@pytest.mark.parametrize("url, body", MALFORMED_BODIES)
def test_every_malformed_body_gets_a_400_that_says_what_is_wrong(client, url, body):
    response = client.post(url, data=body, content_type="application/json")
    assert response.status_code == 400, response.get_json()
    answer = response.get_json()
    assert answer.get("error") or answer.get("errors")


@pytest.mark.parametrize("url", ["/api/graph/summary", "/api/runs", "/api/generate", "/api/uploads"])
def test_a_body_of_the_wrong_kind_gets_a_400(client, url):
    form = client.post(url, data={"graph": "x"}, content_type="application/x-www-form-urlencoded")
    assert form.status_code == 400 and form.get_json()["error"]


# ---------------------------------------------------------------------------------------
# Uploads keep their names and are never overwritten unasked
# ---------------------------------------------------------------------------------------

def test_uploads_keep_their_names_and_are_replaced_or_deleted_only_when_asked(client, tmp_path):
    def send(name, text, query=""):
        return client.post("/api/uploads" + query, data={"file": (io.BytesIO(text.encode()), name)},
                           content_type="multipart/form-data")

    def sources():
        return [s["source"] for s in client.get("/api/data").get_json()["sources"]]

    stored = tmp_path / "uploads" / "名前.txt"
    response = send("名前.txt", "一二三 text\n")
    assert response.status_code == 201 and response.get_json()["source"] == "upload:名前.txt"
    assert stored.read_text(encoding="utf-8") == "一二三 text\n" and "upload:名前.txt" in sources()
    assert send("../me/名前.txt", "一二三 text\n").status_code == 200  # the same text: nothing changes
    clash = send("名前.txt", "other text")
    assert clash.status_code == 409 and "?replace=1" in clash.get_json()["error"]
    assert stored.read_text(encoding="utf-8") == "一二三 text\n"
    assert send("名前.txt", "other text", "?replace=1").status_code == 200
    assert stored.read_text(encoding="utf-8") == "other text"
    assert send(unicodedata.normalize("NFD", "café.txt"), "x").get_json()["source"] == "upload:café.txt"
    for bad in (".env", "a\u202etxt.exe", "x" * 101 + ".txt", "a:b.txt", ".."):
        response = send(bad, "some text")
        assert response.status_code == 400 and "rename" in response.get_json()["error"], bad
    assert client.delete("/api/uploads/" + quote("名前.txt")).get_json() == {"deleted": "upload:名前.txt"}
    assert not stored.exists() and "upload:名前.txt" not in sources()
    assert client.delete("/api/uploads/" + quote("名前.txt")).status_code == 404
    assert client.delete("/api/uploads/.env").status_code == 400


def test_upload_names_are_plain_file_names_inside_the_uploads_folder(tmp_path):
    assert upload_name("../../a/名前.txt") == "名前.txt"
    assert upload_name("C:\\Users\\me\\notes 1.txt") == "notes 1.txt"
    for bad in ("", "..", ".env", "a\x00b.txt", "a\nb.txt", "x" * 101, "a|b.txt", "ends.", None):
        with pytest.raises(UploadNameError):
            upload_name(bad)
    assert upload_path(tmp_path, "名前.txt") == tmp_path.resolve() / "名前.txt"
    for bad in ("../x.txt", "a/b.txt", "a\\b.txt", "/etc/passwd"):
        with pytest.raises(UploadNameError):
            upload_path(tmp_path, bad)
    (tmp_path / "out.txt").symlink_to(tmp_path.parent)
    with pytest.raises(UploadNameError, match="link"):
        upload_path(tmp_path, "out.txt")
