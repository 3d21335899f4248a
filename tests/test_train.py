"""Loss, schedule, reproducibility, run directories, checkpoints, and exact resume after Ctrl-C."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minigpt.config import ConfigError, TrainConfig
from minigpt.settings import resolve_resume_config, resolve_run_config
from minigpt.model import GPTModel
from minigpt.tokenizer import BPETokenizer
from minigpt.runs import choose_run_dir, load_checkpoint, load_model
from minigpt.task_pretrain import pretrain
from minigpt.train import calc_loss_batch, learning_rate_at

ROOT = Path(__file__).resolve().parent.parent

# A run small enough for tests: character-level, a 2-layer model, dropout on, warm-up + cosine.
TINY_SETTINGS = dict(
    QUICK_MODE=False, CUSTOM_MODE=True, MODEL="gpt-nano", TOKENIZER="char", SEED=7, LOG_EVERY=1000,
    custom_params=dict(num_epochs=2, batch_size=4, learning_rate=3e-3, eval_freq=10, eval_iter=2,
                       max_length=32, stride=32, start_context="The ", lr_schedule="cosine",
                       warmup_steps=5, grad_clip=1.0,
                       model_overrides=dict(emb_dim=32, n_heads=2, n_layers=2, context_length=32,
                                            drop_rate=0.1)))


def tiny_run(tmp_path, name, text_path, **settings):
    merged = {**TINY_SETTINGS, **settings}
    return resolve_run_config(merged, {"out": str(tmp_path / name), "data": str(text_path)})


@pytest.fixture
def text_file(tmp_path, verdict_text):
    path = tmp_path / "verdict.txt"
    path.write_text(verdict_text[:6000], encoding="utf-8")
    return path


def test_batch_loss_is_mean_negative_log_likelihood(tiny_cfg):
    model = GPTModel(tiny_cfg)
    inputs, targets = torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8))
    log_probs = torch.log_softmax(model(inputs), dim=-1)
    expected = -sum(log_probs[b, t, targets[b, t]] for b in range(2) for t in range(8)) / 16
    assert torch.allclose(calc_loss_batch(inputs, targets, model, "cpu"), expected, atol=1e-5)


def test_learning_rate_schedule_hand_values():
    cfg = TrainConfig(learning_rate=1e-3, warmup_steps=10, lr_schedule="cosine")
    assert learning_rate_at(0, cfg, 110) == pytest.approx(1e-4)    # warm-up: (0+1)/10 of the peak
    assert learning_rate_at(9, cfg, 110) == pytest.approx(1e-3)
    assert learning_rate_at(10, cfg, 110) == pytest.approx(1e-3)   # cosine starts at the peak
    assert learning_rate_at(60, cfg, 110) == pytest.approx(0.55e-3)  # halfway: (1 + 0.1) / 2
    assert learning_rate_at(110, cfg, 110) == pytest.approx(1e-4)  # ends at 10% of the peak
    constant = TrainConfig(learning_rate=1e-3)
    assert {learning_rate_at(s, constant, 50) for s in range(50)} == {1e-3}


def test_same_seed_same_losses_and_a_complete_run_dir(tmp_path, text_file, capsys):
    _, _, first, run_dir = pretrain(tiny_run(tmp_path, "a", text_file))
    _, _, second, _ = pretrain(tiny_run(tmp_path, "b", text_file))
    _, _, other_seed, _ = pretrain(tiny_run(tmp_path, "c", text_file, SEED=8))
    assert first["batch_losses"] == second["batch_losses"] and first["val_losses"] == second["val_losses"]
    assert first["batch_losses"] != other_seed["batch_losses"]

    assert {p.name for p in run_dir.iterdir()} == {"checkpoint.pt", "best.pt", "config.json", "metrics.json",
                                                  "training_losses.png"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("train_losses", "val_losses", "tokens_seen", "final_train_loss", "final_val_loss",
                "best_val_loss", "perplexity", "tokens_per_sec", "elapsed_s"):
        assert metrics[key] is not None, key
    assert len(metrics["train_losses"]) == len(metrics["val_losses"]) == len(metrics["tokens_seen"])
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["final_val_loss"]))
    assert metrics["tokens_seen"][0] == 10 * 4 * 32  # eval_freq steps x batch x window
    assert metrics["completed"] and metrics["epochs_completed"] == 2
    assert (run_dir / "training_losses.png").read_bytes()[:4] == b"\x89PNG"
    output = capsys.readouterr().out
    assert "sample after epoch 2" in output and "final val loss" in output


def test_checkpoint_loads_safely_and_rebuilds_the_same_model(tmp_path, text_file):
    model, tokenizer, _, run_dir = pretrain(tiny_run(tmp_path, "run", text_file, custom_params={
        **TINY_SETTINGS["custom_params"], "num_epochs": 1}))
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)  # no arbitrary pickles
    assert {"model", "optimizer", "state", "rng", "run", "tokenizer_spec"} <= set(checkpoint)
    loaded, loaded_tokenizer, _ = load_model(run_dir)
    idx = torch.tensor([tokenizer.encode("The painter")])
    model.eval()
    assert torch.equal(loaded(idx), model(idx))
    assert loaded_tokenizer.encode("The painter") == tokenizer.encode("The painter")


def test_a_run_keeps_its_best_weights_beside_the_final_ones(tmp_path, text_file):
    params = {**TINY_SETTINGS["custom_params"], "max_steps": 30, "eval_freq": 10}
    _, _, metrics, run_dir = pretrain(tiny_run(tmp_path, "run", text_file, custom_params=params))
    losses = metrics["val_losses"]  # estimates at steps 10, 20 and 30; the run ends at step 30
    assert len(losses) == 3
    best, final = (torch.load(run_dir / name, weights_only=True)["model"] for name in ("best.pt", "checkpoint.pt"))
    same = all(torch.equal(best[key], final[key]) for key in final)
    assert same == (losses[2] < min(losses[:2]))  # best.pt is the step-30 model only if step 30 was best
    for name in ("best.pt", "checkpoint.pt"):  # both load, with their tokenizer, ready to generate
        model, tokenizer, saved = load_model(run_dir / name)
        assert saved["model"]["n_layers"] == 2 and tokenizer.encode("The") and model(torch.tensor([[0, 1]])).shape[1] == 2


def test_corrupt_or_missing_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="corrupt"):
        load_checkpoint(tmp_path)


def test_a_new_run_never_overwrites_an_earlier_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = resolve_run_config({})
    first = choose_run_dir(run)
    assert first == Path("runs/pretrain-quick")
    first.mkdir(parents=True)
    (first / "checkpoint.pt").write_bytes(b"")
    assert choose_run_dir(run) == Path("runs/pretrain-quick-2")
    with pytest.raises(ConfigError, match="--resume"):
        choose_run_dir(resolve_run_config({}, {"out": str(first)}))


def test_diverging_loss_stops_with_a_clear_message(tmp_path, text_file, monkeypatch):
    original = GPTModel.forward

    def diverged(self, idx, cache=None, details=False):  # every logit NaN
        output = original(self, idx, cache, details)
        if details:
            output.logits = output.logits * float("nan")
            return output
        return output * float("nan")

    monkeypatch.setattr(GPTModel, "forward", diverged)
    with pytest.raises(ConfigError, match="learning_rate"):
        pretrain(tiny_run(tmp_path, "nan", text_file))


def test_ctrl_c_saves_a_checkpoint_and_resuming_is_exact(tmp_path, text_file):
    """Run A trains straight through; run B gets a real SIGINT part-way and is resumed (C).
    B + C must reproduce A: the same batch losses, evaluations and samples."""
    _, _, straight, _ = pretrain(tiny_run(tmp_path, "straight", text_file))

    # The run pauses after its first evaluation (step 10 of 84) until the test has pressed Ctrl-C, so
    # that the signal lands mid-training however busy the machine is.
    script = """
