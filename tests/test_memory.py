"""Sizes that fit the machine (chapter 9): the activation count against autograd's saved tensors,
the training-memory estimate against a measured peak, the check before training, and
--batch-size auto's search under a simulated memory cap."""

import json
import math

import pytest
import torch

from minigpt import memory
from minigpt.config import ConfigError, TrainConfig, model_config
from minigpt.settings import resolve_run_config
from minigpt.memory import (MIB, Trial, activation_bytes_per_token, can_measure_peak, check_fits,
                            estimate_training_memory, find_micro_batch_size, measure_peak, saved_tensor_bytes,
                            step_trial)
from minigpt.model import GPTModel
from minigpt.scale import Distributed, fit_micro_batch, precision_reason, resolve_precision
from minigpt.task_pretrain import pretrain
from minigpt.train import StepSetup, calc_loss_batch, make_optimizer, train_step

CPU = torch.device("cpu")
linux_only = pytest.mark.skipif(not can_measure_peak(CPU), reason="peak memory is measured on Linux only")


def measured_bytes_per_token(cfg, precision, num_tokens=32):
    """Autograd's saved bytes per token: the difference between micro-batches of 4 and 2 sequences."""
    torch.manual_seed(0)
    model = GPTModel(cfg).train()
    sizes = []
    for batch in (2, 4):
        ids = torch.randint(0, cfg.vocab_size, (batch, num_tokens))

        def loss():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                return calc_loss_batch(ids, ids, model, "cpu")

        sizes.append(saved_tensor_bytes(loss, list(model.parameters())))
    return (sizes[1] - sizes[0]) / (2 * num_tokens)


VARIANTS = [("gpt-mini", {}), ("gpt-mini", dict(norm="rmsnorm")), ("gpt-mini", dict(pos_emb="rope")),
            ("gpt-mini", dict(n_kv_heads=2)), ("gpt-mini", dict(n_kv_heads=2, pos_emb="rope")),
            ("gpt-mini", dict(ffn="swiglu")), ("gpt-mini", dict(drop_rate=0.1)), ("llama-tiny", {}),
            ("llama-tiny", dict(drop_rate=0.1))]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("preset,overrides", VARIANTS, ids=lambda v: str(v))
def test_the_activation_count_matches_what_autograd_saves(preset, overrides, precision):
    cfg = model_config(preset, **{"vocab_size": 61, "context_length": 32, "drop_rate": 0.0, "n_layers": 2,
                                  **overrides})
    counted = activation_bytes_per_token(cfg, precision, num_tokens=32)
    # The count holds 16 bytes for the input and target ids; these tests pass one tensor as both.
    assert abs(counted - measured_bytes_per_token(cfg, precision)) <= 8


def test_the_count_is_chapter_9s_formula_for_a_gpt2_block():
    cfg = model_config("gpt-mini", vocab_size=65, drop_rate=0.0)
    L, C, H, V = 4, 128, 4, 65
    assert activation_bytes_per_token(cfg, "fp32") == 4 * (L * (16 * C + H + 4) + 2 * C + V + 2) + 16 == 34_204
    assert activation_bytes_per_token(cfg, "bf16") == L * (36 * C + 4 * H + 16) + 6 * C + 4 * V + 24 == 19_612


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("preset,overrides", [("gpt-mini", dict(attn_rank=16)), ("llama-tiny", dict(attn_rank=16)),
                                              ("llama-tiny", dict(attn_tau=True)), ("gpt-mini", dict(halting=True)),
                                              ("tau-tiny", {}), ("halting-tiny", {})], ids=lambda v: str(v))
def test_chapter_11s_switches_are_counted_within_a_percent(preset, overrides, precision):
    cfg = model_config(preset, **{"vocab_size": 61, "context_length": 32, "drop_rate": 0.0, "n_layers": 2,
                                  **overrides})
    counted = activation_bytes_per_token(cfg, precision, num_tokens=32)
    assert counted == pytest.approx(measured_bytes_per_token(cfg, precision), rel=0.01)


