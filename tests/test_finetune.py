"""Fine-tuning (chapter 7): the collate functions on hand-built batches, what each setting
trains, a classifier that learns, instruction tuning that lowers the validation loss and
scores its answers, LoRA runs, resume, and the command line."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA
from minigpt.config import ConfigError, FinetuneConfig, GPTConfig
from minigpt.settings import resolve_resume_config, resolve_run_config
from minigpt.data import (balance_classes, classification_collate, format_prompt,
                          instruction_collate, read_labeled_texts, split_dataset)
from minigpt.evaluate import rouge_l
from minigpt.finetune import (add_classification_head, choose_trainable, classification_report, classify,
                              grow_vocabulary)
from minigpt.task_finetune import finetune
from minigpt.lora import LoRALinear
from minigpt.model import GPTModel, save_hf_gpt2
from minigpt.tokenizer import get_tokenizer
from minigpt.runs import StopRequest, load_model

ROOT = Path(__file__).resolve().parent.parent
# The tests run in parallel (pytest.ini); these share module-scoped runs, so they stay on one worker.
pytestmark = pytest.mark.xdist_group("finetune")


# ---------------------------------------------------------------------------------------
# Collate functions, by hand
# ---------------------------------------------------------------------------------------

def test_instruction_collate_pads_shifts_and_keeps_one_end_of_text_target():
    eos = 0
    batch = [([5, 6, 7], 2), ([8, 9, 10, 11, 12], 3)]
    inputs, targets = instruction_collate(batch, eos_id=eos)
    # Each sequence gains one end-of-text; inputs drop the last token, targets the first.
    assert inputs.tolist() == [[5, 6, 7, 0, 0],
                               [8, 9, 10, 11, 12]]
    assert targets.tolist() == [[6, 7, 0, -100, -100],
                                [9, 10, 11, 12, 0]]


def test_instruction_collate_masks_the_prompt_and_truncates():
    batch = [([5, 6, 7], 2), ([8, 9, 10, 11, 12], 3)]
    _, masked = instruction_collate(batch, eos_id=0, mask_prompt=True)
    # Prompt [5, 6]: the target 6 (predicted from 5) is prompt; 7 (the first response token) stays.
    # Prompt [8, 9, 10]: targets 9 and 10 are prompt; 11 is the first response token.
    assert masked.tolist() == [[-100, 7, 0, -100, -100],
                               [-100, -100, 11, 12, 0]]
    inputs, cut = instruction_collate(batch, eos_id=0, pad_id=99, allowed_max_length=3)
    assert inputs.tolist() == [[5, 6, 7], [8, 9, 10]]
    assert cut.tolist() == [[6, 7, 0], [9, 10, 11]]  # the second lost its end-of-text to the cut
    inputs, _ = instruction_collate([([5], 1), ([6, 7, 8], 1)], eos_id=0, pad_id=99)
    assert inputs.tolist() == [[5, 99, 99], [6, 7, 8]]  # padding uses pad_id; its targets are ignored


def test_classification_collate_puts_the_class_at_the_last_real_token():
    inputs, targets = classification_collate([([4, 5, 6], 1), ([7], 0), ([8, 9], 2)], pad_id=50)
    assert inputs.tolist() == [[4, 5, 6], [7, 50, 50], [8, 9, 50]]
    assert targets.tolist() == [[-100, -100, 1], [0, -100, -100], [-100, 2, -100]]


def test_padding_never_changes_the_last_real_tokens_logits(tiny_cfg):
    model = GPTModel(tiny_cfg).eval()
    ids = [3, 14, 15, 9]
    alone = model(torch.tensor([ids]))[0, -1]
    padded = model(torch.tensor([ids + [0, 0, 0]]))[0, len(ids) - 1]
    assert torch.allclose(alone, padded, atol=1e-6)


def test_templates_and_splits():
    record = {"instruction": "Name a color.", "input": "", "output": "Blue."}
    alpaca = format_prompt(record, "alpaca")
    assert alpaca.endswith("### Instruction:\nName a color.\n\n### Response:\n") and "### Input" not in alpaca
    assert "### Input:\nsky\n\n" in format_prompt({**record, "input": "sky"}, "alpaca")
    assert format_prompt(record, "chat") == "<|user|>\nName a color.\n<|assistant|>\n"
    train, val, test = split_dataset(list(range(100)), 0.85, 0.05)
    assert (len(train), len(val), len(test)) == (85, 5, 10) and train[0] == 0 and test[-1] == 99
    pairs = [(f"t{i}", "a") for i in range(30)] + [(f"u{i}", "b") for i in range(7)]
    balanced = balance_classes(pairs, seed=1)
    assert sorted(label for _, label in balanced) == ["a"] * 7 + ["b"] * 7
    assert balanced == balance_classes(pairs, seed=1)


# ---------------------------------------------------------------------------------------
# Models: heads, vocabularies, what trains
# ---------------------------------------------------------------------------------------

def test_each_trainable_setting_freezes_what_it_says(tiny_cfg):
    def trainable(setting, **extra):
        model = add_classification_head(GPTModel(tiny_cfg), 3)
        choose_trainable(model, FinetuneConfig(trainable=setting, **extra))
        return {name for name, p in model.named_parameters() if p.requires_grad}

    assert trainable("head") == {"out_head.weight", "out_head.bias"}
    last = trainable("last_blocks", last_blocks=1)
    assert last == {n for n in last if n.startswith(("trf_blocks.1.", "final_norm.", "out_head."))}
    assert "trf_blocks.1.att.qkv.weight" in last and "final_norm.scale" in last
    assert not any(n.startswith("trf_blocks.0.") for n in last)
    assert len(trainable("all")) == len(list(GPTModel(tiny_cfg).named_parameters())) + 1  # + the head's bias
    lora = trainable("lora", lora_rank=2)
    assert lora == {n for n in lora if n.endswith(("lora_A", "lora_B")) or n.startswith("out_head.")}
    assert "out_head.weight" in lora  # a classifier's new head trains
    language_model = choose_trainable(GPTModel(tiny_cfg), FinetuneConfig(trainable="lora"), new_head=False)
    assert all(name.endswith(("lora_A", "lora_B")) for name, p in language_model.named_parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="last_blocks"):
        trainable("last_blocks", last_blocks=5)


def test_grow_vocabulary_keeps_old_logits_and_ties(tiny_cfg):
    for tied in (False, True):
        model = GPTModel(GPTConfig(**{**tiny_cfg.__dict__, "tie_weights": tied})).eval()
        ids = torch.randint(0, 97, (1, 6))
        before = model(ids)
        grow_vocabulary(model, 99)
        after = model(ids)
        assert after.shape[-1] == 99 and torch.allclose(after[..., :97], before, atol=1e-6)
        assert torch.allclose(model.tok_emb.weight[97], model.tok_emb.weight[:97].mean(0))
        assert (model.out_head.weight is model.tok_emb.weight) == tied


def test_chat_tokens_extend_gpt2_without_changing_its_ids():
    base = get_tokenizer("gpt2")
    chat = base.with_special_tokens(["<|user|>", "<|assistant|>"])
    assert chat.vocab_size == 50259
    text = "Hello there, how are you?"
    assert chat.encode(text) == base.encode(text)
    assert chat.encode("<|user|>\nhi<|assistant|>", allowed_special="all") == [50257, 198, 5303, 50258]


def test_classification_report_matches_a_hand_worked_confusion_matrix():
    # rows: true class, columns: predicted. Class a: 5 right, 1 called b; class b: 2 called a, 2 right.
    report = classification_report(torch.tensor([[5, 1], [2, 2]]), ["a", "b"])
    assert report["accuracy"] == pytest.approx(7 / 10)
    assert report["per_class"]["a"]["precision"] == pytest.approx(5 / 7)  # 7 predicted a, 5 of them a
    assert report["per_class"]["a"]["recall"] == pytest.approx(5 / 6)
    assert report["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert report["per_class"]["b"]["recall"] == pytest.approx(2 / 4)
    f1_a = 2 * (5 / 7) * (5 / 6) / (5 / 7 + 5 / 6)
    f1_b = 2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2)
    assert report["macro_f1"] == pytest.approx((f1_a + f1_b) / 2)


# ---------------------------------------------------------------------------------------
# The pipeline, end to end, on data the tests write
# ---------------------------------------------------------------------------------------

FRUITS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"]
SPACE = ["rocket", "planet", "comet", "galaxy", "orbit", "star", "moon", "nebula"]


@pytest.fixture(scope="module")
def labelled_file(tmp_path_factory):
    """Two separable classes: sentences of fruit words, and sentences of space words."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "topics.tsv"
    lines = ["text\tlabel"]
    for _ in range(150):
        lines.append(" ".join(rng.choice(FRUITS) for _ in range(rng.randint(3, 8))) + "\tfruit")
        lines.append(" ".join(rng.choice(SPACE) for _ in range(rng.randint(3, 8))) + "\tspace")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


