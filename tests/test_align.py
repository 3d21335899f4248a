"""`python main.py --task reward | dpo | ppo | grpo` end to end on small data: what each run
writes, that its numbers move the right way, that a stopped run resumes exactly, and that bad
settings say what to change."""

import json
import random
from dataclasses import replace

import pytest
import torch

from minigpt.config import AlignConfig, ConfigError
from minigpt.settings import resolve_resume_config, resolve_run_config
from minigpt.task_align import align
from minigpt.runs import StopRequest, load_model

pytestmark = pytest.mark.xdist_group("align")  # the runs share a module fixture

FRUITS = ["apple", "pear", "plum", "grape", "lemon", "melon"]
SPACE = ["rocket", "comet", "orbit", "star", "moon", "planet"]
SMALL = {"model": "gpt-nano", "seed": 3}


@pytest.fixture(scope="module")
def preference_file(tmp_path_factory):
    """Chosen answers are fruit words, rejected ones space words: a rule a small model learns."""
    rng = random.Random(0)
    records = [{"instruction": f"Name some things, set {i}.", "input": "",
                "chosen": " ".join(rng.choice(FRUITS) for _ in range(rng.randint(2, 4))),
                "rejected": " ".join(rng.choice(SPACE) for _ in range(rng.randint(2, 4)))} for i in range(160)]
    path = tmp_path_factory.mktemp("data") / "pairs.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, preference_file):
    out = tmp_path_factory.mktemp("runs") / "reward"
    run = resolve_run_config({}, {"task": "reward", "data": str(preference_file), "out": str(out),
                                  "learning_rate": 3e-3, "num_epochs": 4, **SMALL})
    return align(run)[2], out


def test_a_reward_run_learns_the_rule_and_its_model_reloads(reward_run):
    metrics, out = reward_run
    assert metrics["completed"] and metrics["before"]["test_accuracy"] == 0.5  # a zero head ties every pair
    assert metrics["after"]["test_accuracy"] >= 0.9, metrics["after"]
    assert {"loss", "accuracy", "margin"} <= set(metrics["history"][0])
    assert (out / "reward_curves.png").stat().st_size > 10_000
    model, tokenizer, saved = load_model(out)
    assert saved["task"] == "reward"
    ids = torch.tensor([tokenizer.encode("Name some things. apple pear")])
    assert model(ids).shape == (1, ids.shape[1], 1)
    # best.pt holds the weights of the best periodic held-out accuracy, and loads the same way.
    assert metrics["evals"], "the run should have evaluated periodically"
    best, _, saved_best = load_model(out / "best.pt")
    assert saved_best["task"] == "reward" and best(ids).shape == (1, ids.shape[1], 1)
    first_best = max(metrics["evals"], key=lambda e: e["val_accuracy"])
    best_state, final_state = best.state_dict(), model.state_dict()
    assert first_best["step"] < metrics["steps"]  # taken before the end of training, so not the final weights
    assert not all(torch.equal(best_state[k], final_state[k]) for k in final_state)


def test_a_dpo_run_starts_at_ln2_and_widens_the_held_out_margin(tmp_path, preference_file):
    run = resolve_run_config({}, {"task": "dpo", "data": str(preference_file), "out": str(tmp_path / "dpo"),
                                  "learning_rate": 3e-3, "max_steps": 10, **SMALL})
    metrics = align(run)[2]
    before, after = metrics["before"], metrics["after"]
    assert before["test_loss"] == pytest.approx(0.6931, abs=1e-4) and before["test_margin"] == 0.0
    assert after["test_margin"] > 0.2 and after["test_accuracy"] > 0.8, after
    assert metrics["history"][0]["loss"] == pytest.approx(0.6931, abs=1e-4)  # step 1: policy = reference
    assert (tmp_path / "dpo" / "dpo_curves.png").is_file()


def test_ppo_with_a_reward_model_scores_its_answers_with_it(tmp_path, preference_file, reward_run):
    _, reward_dir = reward_run
    run = resolve_run_config({}, {"task": "ppo", "data": str(preference_file), "out": str(tmp_path / "ppo"),
                                  "reward_model": str(reward_dir), "iterations": 2, "max_new_tokens": 4, **SMALL})
    run = replace(run, align=replace(run.align, prompts_per_iteration=8, minibatch_size=8))
    metrics = align(run)[2]
    assert metrics["completed"] and len(metrics["history"]) == 2
    assert {"reward", "kl", "clip_fraction", "entropy", "value_loss"} <= set(metrics["history"][0])
    assert set(metrics["after"]) == {"held_out", "train"}