def test_a_mixture_of_experts_is_counted_within_a_percent():
    cfg = model_config("moe-tiny", vocab_size=61, context_length=32, n_layers=2)
    assert activation_bytes_per_token(cfg, "fp32", 32) == pytest.approx(measured_bytes_per_token(cfg, "fp32"), rel=0.01)


def test_the_states_are_counted_by_hand():
    model = GPTModel(model_config("gpt-nano", vocab_size=61, drop_rate=0.0))
    P = sum(p.numel() for p in model.parameters())
    head = model.out_head.weight.numel()
    estimate = estimate_training_memory(model, micro_batch=2, num_tokens=8)
    assert (estimate.weights, estimate.gradients, estimate.optimizer, estimate.weight_copies) == (4 * P, 4 * P, 8 * P, 0)
    assert estimate.activations == 16 * activation_bytes_per_token(model.cfg, "fp32", 8)
    assert estimate.loss_buffers == 16 * 61 * 8
    # One micro-batch per step: when the backward pass starts only the head's gradient exists.
    rest = estimate.activations + estimate.loss_buffers + estimate.backward_buffers
    assert estimate.total == 4 * P + 8 * P + max(rest + 4 * head, 4 * P)
    accumulating = estimate_training_memory(model, 2, 8, accumulating=True)
    assert accumulating.total == 4 * P + 8 * P + max(rest + 4 * P, 4 * P)
    # Frozen weights have neither gradients nor moments.
    for p in model.parameters():
        p.requires_grad_(False)
    model.out_head.weight.requires_grad_(True)
    frozen = estimate_training_memory(model, 2, 8)
    assert (frozen.gradients, frozen.optimizer) == (4 * head, 8 * head)
    bf16 = estimate_training_memory(model, 2, 8, "bf16")
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    assert bf16.weight_copies == 2 * matrices


def peak_of_training(cfg, batch, num_tokens, steps=2):
    """Measured peak of building the model and optimizer and taking `steps` AdamW steps; and the model."""
    ids = torch.randint(0, cfg.vocab_size, (batch, num_tokens))
    box = {}

    def train():
        torch.manual_seed(0)
        model = GPTModel(cfg)
        optimizer = make_optimizer(model, TrainConfig())
        for _ in range(steps):
            train_step(model, optimizer, [(ids, ids)], StepSetup(CPU))
        box["model"] = model

    return measure_peak(train, CPU), box["model"]


@linux_only
@pytest.mark.parametrize("preset,batch,num_tokens,overrides", [
    ("gpt-mini", 4, 64, {}),                                      # GPT-2's vocabulary: the loss dominates
    ("moe-tiny", 4, 64, {}),                                      # experts: the routed copies
    ("gpt2-small", 2, 128, dict(n_layers=2, emb_dim=384, n_heads=6)),  # the weights and AdamW dominate
])
def test_the_estimate_is_within_a_factor_of_1_5_of_the_measured_peak(preset, batch, num_tokens, overrides):
    cfg = model_config(preset, **{"drop_rate": 0.0, "context_length": 128, **overrides})
    peak, model = peak_of_training(cfg, batch, num_tokens)
    estimate = estimate_training_memory(model, batch, num_tokens).total
    # The process's resident memory counts allocator pages and a few runtime buffers, and moves
    # by about a tenth from run to run; benchmarks/bench_memory.py measured 0.88-1.00 for such
    # configurations (0.67 where many mid-sized tensors leave the allocator's pages part-used).
    assert 1 / 1.5 <= estimate / peak <= 1.5, (estimate / MIB, peak / MIB)