SMALL = {"model": "gpt-nano", "seed": 3, "learning_rate": 3e-3}


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, labelled_file):
    out = tmp_path_factory.mktemp("runs") / "classify"
    run = resolve_run_config({}, {"task": "classify", "data": str(labelled_file), "out": str(out), **SMALL})
    return finetune(run)


def test_the_classifier_learns_a_separable_task(classifier_run):
    model, tokenizer, metrics, run_dir = classifier_run
    report = metrics["after"]["test_report"]
    assert report["examples"] == 60  # 20% of 300
    assert report["accuracy"] > 0.95
    assert metrics["before"]["test_report"]["accuracy"] < 0.8  # it did not know before
    assert sum(map(sum, report["confusion_matrix"])) == 60
    for name in ("checkpoint.pt", "config.json", "metrics.json", "training_losses.png", "accuracy.png"):
        assert (run_dir / name).is_file(), name
    label, probabilities = classify(model, tokenizer, "comet orbit galaxy star", ["fruit", "space"])
    assert label == "space" and sum(probabilities.values()) == pytest.approx(1.0)


def test_a_saved_classifier_classifies_from_the_command_line(classifier_run):
    _, _, _, run_dir = classifier_run
    model, tokenizer, saved = load_model(run_dir)
    assert saved["labels"] == ["fruit", "space"]
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), "--task", "classify", "--checkpoint",
                             str(run_dir), "--prompt", "banana plum peach"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("fruit  (fruit 0.")
    assert "Hugging Face" in subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--task", "export", "--checkpoint", str(run_dir), "--out",
         str(run_dir / "hf")], capture_output=True, text=True, timeout=120).stderr


