"""Training at scale (chapter 9): accumulation, data parallelism under torchrun, mixed
precision, compile, the schedule's floor, token files and random windows, FLOPs and MFU."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import ROOT
from minigpt.config import ConfigError, GPTConfig, TrainConfig
from minigpt.settings import resolve_resume_config, resolve_run_config
from minigpt.data import (GPTDataset, SeededSampler, TokenFile, corpus_files, create_dataloader, iter_text_pieces,
                          read_token_files, token_folder, write_token_files)
from minigpt.model import GPTModel
from minigpt.tokenizer import CharTokenizer, GPT2Tokenizer
from minigpt.runs import load_checkpoint
from minigpt.scale import autocast, compile_model, cpu_description, cpu_features, resolve_precision
from minigpt.task_pretrain import pretrain
from minigpt.train import StepSetup, learning_rate_at, train_step

# A character-level run small enough to launch several times: no dropout unless a test adds it.
SMALL = dict(
    QUICK_MODE=False, CUSTOM_MODE=True, MODEL="gpt-nano", TOKENIZER="char", SEED=11, LOG_EVERY=1000,
    custom_params=dict(num_epochs=2, batch_size=4, learning_rate=3e-3, eval_freq=1000, eval_iter=2,
                       max_length=16, stride=16, start_context="The ", warmup_steps=2, grad_clip=1.0,
                       model_overrides=dict(emb_dim=32, n_heads=2, n_layers=2, context_length=16,
                                            drop_rate=0.0)))


def small(**changes):
    params = {**SMALL["custom_params"], **changes.pop("custom_params", {})}
    return {**SMALL, **changes, "custom_params": params}


@pytest.fixture
def text_file(tmp_path, verdict_text):
    path = tmp_path / "verdict.txt"
    path.write_text(verdict_text[:3000], encoding="utf-8")
    return path


def tiny_model(seed=0, drop_rate=0.0):
    torch.manual_seed(seed)
    return GPTModel(GPTConfig(vocab_size=61, context_length=16, emb_dim=32, n_heads=2, n_layers=2,
                              drop_rate=drop_rate))


# ---------------------------------------------------------------------------------------
# Gradient accumulation and the schedule
# ---------------------------------------------------------------------------------------

def test_four_micro_batches_make_the_same_step_as_one_batch_of_four_times_the_size():
    """The same gradient, so the same parameters after the step. (SGD here: AdamW's first step
    is close to lr * sign(gradient), which turns rounding in near-zero gradients into +-lr.)"""
    batch = torch.randint(0, 61, (8, 17))
    inputs, targets = batch[:, :-1], batch[:, 1:]
    whole, parts = tiny_model(), tiny_model()
    setup = StepSetup(torch.device("cpu"))
    loss_whole = train_step(whole, torch.optim.SGD(whole.parameters(), lr=0.5), [(inputs, targets)], setup,
                            grad_clip=1.0).loss
    micro = [(inputs[i:i + 2], targets[i:i + 2]) for i in range(0, 8, 2)]
    loss_parts = train_step(parts, torch.optim.SGD(parts.parameters(), lr=0.5), micro, setup, grad_clip=1.0).loss
    assert loss_parts.item() == pytest.approx(loss_whole.item(), abs=1e-6)
    for (name, a), b in zip(whole.named_parameters(), parts.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=0), name
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
    moved = max((a - b).abs().max().item() for a, b in zip(whole.parameters(), tiny_model().parameters()))
    assert moved > 1e-3  # the step really changed the weights


def test_a_run_with_accumulation_matches_the_run_without(tmp_path, text_file):
    _, _, plain, plain_dir = pretrain(resolve_run_config(small(), {"out": str(tmp_path / "a"), "data": str(text_file)}))
    settings = small(custom_params=dict(micro_batch_size=1))
    _, _, accumulated, acc_dir = pretrain(resolve_run_config(settings, {"out": str(tmp_path / "b"), "data": str(text_file)}))
    assert accumulated["accumulation_steps"] == 4 and plain["accumulation_steps"] == 1
    assert accumulated["batch_losses"] == pytest.approx(plain["batch_losses"], abs=1e-5)
    assert_same_weights(plain_dir, acc_dir, atol=1e-5)


def test_schedule_warm_up_end_mid_decay_and_floor():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_steps=100, lr_schedule="cosine")
    total = 2100
    assert learning_rate_at(99, cfg, total) == pytest.approx(1e-3)         # warm-up ends at the peak
    assert learning_rate_at(1100, cfg, total) == pytest.approx(5.5e-4)     # halfway: (peak + floor) / 2
    assert learning_rate_at(2100, cfg, total) == pytest.approx(1e-4)       # the floor
    assert learning_rate_at(5000, cfg, total) == pytest.approx(1e-4)       # and it stays there
    quarter = 1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi / 4))
    assert learning_rate_at(600, cfg, total) == pytest.approx(quarter)


@pytest.mark.parametrize("params, words", [
    (dict(micro_batch_size=3), ["batch_size (4)", "micro_batch_size (3)", "[1, 2, 4]"]),
    (dict(min_lr=1.0), ["min_lr", "above learning_rate"]),
    (dict(precision="fp8"), ["precision", "'fp8'"]),
    (dict(sampling="randm"), ["sampling", "random"]),
    (dict(beta2=1.0), ["beta2"]),
    (dict(compile="yes"), ["compile", "True or False"]),
])
def test_bad_scale_settings_say_what_to_change(params, words):
    with pytest.raises(ConfigError) as err:
        resolve_run_config(small(custom_params=params), {})
    for word in words:
        assert word in str(err.value)


# ---------------------------------------------------------------------------------------
# Data parallelism: torchrun with gloo on CPU
# ---------------------------------------------------------------------------------------

def test_sampler_shards_each_global_batch_between_processes():
    single = list(SeededSampler(40, seed=3, batch_size=8))
    ranks = [list(SeededSampler(40, seed=3, batch_size=8, rank=r, world_size=2)) for r in range(2)]
    for step in range(5):  # step s: rank 0 takes the first half of the global batch, rank 1 the second
        assert ranks[0][4 * step:4 * step + 4] + ranks[1][4 * step:4 * step + 4] == single[8 * step:8 * step + 8]
    part_way = SeededSampler(40, seed=3, batch_size=8, rank=1, world_size=2)
    part_way.set_epoch(0, start=16)  # two steps done
    assert list(part_way) == ranks[1][8:]


def test_batch_must_split_evenly_between_processes_and_micro_batches():
    with pytest.raises(ConfigError, match="multiple of micro_batch_size"):
        create_dataloader(list(range(200)), batch_size=6, max_length=8, stride=8, micro_batch_size=2, world_size=2)


# Runs pretrain (or resumes) from JSON settings, as main.py would: under torchrun or alone.
RUN_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from minigpt.settings import resolve_resume_config, resolve_run_config
from minigpt.task_pretrain import pretrain
settings, cli = json.loads(sys.argv[2]), json.loads(sys.argv[3])
if "resume" in cli:
    saved = json.loads(open(cli["resume"] + "/config.json").read())
    pretrain(resolve_resume_config(saved, cli))
else:
    pretrain(resolve_run_config(settings, cli))
"""