def test_binary_search_finds_the_largest_divisor_that_fits():
    tried = []

    def try_size(size):
        tried.append(size)
        return Trial(size, size * 10, size <= 7)

    size, trials = find_micro_batch_size(24, try_size)
    assert size == 6                                  # divisors 1 2 3 4 6 8 12 24; 6 <= 7 < 8
    assert [t.micro_batch for t in trials] == tried
    assert len(tried) <= math.ceil(math.log2(8)) + 1
    assert 8 in tried and 6 in tried                  # the answer and the next divisor were both run
    assert find_micro_batch_size(16, lambda s: Trial(s, None, True))[0] == 16
    with pytest.raises(ConfigError, match="not even a micro-batch of 1"):
        find_micro_batch_size(8, lambda s: Trial(s, None, False))


def small_model():
    torch.manual_seed(0)
    return GPTModel(model_config("gpt-mini", vocab_size=512, context_length=64, drop_rate=0.0))


def random_batch(size):
    ids = torch.randint(0, 512, (size, 64))
    return ids, ids


@linux_only
def test_batch_size_auto_picks_a_size_that_fits_a_simulated_cap_and_whose_double_does_not():
    model = small_model()
    reserve = 8 * sum(p.numel() for p in model.parameters())
    trial = step_trial(model, random_batch, lambda x, y: calc_loss_batch(x, y, model, CPU), CPU,
                       lambda: torch.autocast("cpu", enabled=False), None, 32, reserve)
    trial(8)                                  # the first pass also sets up the runtime's own buffers
    cap = int(1.3 * trial(8).peak)            # room for 8 sequences and a bit, not for 16
    cfg = TrainConfig(batch_size=32, max_length=64, micro_batch_size="auto")
    state = torch.random.get_rng_state()
    settled, note = fit_micro_batch(model, cfg, Distributed(), CPU, "fp32", random_batch, 64, limit=cap)
    assert torch.equal(torch.random.get_rng_state(), state)      # the trials drew nothing the run will see
    assert all(p.grad is None for p in model.parameters())       # and left no gradients behind
    micro = settled.micro_batch_size
    assert settled.batch_size == 32 and micro == 8, note
    assert "auto: micro-batch 8 of 32 (4 accumulation steps)" in note and "16 no" in note
    # The chosen size trains: four micro-batches of 8 make one step of the batch of 32.
    optimizer = make_optimizer(model, settled)
    result = train_step(model, optimizer, [random_batch(micro) for _ in range(32 // micro)], StepSetup(CPU))
    assert math.isfinite(result.loss.item())


def test_the_search_treats_running_out_of_memory_as_too_big():
    model = small_model()

    def make_batch(size):
        if size > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return random_batch(size)

    trial = step_trial(model, make_batch, lambda x, y: calc_loss_batch(x, y, model, CPU), CPU,
                       lambda: torch.autocast("cpu", enabled=False), None, 16)
    with pytest.raises(torch.OutOfMemoryError):  # raised outside the measured passes: not caught
        trial(8)

    def loss_fn(x, y):
        if len(x) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return calc_loss_batch(x, y, model, CPU)

    trial = step_trial(model, random_batch, loss_fn, CPU, lambda: torch.autocast("cpu", enabled=False), None, 16)
    assert find_micro_batch_size(16, trial)[0] == 4
    with pytest.raises(RuntimeError, match="shape"):  # any other error is the user's to see
        step_trial(model, random_batch, lambda x, y: torch.zeros(2, 2).view(3), CPU,
                   lambda: torch.autocast("cpu", enabled=False), None, 16)(2)


def test_a_run_that_cannot_fit_stops_before_training_and_says_what_to_change(monkeypatch):
    model = GPTModel(model_config("gpt-mini", vocab_size=50257, drop_rate=0.0))
    estimate = estimate_training_memory(model, 32, 128)
    # Room for the states and about 8 sequences: keep the batch, accumulate micro-batches.
    room = estimate.states - estimate.weights + 8.5 * estimate.per_sequence
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: (int(room), "simulated"))
    with pytest.raises(ConfigError) as err:
        check_fits(estimate, CPU, batch_size=32)
    message = str(err.value)
    assert f"about {estimate.total / MIB:,.0f} MiB" in message and "AdamW moments" in message
    assert "--micro-batch-size 8" in message and "--batch-size auto" in message
    # Not even one sequence beside the states: a shorter context or a smaller model.
    monkeypatch.setattr(memory, "free_memory_bytes",
                        lambda device: (estimate.states - estimate.weights + estimate.per_sequence // 2, "simulated"))
    with pytest.raises(ConfigError, match="shorten the context"):
        check_fits(estimate, CPU, batch_size=32)
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: (estimate.gradients // 2, "simulated"))
    with pytest.raises(ConfigError, match="smaller model"):
        check_fits(estimate, CPU, batch_size=32)
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: (estimate.total, "simulated"))
    check_fits(estimate, CPU, batch_size=32)   # fits: no error


def test_pretrain_refuses_before_writing_anything(monkeypatch, tmp_path, verdict_text):
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: (1 * MIB, "simulated"))
    text = tmp_path / "text.txt"
    text.write_text(verdict_text)
    run = resolve_run_config(dict(QUICK_MODE=True, MODEL="gpt-nano", TOKENIZER="char"),
                             {"out": str(tmp_path / "run"), "data": str(text)})
    with pytest.raises(ConfigError, match="training needs about .* MiB but cpu has 1 MiB"):
        pretrain(run)
    assert not (tmp_path / "run").exists()


def test_batch_size_auto_on_the_command_line(tmp_path):
    import main

    assert main.parse_args(["--batch-size", "auto"]) == {"micro_batch_size": "auto"}
    assert main.parse_args(["--batch-size", "16"])["batch_size"] == 16
    assert main.parse_args(["--micro-batch-size", "auto"])["micro_batch_size"] == "auto"
    with pytest.raises(SystemExit):
        main.parse_args(["--batch-size", "auto", "--micro-batch-size", "2"])
    with pytest.raises(SystemExit):
        main.parse_args(["--batch-size", "many"])
    with pytest.raises(ConfigError, match="micro_batch_size must be a whole number, None or 'auto'"):
        TrainConfig(micro_batch_size="max")
    with pytest.raises(ConfigError, match="for pretrain, classify and sft"):
        from minigpt.task_align import align
        align(resolve_run_config(dict(QUICK_MODE=True, TASK="dpo"), {"micro_batch_size": "auto",
                                                                      "out": str(tmp_path / "dpo")}))


def test_a_pretraining_run_with_batch_size_auto_keeps_the_batch(tmp_path, verdict_text):
    import main

    text = tmp_path / "text.txt"
    text.write_text(verdict_text[:3000])
    settings = dict(QUICK_MODE=False, CUSTOM_MODE=True, MODEL="gpt-nano", TOKENIZER="char", LOG_EVERY=1000,
                    custom_params=dict(num_epochs=1, batch_size=8, max_length=16, stride=16, eval_freq=1000,
                                       eval_iter=1, start_context="The ",
                                       model_overrides=dict(context_length=16, drop_rate=0.0)))
    cli = main.parse_args(["--batch-size", "auto", "--max-steps", "2", "--out", str(tmp_path / "run"),
                           "--data", str(text)])
    _, _, metrics, run_dir = pretrain(resolve_run_config(settings, cli))
    config = json.loads((run_dir / "config.json").read_text())
    micro = config["train"]["micro_batch_size"]
    assert isinstance(micro, int) and config["train"]["batch_size"] == 8 and 8 % micro == 0
    assert metrics["accumulation_steps"] == 8 // micro and metrics["steps"] == 2


def test_apple_gpus_train_in_fp32_by_default_and_the_header_says_why():
    mps = torch.device("mps")  # a device name only: nothing runs on it
    assert resolve_precision("auto", mps) == "fp32"
    reason = precision_reason("auto", mps)
    assert "fp32" in reason and "MPS" in reason and "--precision" in reason
    assert precision_reason("fp16", mps) == "" and precision_reason("auto", CPU) == ""