def test_fine_tuning_from_a_gpt2_folder_trains_only_what_it_says(tmp_path, labelled_file):
    base = GPTModel(GPTConfig(vocab_size=50257, context_length=128, emb_dim=32, n_heads=2, n_layers=2,
                              tie_weights=True))
    folder = save_hf_gpt2(base, tmp_path / "tiny-gpt2")  # the layout of OpenAI's GPT-2 on the hub
    run = resolve_run_config({}, {"task": "classify", "data": str(labelled_file), "out": str(tmp_path / "run"),
                                  "pretrained": str(folder), "trainable": "last_blocks", "max_steps": 5})
    model, _, metrics, _ = finetune(run)
    start = base.state_dict()
    trained = model.state_dict()
    frozen = [name for name in start if name.startswith(("tok_emb", "pos_emb", "trf_blocks.0."))]
    assert frozen and all(torch.equal(trained[name], start[name]) for name in frozen)
    assert not torch.equal(trained["trf_blocks.1.att.qkv.weight"], start["trf_blocks.1.att.qkv.weight"])
    assert trained["out_head.weight"].shape == (2, 32) and metrics["steps"] == 5


def instruction_subset(tmp_path, count=60):
    records = json.loads((SHARED_DATA / "instruction-data.json").read_text())[:count]
    path = tmp_path / "instructions.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    if not (SHARED_DATA / "instruction-data.json").is_file():
        pytest.skip("instruction-data.json is not available offline")
    tmp = tmp_path_factory.mktemp("sft")
    run = resolve_run_config({}, {"task": "sft", "data": str(instruction_subset(tmp)), "out": str(tmp / "run"),
                                  "max_new_tokens": 12, "judge": False, "num_epochs": 2, **SMALL,
                                  "batch_size": 4, "learning_rate": 1e-2, "warmup_steps": 0})
    return finetune(run)