import json, sys
sys.path.insert(0, sys.argv[1])
from minigpt.settings import resolve_run_config
from minigpt.task_pretrain import pretrain

def pause_after_first_evaluation(event):
    if "val_loss" in event and event["step"] == 10:
        print("paused", flush=True)
        sys.stdin.readline()

pretrain(resolve_run_config(json.loads(sys.argv[2]), json.loads(sys.argv[3])), on_event=pause_after_first_evaluation)
"""
    run_dir = tmp_path / "interrupted"
    cli = {"out": str(run_dir), "data": str(text_file)}
    process = subprocess.Popen([sys.executable, "-u", "-c", script, str(ROOT), json.dumps(TINY_SETTINGS),
                                json.dumps(cli)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:  # the first evaluation is done: press Ctrl-C, then let it go on
        if line.startswith("paused"):
            process.send_signal(signal.SIGINT)
            time.sleep(0.2)
            process.stdin.write("\n")
            process.stdin.flush()
            break
    rest = process.stdout.read()
    assert process.wait(timeout=60) == 0
    assert "Ctrl-C" in rest and "stopped early" in rest
    stopped = json.loads((run_dir / "metrics.json").read_text())
    assert not stopped["completed"] and 10 <= stopped["steps"] < straight["steps"]

    saved = json.loads((run_dir / "config.json").read_text())
    _, _, resumed, _ = pretrain(resolve_resume_config(saved, {"resume": str(run_dir)}))
    assert resumed["completed"] and resumed["steps"] == straight["steps"]
    for key in ("batch_losses", "train_losses", "val_losses"):
        assert resumed[key] == pytest.approx(straight[key], abs=1e-6), key
    assert resumed["tokens_seen"] == straight["tokens_seen"]
    assert resumed["final_val_loss"] == pytest.approx(straight["final_val_loss"], abs=1e-6)
    assert [s["text"] for s in resumed["samples"]] == [s["text"] for s in straight["samples"]]


def test_resuming_a_finished_run_asks_for_more_epochs(tmp_path, text_file):
    _, _, _, run_dir = pretrain(tiny_run(tmp_path, "done", text_file))
    saved = json.loads((run_dir / "config.json").read_text())
    with pytest.raises(ConfigError, match="--epochs"):
        pretrain(resolve_resume_config(saved, {"resume": str(run_dir)}))
    _, _, more, _ = pretrain(resolve_resume_config(saved, {"resume": str(run_dir), "num_epochs": 3}))
    assert more["epochs_completed"] == 3


def test_resuming_with_other_text_is_refused(tmp_path, text_file):
    _, _, _, run_dir = pretrain(tiny_run(tmp_path, "run", text_file))
    text_file.write_text(text_file.read_text() + " more", encoding="utf-8")
    saved = json.loads((run_dir / "config.json").read_text())
    with pytest.raises(ConfigError, match="differs"):
        pretrain(resolve_resume_config(saved, {"resume": str(run_dir), "num_epochs": 3}))


def test_a_sample_prompt_the_tokenizer_cannot_encode_fails_before_training(tmp_path):
    corpus = tmp_path / "chinese.txt"
    corpus.write_text("我们今天学习语言模型。" * 200, encoding="utf-8")
    with pytest.raises(ConfigError, match="start_context"):
        pretrain(tiny_run(tmp_path, "zh", corpus))  # char vocabulary has no 'T', 'h', 'e'
    assert not (tmp_path / "zh").exists()
    settings = dict(custom_params={**TINY_SETTINGS["custom_params"], "start_context": "我们", "num_epochs": 1})
    _, tokenizer, metrics, _ = pretrain(tiny_run(tmp_path, "zh-ok", corpus, **settings))
    assert metrics["samples"][0]["text"].startswith("我们")
    assert tokenizer.decode(tokenizer.encode("语言模型")) == "语言模型"


def test_the_default_sample_prompt_gives_way_to_the_texts_own_words(tmp_path):
    """'Every effort moves you' has letters a character vocabulary of a Chinese text lacks."""
    corpus = tmp_path / "chinese.txt"
    corpus.write_text("我们今天学习语言模型。" * 200, encoding="utf-8")
    custom = {k: v for k, v in TINY_SETTINGS["custom_params"].items() if k != "start_context"}
    _, _, metrics, run_dir = pretrain(tiny_run(tmp_path, "zh", corpus, custom_params={**custom, "num_epochs": 1}))
    opening = ("我们今天学习语言模型。" * 3)[:24]
    assert json.loads((run_dir / "config.json").read_text())["train"]["start_context"] == opening
    assert metrics["samples"][0]["text"].startswith(opening)


def test_a_run_can_train_its_own_bpe_and_a_later_run_can_reuse_it(tmp_path, text_file, capsys):
    settings = dict(TOKENIZER="train", BPE_VOCAB_SIZE=300,
                    custom_params={**TINY_SETTINGS["custom_params"], "num_epochs": 1})
    _, tokenizer, _, run_dir = pretrain(tiny_run(tmp_path, "bpe", text_file, **settings))
    train_text = text_file.read_text(encoding="utf-8")[:5400]  # the 90% training split
    assert tokenizer.merges == BPETokenizer.train(train_text, 300, progress=False).merges
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["vocab_size"] == 300 and config["tokenizer_spec"] == {"name": "bpe",
                                                                               "file": "tokenizer.bpe"}
    assert "bpe trained on the training split" in capsys.readouterr().out
    _, loaded_tokenizer, _ = load_model(run_dir)  # the checkpoint carries the merges itself
    assert loaded_tokenizer.merges == tokenizer.merges

    reuse = dict(settings, TOKENIZER=str(run_dir / "tokenizer.bpe"))
    _, again, _, _ = pretrain(tiny_run(tmp_path, "reuse", text_file, **reuse))
    assert again.merges == tokenizer.merges and again.encode("The painter") == tokenizer.encode("The painter")


def test_a_jsonl_corpus_trains_and_the_validation_share_is_a_setting(tmp_path, verdict_text):
    """A .jsonl of {"text": ...} records trains on the texts (the loss falls); --val-fraction splits."""
    corpus = tmp_path / "stories.jsonl"
    paragraphs = [p for p in verdict_text[:8000].split("\n\n") if p.strip()]
    corpus.write_text("\n".join(json.dumps({"text": p, "source": "verdict"}) for p in paragraphs), encoding="utf-8")
    settings = {**TINY_SETTINGS, "custom_params": {**TINY_SETTINGS["custom_params"], "val_fraction": 0.2}}
    _, tokenizer, metrics, run_dir = pretrain(tiny_run(tmp_path, "jsonl", corpus, **settings))
    assert metrics["val_losses"][-1] < metrics["val_losses"][0]
    assert "{" not in tokenizer.chars and "}" not in tokenizer.chars  # the JSON itself was never text
    saved = json.loads((run_dir / "config.json").read_text())
    text = "\n\n".join(paragraphs)
    assert saved["train_tokens"] + saved["val_tokens"] == len(text)  # one token per character, all of them
    assert saved["val_tokens"] == len(text) - int(0.8 * len(text))


def test_the_final_training_loss_reads_windows_spread_over_the_whole_split(tmp_path, text_file, monkeypatch, capsys):
    import minigpt.task_pretrain as task_pretrain
    from minigpt.train import calc_loss_loader

    monkeypatch.setattr(task_pretrain, "TRAIN_EVAL_WINDOWS", 20)
    model, _, metrics, _ = pretrain(tiny_run(tmp_path, "run", text_file, custom_params={
        **TINY_SETTINGS["custom_params"], "num_epochs": 1}))
    run = tiny_run(tmp_path, "unused", text_file)
    corpus = task_pretrain.prepare_corpus(run, None, task_pretrain.Distributed())
    loaders, _ = task_pretrain.make_loaders(corpus, run.train, task_pretrain.Distributed(), run.seed)
    every = range(0, len(corpus.train_ids) - 32, 32)  # every training window (stride 32)
    starts = loaders.train_eval.dataset.starts
    assert len(every) > 20 >= len(starts) > 10  # at most TRAIN_EVAL_WINDOWS, not a handful
    assert starts[0] == 0 and starts[-1] >= every[-1] - starts.step  # from the start to the end of the split
    assert len(loaders.val.dataset) == len(range(0, len(corpus.val_ids) - 32, 32))  # validation: every window
    assert metrics["final_train_loss"] == pytest.approx(calc_loss_loader(loaders.train_eval, model.eval(), "cpu"),
                                                        abs=1e-5)
    assert f"and {len(starts)} training windows spread over the split" in capsys.readouterr().out


def test_adamw_and_evaluation_flags_reach_the_run(tmp_path, text_file):
    from minigpt.cli import parse_args

    cli = parse_args(["--data", str(text_file), "--weight-decay", "0.05", "--beta2", "0.98", "--eval-iter", "7",
                      "--model", "gpt-char", "--tokenizer", "char"])
    run = resolve_run_config({"QUICK_MODE": True}, cli)
    assert (run.train.weight_decay, run.train.beta2, run.train.eval_iter) == (0.05, 0.98, 7)
    assert (run.model.tie_weights, run.model.bias, run.model.activation) == (True, False, "gelu")
    with pytest.raises(ConfigError, match="beta2"):
        resolve_run_config({"QUICK_MODE": True}, parse_args(["--beta2", "1.5"]))