def run_script(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    return str(script)


def torchrun(tmp_path, processes, settings, cli):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               run_script(tmp_path), str(ROOT), json.dumps(settings), json.dumps(cli)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def assert_same_weights(dir_a, dir_b, atol):
    a, b = load_checkpoint(dir_a)["model"], load_checkpoint(dir_b)["model"]
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=0), name


def test_two_gloo_processes_train_the_same_weights_as_one(tmp_path, text_file):
    cli = {"data": str(text_file)}
    _, _, single, _ = pretrain(resolve_run_config(small(custom_params=dict(eval_freq=4)),
                                                  {**cli, "out": str(tmp_path / "one")}))
    # Two processes of 1-window micro-batches, 2 accumulation steps each: the same 4-window step.
    output = torchrun(tmp_path, 2, small(custom_params=dict(micro_batch_size=1, eval_freq=4)),
                      {**cli, "out": str(tmp_path / "two")})
    assert output.count("minigpt | pretrain") == 1  # only rank 0 prints
    assert "2 processes (torchrun, DDP over gloo)" in output
    assert_same_weights(tmp_path / "one", tmp_path / "two", atol=1e-5)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["processes"] == 2 and two["accumulation_steps"] == 2
    assert two["batch_losses"] == pytest.approx(single["batch_losses"], abs=1e-5)
    assert two["tokens_seen"] == single["tokens_seen"] and len(two["val_losses"]) > 2
    for key in ("train_losses", "val_losses"):  # evaluations read the same windows too
        assert two[key] == pytest.approx(single[key], abs=1e-5), key