def test_instruction_tuning_lowers_the_validation_loss_and_scores_its_answers(sft_run):
    model, tokenizer, metrics, run_dir = sft_run
    assert metrics["after"]["val_loss"] < metrics["before"]["val_loss"] - 1.0
    answered = json.loads((run_dir / "test_responses.json").read_text())
    assert len(answered) == 6  # the last 10% of 60 records
    for item in answered:
        assert item["rouge_l_f1"] == pytest.approx(rouge_l(item["model_response"], item["output"])["f1"])
    mean = sum(item["rouge_l_f1"] for item in answered) / len(answered)
    assert metrics["test_scores"]["rouge_l"]["f1"] == pytest.approx(mean)
    assert metrics["test_scores"]["judge"] is None


def test_an_instruction_tuned_run_answers_in_its_template(sft_run):
    _, _, _, run_dir = sft_run
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), "--task", "generate", "--checkpoint",
                             str(run_dir), "--prompt", "Name a primary color.", "--max-new-tokens", "5",
                             "--temperature", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "instruction-tuned (alpaca template)" in result.stderr


def test_lora_sft_with_chat_tokens_trains_only_adapters_and_loads_merged(tmp_path):
    if not (SHARED_DATA / "instruction-data.json").is_file():
        pytest.skip("instruction-data.json is not available offline")
    run = resolve_run_config({}, {"task": "sft", "data": str(instruction_subset(tmp_path, 40)),
                                  "out": str(tmp_path / "run"), "max_steps": 3, "max_new_tokens": 4,
                                  "judge": False, "trainable": "lora", "prompt_style": "chat", **SMALL})
    model, tokenizer, metrics, run_dir = finetune(run)
    assert tokenizer.vocab_size == 50259 and model.cfg.vocab_size == 50259
    assert (run_dir / "adapter.pt").is_file()
    assert any(isinstance(m, LoRALinear) for m in model.modules())
    ids = torch.randint(0, 50259, (1, 10))
    model.eval()
    with torch.no_grad():
        trained = model(ids)
    loaded, _, saved = load_model(run_dir)
    assert not any(isinstance(m, LoRALinear) for m in loaded.modules())  # merged into plain Linears
    with torch.no_grad():
        assert torch.allclose(loaded(ids), trained, atol=1e-5)