def test_a_grpo_run_stopped_and_resumed_equals_an_uninterrupted_run(tmp_path):
    class StopAfter(StopRequest):
        def __init__(self, steps: int) -> None:
            super().__init__()
            self.steps, self.asked = steps, 0

        @property
        def requested(self) -> bool:  # the loop asks once before each round
            self.asked += 1
            return self.asked > self.steps

        @requested.setter
        def requested(self, value: bool) -> None:
            pass

    settings = {"task": "grpo", "iterations": 4, "sft_steps": 20, "max_operand": 6, "eval_freq": 2, **SMALL}
    whole = align(resolve_run_config({}, {**settings, "out": str(tmp_path / "whole")}))[2]
    part = align(resolve_run_config({}, {**settings, "out": str(tmp_path / "part")}), stop=StopAfter(2))[2]
    assert not part["completed"] and part["steps"] == 2 and "after" not in part
    saved = json.loads((tmp_path / "part" / "config.json").read_text())
    resumed = align(resolve_resume_config(saved, {"resume": str(tmp_path / "part")}))[2]
    for key in ("reward", "kl", "policy_loss"):
        assert [h[key] for h in resumed["history"]] == pytest.approx([h[key] for h in whole["history"]], abs=1e-6)
    assert resumed["after"] == pytest.approx(whole["after"])
    assert resumed["warmup_losses"] == whole["warmup_losses"]


def test_generate_answers_in_the_template_of_an_aligned_run(tmp_path, capsys):
    from main import main

    out = tmp_path / "grpo"
    assert main(["--task", "grpo", "--iterations", "1", "--sft-steps", "5", "--model", "gpt-nano",
                 "--out", str(out)]) == 0
    assert main(["--task", "generate", "--checkpoint", str(out), "--prompt", "What is 2 + 3?",
                 "--max-new-tokens", "4"]) == 0
    assert "instruction-tuned (chat template)" in capsys.readouterr().err


def test_alignment_settings_resolve_and_bad_ones_say_what_to_change(tmp_path, reward_run):
    quick = resolve_run_config({}, {"task": "grpo"})
    assert quick.align.group_size == 8 and quick.align.prompt_style == "chat" and quick.pretrained is None
    full = resolve_run_config({"QUICK_MODE": False}, {"task": "dpo"})
    assert full.checkpoint == "runs/sft-full" and full.align.beta == 0.1
    custom = resolve_run_config({"QUICK_MODE": False, "CUSTOM_MODE": True, "INIT": "scratch",
                                 "align_params": {"dpo_loss": "ipo"}}, {"task": "dpo", "beta": 0.3})
    assert custom.align.dpo_loss == "ipo" and custom.align.beta == 0.3 and custom.checkpoint is None
    with pytest.raises(ConfigError, match="unknown key 'grup_size'"):
        resolve_run_config({"align_params": {"grup_size": 4}}, {"task": "grpo"})
    with pytest.raises(ConfigError, match="group_size must be at least 2"):
        AlignConfig(group_size=1)
    with pytest.raises(ConfigError, match="Did you mean 'k3'"):
        AlignConfig(kl_estimator="k2")
    with pytest.raises(ConfigError, match="does not exist yet: train it first"):
        align(resolve_run_config({"QUICK_MODE": False}, {"task": "dpo", "out": str(tmp_path / "x")}))
    with pytest.raises(ConfigError, match="holds no run; train one first"):
        align(resolve_run_config({}, {"task": "ppo", "reward_model": str(tmp_path), "out": str(tmp_path / "y"),
                                      **SMALL}))
    sft = tmp_path / "sft-chat"  # an instruction-tuned run in the chat template
    sft.mkdir()
    (sft / "checkpoint.pt").write_bytes(b"")
    (sft / "config.json").write_text(json.dumps({"task": "sft", "finetune": {"prompt_style": "chat"}}))
    adopted = resolve_run_config({}, {"task": "dpo", "checkpoint": str(sft), "out": str(tmp_path / "z")})
    assert adopted.align.prompt_style == "chat"  # a run from it writes prompts as it was taught
    with pytest.raises(ConfigError, match="add --prompt-style chat"):  # unless told otherwise, which cannot work
        align(resolve_run_config({}, {"task": "dpo", "checkpoint": str(sft), "out": str(tmp_path / "z"),
                                      "prompt_style": "alpaca"}))
    _, reward_dir = reward_run
    with pytest.raises(ConfigError, match="holds a reward model"):
        from minigpt.runs import load_for_generation
        load_for_generation(resolve_run_config({}, {"task": "generate", "checkpoint": str(reward_dir)}))