def test_a_stopped_ddp_run_resumes_exactly_with_dropout_on(tmp_path, text_file):
    """Each process has its own dropout stream; the checkpoint keeps all of them."""
    settings = small(custom_params=dict(lr_schedule="constant", num_epochs=1,
                                        model_overrides={**SMALL["custom_params"]["model_overrides"], "drop_rate": 0.2}))
    cli = {"data": str(text_file)}
    torchrun(tmp_path, 2, {**settings, "custom_params": {**settings["custom_params"], "num_epochs": 2}},
             {**cli, "out": str(tmp_path / "straight")})
    torchrun(tmp_path, 2, settings, {**cli, "out": str(tmp_path / "resumed")})
    torchrun(tmp_path, 2, settings, {"resume": str(tmp_path / "resumed"), "num_epochs": 2})
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert resumed["steps"] == straight["steps"] and resumed["epochs_completed"] == 2
    assert resumed["batch_losses"] == pytest.approx(straight["batch_losses"], abs=1e-6)
    assert_same_weights(tmp_path / "straight", tmp_path / "resumed", atol=1e-6)
    assert len(load_checkpoint(tmp_path / "resumed")["rng"]["ranks"]) == 2


# ---------------------------------------------------------------------------------------
# Mixed precision, compile, SIGTERM
# ---------------------------------------------------------------------------------------

def test_bf16_autocast_on_cpu_gives_a_loss_close_to_fp32():
    model = tiny_model()
    batch = torch.randint(0, 61, (4, 17))
    device = torch.device("cpu")
    from minigpt.train import calc_loss_batch

    full = calc_loss_batch(batch[:, :-1], batch[:, 1:], model, device)
    with autocast("bf16", device):
        logits = model(batch[:, :-1])
        half = calc_loss_batch(batch[:, :-1], batch[:, 1:], model, device)
    assert logits.dtype == torch.bfloat16  # the matrix products really ran in bf16
    assert half.dtype == torch.float32      # and the loss in fp32
    assert half.item() == pytest.approx(full.item(), abs=0.02)
    assert half.item() != full.item()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_train_close_to_fp32(tmp_path, text_file, precision):
    cli = {"data": str(text_file), "max_steps": 6}
    _, _, fp32, _ = pretrain(resolve_run_config(small(), {**cli, "out": str(tmp_path / "fp32")}))
    run = resolve_run_config(small(custom_params=dict(precision=precision)), {**cli, "out": str(tmp_path / precision)})
    _, _, mixed, _ = pretrain(run)
    assert mixed["precision"] == precision
    assert mixed["batch_losses"] == pytest.approx(fp32["batch_losses"], abs=0.05)
    scaler = load_checkpoint(tmp_path / precision)["scaler"]
    assert (scaler is not None) == (precision == "fp16")  # fp16 trains with a gradient scaler