class StopAfter(StopRequest):
    """Asks the loop to stop after `steps` steps, as Ctrl-C would."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps, self.asked = steps, 0

    @property
    def requested(self) -> bool:  # the loop asks once per step
        self.asked += 1
        return self.asked >= self.steps

    @requested.setter
    def requested(self, value: bool) -> None:
        pass


def test_fine_tuning_stopped_and_resumed_equals_an_uninterrupted_run(tmp_path, labelled_file):
    settings = {"task": "classify", "data": str(labelled_file), "num_epochs": 2, **SMALL}
    whole = finetune(resolve_run_config({}, {**settings, "out": str(tmp_path / "whole")}))[2]
    part = finetune(resolve_run_config({}, {**settings, "out": str(tmp_path / "part")}), stop=StopAfter(40))[2]
    assert not part["completed"] and part["steps"] == 40
    saved = json.loads((tmp_path / "part" / "config.json").read_text())
    resumed = finetune(resolve_resume_config(saved, {"resume": str(tmp_path / "part")}))[2]
    assert resumed["batch_losses"] == pytest.approx(whole["batch_losses"], abs=1e-6)
    assert resumed["after"]["test_report"] == whole["after"]["test_report"]


# ---------------------------------------------------------------------------------------
# Settings and bad input
# ---------------------------------------------------------------------------------------

def test_fine_tuning_settings_resolve_and_bad_ones_say_what_to_change(tmp_path, monkeypatch):
    quick = resolve_run_config({}, {"task": "classify"})
    assert quick.pretrained is None and quick.finetune.trainable == "all" and quick.model_name == "gpt-mini"
    full = resolve_run_config({"QUICK_MODE": False}, {"task": "sft"})
    assert full.pretrained == "gpt2-medium" and full.train.learning_rate == 5e-5
    assert resolve_run_config({"INIT": "scratch", "QUICK_MODE": False}, {"task": "classify"}).pretrained is None
    assert resolve_run_config({}, {"task": "sft", "pretrained": "gpt2", "trainable": "lora",
                                   "lora_rank": 4}).finetune.lora_rank == 4
    custom = resolve_run_config({"QUICK_MODE": False, "CUSTOM_MODE": True,
                                 "finetune_params": {"mask_prompt": True, "lora_targets": ["qkv"]}}, {"task": "sft"})
    assert custom.finetune.mask_prompt and custom.finetune.lora_targets == ("qkv",)
    with pytest.raises(ConfigError, match="Did you mean 'lora'"):
        FinetuneConfig(trainable="lor")
    with pytest.raises(ConfigError, match="lora_targets"):
        FinetuneConfig(lora_targets=["qkv", "attn"])
    with pytest.raises(ConfigError, match="unknown key 'mask_promt'"):
        resolve_run_config({"finetune_params": {"mask_promt": True}}, {"task": "sft"})
    with pytest.raises(ConfigError, match="INIT"):
        resolve_run_config({"INIT": "gpt3"}, {"task": "sft"})
    bad = tmp_path / "bad.csv"
    bad.write_text("message,category\nhello,a\n")
    with pytest.raises(ConfigError, match="'text' and a 'label' column"):
        read_labeled_texts(bad)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="one process"):
        finetune(resolve_run_config({}, {"task": "classify", "data": str(bad)}))
    monkeypatch.delenv("WORLD_SIZE")
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 1}\n')
    with pytest.raises(ConfigError, match="two different labels"):
        read_labeled_texts(one)


def test_the_sms_spam_collection_downloads_unzips_and_balances(tmp_path, local_server, monkeypatch):
    import zipfile

    import minigpt.data as data

    served, url = local_server
    lines = [f"ham\tsee you at {i} o'clock" for i in range(9)] + ["spam\tWINNER! Claim your prize", "spam\tFree entry"]
    with zipfile.ZipFile(served / "sms.zip", "w") as bundle:
        bundle.writestr("SMSSpamCollection", "\n".join(lines) + "\n")
        bundle.writestr("readme", "the collection's notes")
    monkeypatch.setattr(data, "SMS_SPAM_URL", f"{url}/sms.zip")
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    pairs = data.load_sms_spam()
    assert len(pairs) == 11 and pairs[-2] == ("WINNER! Claim your prize", "spam")
    (served / "sms.zip").unlink()  # the second time it reads its unzipped copy
    assert data.load_sms_spam() == pairs
    balanced = balance_classes(pairs, seed=123)
    assert sorted(label for _, label in balanced) == ["ham", "ham", "spam", "spam"]

    (tmp_path / "cache" / "sms_spam" / "SMSSpamCollection").write_text("not a label\tsome text\n")
    with pytest.raises(ConfigError, match="ham|spam"):
        data.load_sms_spam()