# ---------------------------------------------------------------------------------------
# Alignment means by every setting what pretraining means by it
# ---------------------------------------------------------------------------------------

def small_dpo(tmp_path, preference_file, name, **cli):
    return resolve_run_config({"LOG_EVERY": cli.pop("log_every", 1000)},
                              {"task": "dpo", "data": str(preference_file), "out": str(tmp_path / name),
                               "max_steps": 3, "eval_freq": 2, **SMALL, **cli})


def test_alignment_builds_its_optimizer_as_make_optimizer_does(tmp_path, preference_file):
    """beta1, beta2 and the weight-decay groups (matrices decay, biases and norm gains do not) of the
    run's settings, as make_optimizer gives every other task: the reference is make_optimizer itself."""
    from minigpt.train import make_optimizer

    settings = {"QUICK_MODE": False, "CUSTOM_MODE": True, "INIT": "scratch", "MODEL": "gpt-nano",
                "custom_params": {"beta1": 0.8, "beta2": 0.95, "weight_decay": 0.05, "max_length": 64,
                                  "batch_size": 8, "model_overrides": {"context_length": 64}}}
    run = resolve_run_config(settings, {"task": "dpo", "data": str(preference_file), "out": str(tmp_path / "opt"),
                                        "max_steps": 2, "seed": 3})
    model, _, _, out = align(run)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    expected = make_optimizer(model, run.train).state_dict()["param_groups"]
    assert [(g["betas"], g["weight_decay"], len(g["params"])) for g in saved] == \
        [(g["betas"], g["weight_decay"], len(g["params"])) for g in expected]
    assert [tuple(g["betas"]) for g in saved] == [(0.8, 0.95)] * 2 and [g["weight_decay"] for g in saved] == [0.05, 0.0]
    assert len(saved[1]["params"]) == sum(p.dim() < 2 for p in model.parameters()) > 0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_alignment_trains_in_the_precision_it_is_given(tmp_path, preference_file, monkeypatch, precision):
    """The steps and evaluations run under autocast at the run's precision; fp16 adds a gradient
    scaler, saved with the checkpoint so that a resumed run continues with its scale."""
    import minigpt.scale

    entered = []
    original = minigpt.scale.autocast
    monkeypatch.setattr(minigpt.scale, "autocast", lambda p, d: entered.append(p) or original(p, d))
    _, _, metrics, out = align(small_dpo(tmp_path, preference_file, precision, precision=precision))
    assert metrics["precision"] == precision and entered.count(precision) >= 3  # 3 steps, an evaluation, ...
    scaler = torch.load(out / "checkpoint.pt", weights_only=True)["scaler"]
    assert (scaler is not None and scaler["scale"] > 0) == (precision == "fp16")
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in metrics["history"])


def test_alignment_prints_a_line_every_log_every_steps(tmp_path, preference_file, capsys):
    align(small_dpo(tmp_path, preference_file, "every-1", log_every=1))
    every_step = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ") and "lr" in line]
    align(small_dpo(tmp_path, preference_file, "every-1000", log_every=1000))
    rare = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ") and "lr" in line]
    assert [line.split()[1] for line in every_step] == ["1", "2", "3"] and rare == []
    assert "loss" in every_step[0] and "margin" in every_step[0]


def test_settings_an_alignment_task_cannot_honour_are_refused_before_any_model_exists():
    with pytest.raises(ConfigError, match="DPO's beta must be positive, got 0.0"):
        resolve_run_config({}, {"task": "dpo", "beta": 0.0})
    assert resolve_run_config({}, {"task": "grpo", "beta": 0.0}).align.beta == 0.0  # GRPO: no leash, allowed
    with pytest.raises(ConfigError, match="drop --compile"):
        resolve_run_config({}, {"task": "ppo", "compile": True})
    assert resolve_run_config({}, {"task": "dpo", "compile": True}).train.compile
    with pytest.raises(ConfigError, match="trains on whole batches"):
        resolve_run_config({}, {"task": "reward", "micro_batch_size": "auto"})
    with pytest.raises(ConfigError, match="drop --sampling"):
        resolve_run_config({}, {"task": "sft", "sampling": "random"})