def test_auto_precision_is_fp32_on_a_cpu_and_bf16_needs_hardware():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_compile_is_off_where_unsupported(monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(sys, "platform", "win32")
    same, note = compile_model(model, True, torch.device("cpu"))
    assert same is model and "Windows" in note
    assert compile_model(model, False, torch.device("cpu")) == (model, "off")


def test_a_compiled_model_computes_what_the_eager_one_does():
    model = tiny_model()
    compiled, note = compile_model(model, True, torch.device("cpu"))
    if note != "on":
        pytest.skip(note)
    batch = torch.randint(0, 61, (2, 16))
    assert torch.allclose(compiled(batch), model(batch), atol=1e-5)


def test_sigterm_saves_a_resumable_checkpoint(tmp_path, text_file):
    """torchrun and job schedulers send SIGTERM before they kill a process."""
    settings = small(LOG_EVERY=1, custom_params=dict(num_epochs=50))
    cli = {"out": str(tmp_path / "run"), "data": str(text_file)}
    process = subprocess.Popen([sys.executable, "-u", run_script(tmp_path), str(ROOT), json.dumps(settings),
                                json.dumps(cli)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in process.stdout:
        if "step      3" in line:
            process.send_signal(signal.SIGTERM)
            break
    rest = process.stdout.read()
    assert process.wait(timeout=60) == 0 and "stopped early" in rest
    assert not json.loads((tmp_path / "run" / "metrics.json").read_text())["completed"]


# ---------------------------------------------------------------------------------------
# Large corpora: token files and random windows
# ---------------------------------------------------------------------------------------

def test_text_pieces_cut_only_before_a_newline_that_starts_a_line_and_encode_like_the_whole(tmp_path):
    text = "First line\n  indented\n\n\nThird: ok \n'tis\n \nfourth\n" * 50
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    pieces = list(iter_text_pieces(path, piece_chars=37))
    assert "".join(pieces) == text and len(pieces) > 10
    for piece in pieces[1:]:
        assert piece[0] == "\n" and not piece[1].isspace()
    tokenizer = GPT2Tokenizer()
    assert [i for piece in pieces for i in tokenizer.encode(piece)] == tokenizer.encode(text)


@pytest.mark.parametrize("tokenizer_name", ["char", "gpt2"])
def test_a_token_file_holds_exactly_the_in_memory_tokens_and_gives_the_same_windows(tmp_path, verdict_text,
                                                                                   tokenizer_name):
    path = tmp_path / "corpus.txt"
    path.write_text(verdict_text, encoding="utf-8")
    tokenizer = CharTokenizer.from_text(verdict_text) if tokenizer_name == "char" else GPT2Tokenizer()
    meta = write_token_files([path], tokenizer, tmp_path / "tokens", train_ratio=0.9)
    train, val, _ = read_token_files(tmp_path / "tokens")
    expected = tokenizer.encode(verdict_text, allowed_special="all")
    assert train[0:len(train)].tolist() + val[0:len(val)].tolist() == expected
    assert meta["train_tokens"] == len(train) and abs(len(train) / len(expected) - 0.9) < 0.02
    # The split falls just before a newline.
    assert tokenizer.decode(val[0:len(val)].tolist()).startswith("\n")
    on_disk = GPTDataset(train, max_length=32, stride=7)
    in_memory = GPTDataset(expected[:len(train)], max_length=32, stride=7)
    assert len(on_disk) == len(in_memory)
    for i in (0, 1, len(in_memory) // 2, len(in_memory) - 1):
        for a, b in zip(on_disk[i], in_memory[i]):
            assert torch.equal(a, b) and a.dtype == torch.long


def test_a_folder_is_joined_in_sorted_order_with_end_of_text_between_files(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("second file\n", encoding="utf-8")
    (folder / "sub" / "c.txt").write_text("third file\n", encoding="utf-8")
    (folder / "a.txt").write_text("first file\n", encoding="utf-8")
    (folder / "notes.md").write_text("not text for training\n", encoding="utf-8")
    files = corpus_files(folder)
    assert [f.name for f in files] == ["a.txt", "b.txt", "c.txt"]
    tokenizer = GPT2Tokenizer()
    write_token_files(files, tokenizer, tmp_path / "tokens", train_ratio=1.0)
    train, _, meta = read_token_files(tmp_path / "tokens")
    assert tokenizer.decode(train[0:len(train)].tolist()) == \
        "first file\n<|endoftext|>second file\n<|endoftext|>third file\n"
    assert meta["val_tokens"] == 0


def test_token_folders_change_with_the_files_and_the_tokenizer(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("some text\n", encoding="utf-8")
    first = token_folder([path], "gpt2", root=tmp_path)
    assert token_folder([path], "gpt2", root=tmp_path) == first
    assert token_folder([path], "char", root=tmp_path) != first
    path.write_text("other text, longer\n", encoding="utf-8")
    assert token_folder([path], "gpt2", root=tmp_path) != first


def test_a_folder_trains_from_token_files_written_once_and_reused(tmp_path, verdict_text, monkeypatch):
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(3):
        (folder / f"part{i}.txt").write_text(verdict_text[i * 6000:(i + 1) * 6000], encoding="utf-8")
    settings = small(custom_params=dict(num_epochs=1, max_steps=4))
    _, tokenizer, metrics, run_dir = pretrain(resolve_run_config(settings, {"data": str(folder), "out": str(tmp_path / "a")}))
    written = list((tmp_path / "cache" / "tokens").iterdir())
    assert len(written) == 1 and metrics["steps"] == 4
    config = json.loads((run_dir / "config.json").read_text())
    stamp = (written[0] / "train.bin").stat().st_mtime_ns
    _, _, again, _ = pretrain(resolve_run_config(settings, {"data": str(folder), "out": str(tmp_path / "b")}))
    assert (written[0] / "train.bin").stat().st_mtime_ns == stamp  # reused, not written again
    assert again["batch_losses"] == pytest.approx(metrics["batch_losses"], abs=1e-6)
    assert config["train_tokens"] > 0 and tokenizer.name == "char"


def test_random_windows_depend_only_on_seed_and_epoch_and_cover_every_start():
    ids = list(range(1000))
    loader = create_dataloader(ids, batch_size=4, max_length=10, random_windows=True, seed=5)
    again = create_dataloader(ids, batch_size=4, max_length=10, random_windows=True, seed=5)
    first = [x for x, _ in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, (x for x, _ in again)))
    assert len(loader.dataset) == 990  # a window may start at any token whose target fits
    assert loader.sampler.steps_per_epoch == 1000 // 10 // 4  # an epoch draws a stream's worth
    starts = torch.cat([x[:, 0] for x in first])
    assert len(set(starts.tolist())) > 50  # random starts, not a stride grid
    loader.sampler.set_epoch(1)
    assert not torch.equal(next(iter(loader))[0], first[0])


def test_token_file_is_pickled_as_its_path(tmp_path):
    import pickle

    import numpy as np

    path = tmp_path / "x.bin"
    np.arange(100, dtype=np.uint16).tofile(path)
    tokens = TokenFile(path, "uint16")
    assert tokens[10:13].tolist() == [10, 11, 12]
    copy = pickle.loads(pickle.dumps(tokens))
    assert copy._array is None and copy[98:100].tolist() == [98, 99]


# ---------------------------------------------------------------------------------------
# Where time goes: FLOPs per token and MFU
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_matches_pytorchs_count_of_a_training_step(tied):
    from minigpt.attention import ExplicitMultiHeadAttention

    cfg = GPTConfig(vocab_size=500, context_length=64, emb_dim=64, n_heads=4, n_layers=3, drop_rate=0.0,
                    tie_weights=tied)
    model = GPTModel(cfg)
    formula = model.flops_per_token(64)
    # PyTorch counts matrix products; the teaching attention computes its scores as one.
    for block in model.trf_blocks:
        block.att = ExplicitMultiHeadAttention(64, 64, 64, 0.0, 4)
    idx = torch.randint(0, 500, (2, 64))
    with FlopCounterMode(display=False) as counter:
        model(idx).sum().backward()
    assert formula == counter.get_total_flops() / idx.numel()


def test_metrics_report_tflops_and_mfu_against_the_given_peak(tmp_path, text_file):
    settings = small(custom_params=dict(peak_tflops=0.5))
    model, _, metrics, _ = pretrain(resolve_run_config(settings, {"data": str(text_file), "out": str(tmp_path / "r")}))
    expected = model.flops_per_token(16) * metrics["tokens_per_sec"] / 1e12
    assert metrics["tflops_per_device"] == pytest.approx(expected)
    assert metrics["mfu"] == pytest.approx(expected / 0.5)
    assert metrics["peak_memory_mib"] > 0


def test_resuming_may_change_micro_batches_but_not_the_batch(tmp_path, text_file):
    run = resolve_run_config(small(), {"data": str(text_file), "out": str(tmp_path / "r")})
    saved = json.loads(json.dumps(run.to_dict()))
    resumed = resolve_resume_config(saved, {"resume": str(tmp_path / "r"), "micro_batch_size": 2,
                                            "precision": "bf16"})
    assert resumed.train.micro_batch_size == 2 and resumed.train.precision == "bf16"
    with pytest.raises(ConfigError, match="--batch-size cannot change"):
        resolve_resume_config(saved, {"resume": str(tmp_path / "r"), "batch_size": 8})


def test_cpu_description_names_the_kernels_torch_and_threads(monkeypatch):
    monkeypatch.setenv("MKL_CBWR", "AVX2,STRICT")
    features = cpu_features()
    assert features["aten_capability"] == torch.backends.cpu.get_cpu_capability()
    assert features["mkl_cbwr"] == "AVX2,STRICT" and features["threads"] == torch.get_num_threads()
    line = cpu_description(features)
    assert f"torch {torch.__version__}" in line and f"threads {torch.get_num_threads()}" in line
    assert f"ATen kernels {features['aten_capability']}; MKL_CBWR AVX2,STRICT" in line
