"""The alignment pipeline behind `python main.py --task reward | dpo | ppo | grpo` (chapter 8):
settings -> start point (new weights, a minigpt run, GPT-2, or a checkpoint to resume) -> data
(preference pairs, or records whose answers a program checks) -> the models (the policy, its
frozen reference, PPO's value model) -> `make_optimizer` -> the method's steps (a batch of pairs,
or a round of sampling and updates) -> held-out numbers before and after -> the run's files.

The settings mean what they mean in pretraining: precision and its gradient scaler, AdamW's
betas and weight-decay groups, the learning-rate schedule, `eval_freq` / `eval_iter`,
`log_every`, Ctrl-C that saves, best.pt, resume.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from minigpt.config import ConfigError, RunConfig, check_max_length
from minigpt.data import (CHAT_TOKENS, PreferenceDataset, encode_prompt, format_prompt, load_instruction_data,
                          load_preference_data, preference_collate, require_end_of_text, split_dataset)
from minigpt.finetune import SFT_SPLIT, grow_vocabulary, make_loader
from minigpt.model import GPTModel
from minigpt.plot import plot_panels
from minigpt.rlhf import (RLModels, RLSettings, Rollout, add_reward_head, arithmetic_records, bradley_terry_loss,
                          byte_tokenizer, dpo_batch_loss, evaluate_dpo, exact_match_rewards, grpo_update,
                          ppo_update, preference_accuracy, reward_scores, sample_responses, supervised_warmup)
from minigpt.runs import (BEST_NAME, CHECKPOINT_NAME, RunDirectory, StopRequest, check_same_data, device_row,
                          finished, fingerprint, load_checkpoint, load_model, optimizer_row, pick_device, print_rows,
                          refuse_several_processes, restore_training, rng_states, run_dir_row, save_checkpoint,
                          save_weights, speed_row, starting_point, write_atomically, write_config, write_json,
                          export_hf_folders)
from minigpt.scale import Distributed, ScaledSetup, check_before_building, resolve_precision, scaled_setup
from minigpt.settings import saved_run_config, start_template
from minigpt.tokenizer import get_tokenizer, tokenizer_from_spec
from minigpt.train import Diverged, learning_rate_at, make_optimizer, set_learning_rate

HELD_OUT_SHARE = 0.2  # ppo/grpo: the last fifth of the task's records measures the policy, never trains it
MEASURED_PROMPTS = 100  # ppo/grpo: greedy answers to at most this many held-out (and training) prompts are scored
WARMUP_LR = 1e-3  # ppo/grpo from new weights: the supervised warm-up's learning rate


@dataclass
class AlignState:
    """Where an alignment run stands: a resumed run continues from here exactly."""

    step: int = 0          # optimizer steps (reward, dpo) or rounds of sampling (ppo, grpo) done
    history: list[dict[str, float]] = field(default_factory=list)  # what each step logged
    evals: list[dict[str, float]] = field(default_factory=list)    # held-out numbers, with their step
    elapsed_s: float = 0.0
    best: float | None = None  # the best held-out score so far (the method's `best_score`), kept as best.pt


@dataclass
class AlignData:
    """What a task trains and measures on."""

    description: str
    fingerprint: str
    train: Any                    # reward/dpo: a PreferenceDataset; ppo/grpo: records
    val: Any
    test: Any


@dataclass
class _Align:
    """One alignment run as it is assembled: the models, the optimizer and what they train on."""

    run: RunConfig
    run_dir: Path
    tokenizer: Any
    data: AlignData
    model: torch.nn.Module
    reference: torch.nn.Module | None = None    # dpo, ppo, grpo: the frozen starting model
    critic: torch.nn.Module | None = None       # ppo: the value model
    reward_model: torch.nn.Module | None = None  # ppo with --reward-model
    optimizer: torch.optim.Optimizer | None = None
    setup: ScaledSetup | None = None
    compile_note: str = "off"
    generator: torch.Generator | None = None    # sampling, minibatch order, warm-up batches
    origin: str = ""
    warm_up: bool = False                       # ppo/grpo from new weights: supervised steps first


# ---------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------

def align(run: RunConfig, stop: StopRequest | None = None) -> tuple[torch.nn.Module, Any, dict[str, Any], Path]:
    """Align as `run` says (task reward, dpo, ppo or grpo), writing the run directory (this run's alone
    while it trains); returns (model, tokenizer, metrics, run directory). One process. A stopped run
    returns with metrics["completed"] False and resumes with --resume."""
    refuse_several_processes(run.task)
    with RunDirectory(run) as run_dir, (stop or StopRequest()) as stop:
        checkpoint = load_checkpoint(run.resume) if run.resume else None
        return _align(run, checkpoint, run_dir, stop)


def _align(run: RunConfig, checkpoint: dict[str, Any] | None, run_dir: Path,
           stop: StopRequest) -> tuple[torch.nn.Module, Any, dict[str, Any], Path]:
    _check_start_exists(run, checkpoint)
    device = pick_device(run.device)
    torch.manual_seed(run.seed)
    job = _start(run, checkpoint, device, run_dir)
    state, before, warmup_losses = AlignState(), {}, []
    if checkpoint is not None:
        restore_training(checkpoint, job.model, job.optimizer, job.setup)
        for other, key in ((job.reference, "reference"), (job.critic, "critic")):
            if other is not None:
                other.load_state_dict(checkpoint[key])
        state = AlignState(**checkpoint["state"])
        job.generator.set_state(checkpoint["generator"])
        before, warmup_losses = checkpoint["before"], checkpoint["warmup_losses"]
    method = make_method(job)
    if state.step >= method.total_steps and finished(run_dir):
        raise ConfigError(f"the run in {run_dir} already finished; start a new run (--out) to train further.")
    _print_header(job, method, state)
    if job.warm_up:
        warmup_losses = _warm_up(job)
    if not before:
        with job.setup.autocast():
            before = method.measure()
        print("before: " + method.describe(before), flush=True)
    extra = {"tokenizer_spec": job.tokenizer.spec(), "data_sha256": job.data.fingerprint}

    def save() -> None:
        saved = {**extra, "before": before, "warmup_losses": warmup_losses, "generator": job.generator.get_state(),
                 "reference": job.reference.state_dict() if job.reference is not None else None,
                 "critic": job.critic.state_dict() if job.critic is not None else None}
        save_checkpoint(run_dir / CHECKPOINT_NAME, job.model, job.optimizer, state, job.run, saved,
                        rng_states(job.setup.world), job.setup.scaler)

    with stop.deferred("after this step"):
        _loop(job, method, state, lambda: stop.requested, lambda: save_weights(run_dir / BEST_NAME, job.model,
                                                                               job.run, extra))
        save()  # the last step's, before the measurements after training
    metrics: dict[str, Any] = {"completed": False, "task": run.task, "steps": state.step,
                               "elapsed_s": state.elapsed_s, "num_parameters": job.model.num_parameters(),
                               "device": str(device), "precision": job.setup.precision, "before": before,
                               "warmup_losses": warmup_losses, "history": state.history, "evals": state.evals}
    if state.step >= method.total_steps:
        _measure_after(job, method, metrics, stop)
    with stop.deferred("once the run's files are written"):
        _write_files(job, method, state, metrics, extra)
    return job.model, job.tokenizer, metrics, run_dir


def _measure_after(job: _Align, method, metrics: dict[str, Any], stop: StopRequest) -> None:
    """The held-out numbers after training into `metrics` (then "completed"), unless a stop request ends them."""
    def measure() -> dict[str, float]:
        with job.setup.autocast():
            return method.measure()

    after = stop.unless_stopped(measure, "the measurements after training")
    if after is None:
        return
    metrics.update(completed=True, after=after)
    print("after:  " + method.describe(after), flush=True)


def _check_start_exists(run: RunConfig, checkpoint: dict[str, Any] | None) -> None:
    start_file = Path(run.checkpoint or "")
    if checkpoint is None and run.checkpoint and not (start_file.is_file() or (start_file / CHECKPOINT_NAME).is_file()):
        raise ConfigError(f"{run.task} starts from the run in {run.checkpoint}, which does not exist yet: train it "
                          f"first (e.g. python main.py --task sft --mode {run.mode} --out {run.checkpoint}), or "
                          "start elsewhere with --checkpoint DIR, --pretrained NAME or INIT = 'scratch'.")


def _checked_rewards(run: RunConfig) -> bool:
    """Whether a program checks the answers (grpo, and ppo without a reward model)."""
    return run.task == "grpo" or (run.task == "ppo" and run.align.reward_model is None)


def _start(run: RunConfig, checkpoint: dict[str, Any] | None, device: torch.device, run_dir: Path) -> _Align:
    """The start point, tokenizer, data, models, optimizer and step setup of the run."""
    checked = _checked_rewards(run)
    reward_model = reward_tokenizer = None
    if run.task == "ppo" and not checked:  # answers are written in the template the reward model learned to score
        reward_model, reward_tokenizer, style = _load_reward_model(run.align.reward_model, device)
        run = replace(run, align=replace(run.align, prompt_style=style))
    if checkpoint is not None:
        start, tokenizer, origin = None, tokenizer_from_spec(checkpoint["tokenizer_spec"]), "its checkpoint"
    else:
        _check_template(run.checkpoint, run.align.prompt_style)
        start, tokenizer, origin = starting_point(run, device)
    if tokenizer is None:  # new weights
        tokenizer = byte_tokenizer() if checked else get_tokenizer(run.tokenizer)
    require_end_of_text(tokenizer, "alignment")
    if run.align.prompt_style == "chat":
        tokenizer = tokenizer.with_special_tokens(CHAT_TOKENS)
    data = _task_data(run, tokenizer, checked)
    check_same_data(checkpoint, data.fingerprint, run_dir, run.data)
    if reward_model is not None and reward_tokenizer.spec() != tokenizer.spec():
        raise ConfigError(f"the reward model in {run.align.reward_model} reads a different vocabulary "
                          f"({reward_tokenizer.name}, {reward_tokenizer.vocab_size:,} tokens) from the policy's "
                          f"({tokenizer.name}, {tokenizer.vocab_size:,} tokens); train the reward model from the "
                          "same starting run or tokenizer as the policy.")
    job = _build_models(run, start, tokenizer, device)
    job.run_dir, job.data, job.reward_model, job.origin = run_dir, data, reward_model, origin
    job.warm_up = checked and start is None and checkpoint is None and run.align.sft_steps > 0
    return job


def _build_models(run: RunConfig, start: GPTModel | None, tokenizer, device: torch.device) -> _Align:
    """The model that trains (a reward head for the reward task), the frozen reference the KL leash ties
    it to, PPO's value model; the optimizer over what trains, and the step setup (precision, compile)."""
    if start is not None:
        model = GPTModel(replace(start.cfg, drop_rate=0.0)).to(device)
        model.load_state_dict(start.state_dict())
        run = replace(run, model_name=run.pretrained or run.checkpoint)
        grow_vocabulary(model, tokenizer.vocab_size)
    else:
        shape = replace(run.model, vocab_size=tokenizer.vocab_size, drop_rate=0.0)
        check_before_building(shape, run.train, Distributed(), device, resolve_precision(run.train.precision, device),
                              run.train.max_length)
        model = GPTModel(shape).to(device)
    if run.task == "reward":
        add_reward_head(model)
    run = replace(run, model=model.cfg)
    check_max_length(run.train, model.cfg, f"lower --max-length to at most {model.cfg.context_length}.")
    generator = torch.Generator().manual_seed(run.seed)
    reference = critic = None
    if run.task != "reward":
        reference = copy.deepcopy(model).requires_grad_(False).eval()
    if run.task == "ppo":  # the value model: a copy of the policy with a scalar head, its values starting at 0
        critic = add_reward_head(copy.deepcopy(model))
    optimizer = make_optimizer([model] + ([critic] if critic is not None else []), run.train)
    setup, compile_note = scaled_setup(model, run.train, device)
    return _Align(run, Path(), tokenizer, None, model, reference, critic, None, optimizer, setup, compile_note,
                  generator)


def _warm_up(job: _Align) -> list[float]:
    """A new model learns the answer format first; the reference and the value model start from it."""
    a, cfg = job.run.align, job.run.train
    losses = supervised_warmup(job.model, job.data.train, job.tokenizer, a.prompt_style, a.sft_steps,
                               cfg.batch_size, WARMUP_LR, job.generator)
    job.reference.load_state_dict(job.model.state_dict())  # the leash ties the policy to the warmed-up model
    if job.critic is not None:  # and the value model starts from its backbone too (its own head stays)
        job.critic.load_state_dict({k: v for k, v in job.model.state_dict().items() if not k.startswith("out_head.")},
                                   strict=False)
    print(f"supervised warm-up: answer loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
    return losses


def _loop(job: _Align, method, state: AlignState, should_stop: Callable[[], bool],
          save_best: Callable[[], None]) -> None:
    """The method's steps until its total or a stop: every `log_every` steps a line, every `eval_freq`
    steps the held-out numbers (best.pt kept at the best of them)."""
    cfg, total, setup = job.run.train, method.total_steps, job.setup
    start_time = time.perf_counter() - state.elapsed_s
    bar = tqdm(total=total, initial=state.step, desc=job.run.task, leave=False, dynamic_ncols=True,
               unit="step" if job.run.task in ("reward", "dpo") else "round")
    while state.step < total and not should_stop():
        set_learning_rate(job.optimizer, learning_rate_at(state.step, cfg, total))
        numbers = method.step(state.step)
        for key in ("loss", "reward"):
            if key in numbers and not math.isfinite(numbers[key]):
                raise Diverged(f"the {key} became {numbers[key]} at step {state.step + 1}; training "
                                  f"diverged. Start a new run with a lower learning_rate (now {cfg.learning_rate}).")
        state.step += 1
        state.history.append({"step": state.step, **numbers})
        bar.update(1)
        bar.set_postfix({key: f"{numbers[key]:.3f}" for key in method.shown if key in numbers})
        if state.step % job.run.log_every == 0:  # the means since the last line, as pretraining's "batch loss"
            recent = state.history[-job.run.log_every:]
            tqdm.write(f"step {state.step:>5}  " + "  ".join(
                f"{key} {sum(h[key] for h in recent) / len(recent):.3f}" for key in method.shown if key in numbers)
                + f"  lr {job.optimizer.param_groups[0]['lr']:.2e}")
        if state.step % cfg.eval_freq == 0 and state.step < total:
            with setup.autocast():
                state.evals.append({"step": state.step, **method.evaluate()})
            tqdm.write(f"step {state.step:>5}: " + "  ".join(
                f"{key} {value:.3f}" for key, value in state.evals[-1].items() if key != "step"))
            score = method.best_score(state.evals[-1])
            if state.best is None or score > state.best:  # the best held-out weights so far
                state.best = score
                save_best()
        state.elapsed_s = time.perf_counter() - start_time
    bar.close()


def _print_header(job: _Align, method, state: AlignState) -> None:
    run, model, cfg, a = job.run, job.model, job.run.train, job.run.align
    warm = (f"; then {a.sft_steps} supervised steps on the task's training answers (batch {cfg.batch_size}, "
            f"lr {WARMUP_LR:g}), so that it knows the answer format" if job.warm_up else "")
    print_rows(f"minigpt | {run.task} | {run.mode} mode", [
        ("device", device_row(job.setup, cfg)),
        ("speed", speed_row(job.setup, cfg, job.compile_note, job.optimizer.defaults.get("fused", False))),
        ("starting from", job.origin + warm),
        ("model", f"{model.cfg.n_layers} layers, {model.cfg.n_heads} heads, emb_dim {model.cfg.emb_dim}, "
                  f"context {model.cfg.context_length}; {model.num_parameters():,} parameters"
                  + ("; head: one reward per position" if run.task == "reward" else "")),
        ("tokenizer", f"{job.tokenizer.name}, {job.tokenizer.vocab_size:,} tokens"
                      + (" (one per byte, and the special tokens)" if getattr(job.tokenizer, "merges", None) == {}
                         else "")),
        ("data", job.data.description),
        ("method", method.description),
        ("training", optimizer_row(cfg, method.total_steps, "steps" if run.task in ("reward", "dpo") else "rounds")),
        ("evaluation", f"every {cfg.eval_freq} {'steps' if run.task in ('reward', 'dpo') else 'rounds'} "
                       + (f"on {cfg.eval_iter} batches of held-out pairs" if run.task in ("reward", "dpo") else
                          f"on the greedy answers to at most {MEASURED_PROMPTS} held-out prompts")
                       + f"; a line every {run.log_every}"),
        ("seed", str(run.seed)),
        ("run directory", run_dir_row(job.run_dir, state.step)),
    ])


def _write_files(job: _Align, method, state: AlignState, metrics: dict[str, Any], extra: dict[str, Any]) -> None:
    run, run_dir = job.run, job.run_dir
    write_config(run_dir, run, extra)
    write_json(run_dir / "metrics.json", metrics)
    files = [CHECKPOINT_NAME, "config.json", "metrics.json"] + ([BEST_NAME] if state.best is not None else [])
    if state.history:
        write_atomically(run_dir / f"{run.task}_curves.png", lambda path: method.plot(
            state, metrics["before"], metrics.get("after"), path, f"{run.task}, {run.mode} mode"))
        files.append(f"{run.task}_curves.png")
    status = "finished" if metrics["completed"] else f"stopped early (resume with --resume {run_dir})"
    unit = "steps" if run.task in ("reward", "dpo") else "rounds"
    print(f"\n{run.task} {status} in {state.elapsed_s:.1f} s, {state.step} {unit}")
    if metrics["completed"]:
        print(f"  before  {method.describe(metrics['before'])}\n  after   {method.describe(metrics['after'])}")
    print(f"  wrote   {run_dir}/: {', '.join(files)}")
    export_hf_folders(run, run_dir, metrics["completed"])


# ---------------------------------------------------------------------------------------
# Data and starting models
# ---------------------------------------------------------------------------------------

def _check_template(run_dir: str | None, style: str) -> None:
    """An instruction-tuned starting run answers in its own template: the answers scored here must too."""
    theirs = start_template(saved_run_config(run_dir))
    if theirs and theirs != style:
        raise ConfigError(f"{run_dir} was trained with the {theirs!r} template and this run would "
                          f"write answers in {style!r}; add --prompt-style {theirs}.")


def _task_data(run: RunConfig, tokenizer, checked: bool) -> AlignData:
    """Preference pairs (reward, dpo), instruction prompts (ppo with a reward model), or records whose
    answers a program checks (grpo, and ppo without a reward model): the arithmetic task by default."""
    style, limit = run.align.prompt_style, run.train.max_length
    if run.task in ("reward", "dpo"):
        records = load_preference_data(run.data)
        train, val, test = split_dataset(records, *SFT_SPLIT)
        if not val or not test:
            raise ConfigError(f"{len(records)} preference records are too few for an 85/5/10 split with a "
                              "validation and a test pair; give at least 20.")
        splits = [PreferenceDataset(split, tokenizer, style) for split in (train, val, test)]
        dropped = 0
        for split in splits:  # a prompt that fills the whole window leaves no answer to compare
            kept = [example for example in split.examples if example[2] < limit]
            dropped, split.examples = dropped + len(split.examples) - len(kept), kept
        if not all(len(split) for split in splits):
            raise ConfigError(f"no preference pair in some split has a prompt shorter than max_length ({limit}); "
                              "raise max_length.")
        name = Path(run.data).name if run.data else "instruction-data-with-preference.json"
        return AlignData(f"{name}: {len(records):,} preference pairs; train / validation / test "
                         f"{len(splits[0]):,} / {len(splits[1]):,} / {len(splits[2]):,}"
                         + (f" ({dropped} dropped: prompt of {limit}+ tokens)" if dropped else "")
                         + f"; {style} template; prompt + answer cut to {limit} tokens", fingerprint(records), *splits)
    if not checked:  # the reward model's own prompts, split as it was, so held-out prompts stay unseen
        records = load_preference_data(run.data)
        train, val, test = split_dataset(records, *SFT_SPLIT)
        name = Path(run.data).name if run.data else "instruction-data-with-preference.json"
        return AlignData(f"{name}: {len(train):,} training prompts, {len(test):,} held out; {style} template; "
                         f"reward: the reward model in {run.align.reward_model}", fingerprint(records),
                         train, val, test)
    if run.data is None:
        records = arithmetic_records(run.align.max_operand)
        name = f"sums a + b with 0 <= a, b <= {run.align.max_operand}"
    else:
        records, name = load_instruction_data(run.data), Path(run.data).name
    held_out = max(1, round(HELD_OUT_SHARE * len(records)))
    if len(records) - held_out < run.align.prompts_per_iteration:
        raise ConfigError(f"{name} gives {len(records)} records: too few to hold out {held_out} and sample "
                          f"{run.align.prompts_per_iteration} prompts per round; give more records or lower "
                          "prompts_per_iteration.")
    train, test = records[:-held_out], records[-held_out:]
    return AlignData(f"{name}: {len(train):,} training problems, {len(test):,} held out; {style} template; "
                     "reward 1 for an answer equal to the reference, else 0", fingerprint(records),
                     train, test, test)


def _load_reward_model(path: str, device: torch.device) -> tuple[torch.nn.Module, Any, str]:
    """A reward run's model (frozen), its tokenizer, and the template its answers were written in."""
    if not (Path(path) / CHECKPOINT_NAME).is_file():
        raise ConfigError(f"reward_model is {path!r}, which holds no run; train one first with python main.py "
                          "--task reward (same tokenizer as the policy), or leave reward_model unset to reward "
                          "exact answers to the task's records.")
    model, rm_tokenizer, saved = load_model(path, device)
    if saved["task"] != "reward":
        raise ConfigError(f"{path} holds a {saved['task']} run, not a reward model; give a --task reward run.")
    return model.requires_grad_(False).eval(), rm_tokenizer, saved["align"]["prompt_style"]


def _preference_loader(dataset, run: RunConfig, tokenizer, train: bool):
    collate = partial(preference_collate, eos_id=tokenizer.eos_id, allowed_max_length=run.train.max_length)
    return make_loader(dataset, collate, run.train.batch_size, run.train.batch_size, train, run.seed,
                       "the training pairs" if train else "the held-out pairs", run.train.num_workers)


# ---------------------------------------------------------------------------------------
# The methods: what one step is, what is measured, what is plotted
# ---------------------------------------------------------------------------------------

class _PairMethod:
    """Reward-model and DPO training: optimizer steps over batches of preference pairs, epoch by
    epoch in a seeded order (so a resumed run sees the batches it would have seen)."""

    shown = ("loss",)

    def __init__(self, job: _Align) -> None:
        self.job, self.run, self.model, self.device = job, job.run, job.model, job.setup.device
        self.runner = job.setup.runner if job.setup.runner is not None else job.model  # compiled, if --compile
        self.train_loader = _preference_loader(job.data.train, job.run, job.tokenizer, True)
        self.val_loader = _preference_loader(job.data.val, job.run, job.tokenizer, False)
        self.test_loader = _preference_loader(job.data.test, job.run, job.tokenizer, False)
        self.steps_per_epoch = self.train_loader.sampler.steps_per_epoch
        self.total_steps = min(self.steps_per_epoch * job.run.train.num_epochs, job.run.train.max_steps or math.inf)
        self._batches, self._epoch = None, None

    def next_batch(self, step: int) -> dict[str, torch.Tensor]:
        epoch, within = divmod(step, self.steps_per_epoch)
        if self._epoch != epoch or self._batches is None:
            self.train_loader.sampler.set_epoch(epoch, start=within * self.run.train.batch_size)
            self._batches, self._epoch = iter(self.train_loader), epoch
        return {key: value.to(self.device) for key, value in next(self._batches).items()}

    def update(self, loss: torch.Tensor) -> None:
        """Backward (scaled in fp16) and the optimizer step, with the run's clipping."""
        optimizer, setup = self.job.optimizer, self.job.setup
        optimizer.zero_grad(set_to_none=True)
        setup.backward(loss)
        setup.update(optimizer, [p for g in optimizer.param_groups for p in g["params"]], self.run.train.grad_clip)

    def batches(self, loader, limit: int | None = None):
        for i, batch in enumerate(loader):
            if limit is not None and i >= limit:
                return
            yield {key: value.to(self.device) for key, value in batch.items()}


class _RewardMethod(_PairMethod):
    shown = ("loss", "accuracy")

    def __init__(self, job: _Align) -> None:
        super().__init__(job)
        self.description = (f"Bradley-Terry loss -log sigma(r_chosen - r_rejected); {self.total_steps:,} steps of "
                            f"{self.run.train.batch_size} pairs")

    def step(self, step: int) -> dict[str, float]:
        self.model.train()
        batch = self.next_batch(step)
        with self.job.setup.autocast():
            chosen = reward_scores(self.runner, batch["chosen_inputs"], batch["chosen_targets"]).float()
            rejected = reward_scores(self.runner, batch["rejected_inputs"], batch["rejected_targets"]).float()
            loss = bradley_terry_loss(chosen, rejected)
        self.update(loss)
        return {"loss": loss.item(), "accuracy": (chosen > rejected).float().mean().item(),
                "margin": (chosen - rejected).mean().item()}

    def evaluate(self) -> dict[str, float]:
        limit = self.run.train.eval_iter
        return {"val_accuracy": preference_accuracy(self.model, self.batches(self.val_loader, limit))}

    def best_score(self, numbers: dict[str, float]) -> float:
        return numbers["val_accuracy"]

    def measure(self) -> dict[str, float]:
        return {"val_accuracy": preference_accuracy(self.model, self.batches(self.val_loader)),
                "test_accuracy": preference_accuracy(self.model, self.batches(self.test_loader))}

    def describe(self, numbers: dict[str, float]) -> str:
        return (f"held-out preference accuracy: validation {100 * numbers['val_accuracy']:.1f}%, "
                f"test {100 * numbers['test_accuracy']:.1f}% (ties count half)")

    def plot(self, state: AlignState, before, after, path: Path, title: str) -> None:
        steps = [h["step"] for h in state.history]
        evals = [(0, before["val_accuracy"])] + [(e["step"], e["val_accuracy"]) for e in state.evals]
        if after:
            evals.append((state.step, after["val_accuracy"]))
        plot_panels([
            ("Bradley-Terry loss (train batches)", {"loss": (steps, [h["loss"] for h in state.history])}),
            ("reward margin r_chosen - r_rejected", {"train batches": (steps, [h["margin"] for h in state.history])}),
            ("preference accuracy", {"train batches": (steps, [h["accuracy"] for h in state.history]),
                                     "validation": ([e[0] for e in evals], [e[1] for e in evals])}),
        ], path, title)


class _DPOMethod(_PairMethod):
    shown = ("loss", "margin")

    def __init__(self, job: _Align) -> None:
        super().__init__(job)
        a = job.run.align
        self.description = (f"DPO ({a.dpo_loss}, beta {a.beta:g}"
                            + (f", label smoothing {a.label_smoothing:g}" if a.label_smoothing else "")
                            + f") against a frozen copy of the starting model; {self.total_steps:,} steps of "
                            f"{job.run.train.batch_size} pairs")

    def step(self, step: int) -> dict[str, float]:
        self.model.train()
        a = self.run.align
        with self.job.setup.autocast():
            loss, numbers = dpo_batch_loss(self.runner, self.job.reference, self.next_batch(step), a.beta,
                                           a.dpo_loss, a.label_smoothing)
        self.update(loss)
        return numbers

    def evaluate(self) -> dict[str, float]:
        numbers = evaluate_dpo(self.model, self.job.reference, self.batches(self.val_loader, self.run.train.eval_iter),
                               self.run.align.beta)
        return {"val_loss": numbers["loss"], "val_margin": numbers["margin"], "val_accuracy": numbers["accuracy"]}

    def best_score(self, numbers: dict[str, float]) -> float:
        return -numbers["val_loss"]  # the held-out DPO loss, lower is better

    def measure(self) -> dict[str, float]:
        numbers = {}
        for split, loader in (("val", self.val_loader), ("test", self.test_loader)):
            for key, value in evaluate_dpo(self.model, self.job.reference, self.batches(loader),
                                           self.run.align.beta).items():
                numbers[f"{split}_{key}"] = value
        return numbers

    def describe(self, numbers: dict[str, float]) -> str:
        return (f"test pairs: implicit reward margin {numbers['test_margin']:+.3f} "
                f"(chosen {numbers['test_chosen_reward']:+.3f}, rejected {numbers['test_rejected_reward']:+.3f}), "
                f"ranked right {100 * numbers['test_accuracy']:.1f}%, DPO loss {numbers['test_loss']:.4f}")

    def plot(self, state: AlignState, before, after, path: Path, title: str) -> None:
        steps = [h["step"] for h in state.history]
        evals = [(0, before["val_margin"], before["val_accuracy"])]
        evals += [(e["step"], e["val_margin"], e["val_accuracy"]) for e in state.evals]
        if after:
            evals.append((state.step, after["val_margin"], after["val_accuracy"]))
        at = [e[0] for e in evals]
        plot_panels([
            ("DPO loss (train batches)", {"loss": (steps, [h["loss"] for h in state.history])}),
            ("implicit rewards (train batches)", {"chosen": (steps, [h["chosen_reward"] for h in state.history]),
                                                  "rejected": (steps, [h["rejected_reward"] for h in state.history])}),
            ("margin chosen - rejected", {"train batches": (steps, [h["margin"] for h in state.history]),
                                          "validation": (at, [e[1] for e in evals])}),
            ("pairs ranked right", {"train batches": (steps, [h["accuracy"] for h in state.history]),
                                    "validation": (at, [e[2] for e in evals])}),
        ], path, title)


class _RLMethod:
    """PPO or GRPO: rounds of sampling answers to training prompts and updating on them."""

    shown = ("reward", "kl")

    def __init__(self, job: _Align) -> None:
        run, a, cfg = job.run, job.run.align, job.run.train
        self.job, self.run, self.model, self.tokenizer = job, run, job.model, job.tokenizer
        self.reward_model, self.generator = job.reward_model, job.generator
        self.total_steps = min(a.iterations, cfg.max_steps or a.iterations)
        room = job.model.cfg.context_length - a.max_new_tokens  # a prompt must leave room for a whole answer
        self.dropped = 0
        self.train_prompts, self.train_records = self.fitting(job.data.train, job.tokenizer, room)
        self.test_prompts, self.test_records = self.fitting(job.data.test, job.tokenizer, room)
        if len(self.train_prompts) < a.prompts_per_iteration or not self.test_prompts:
            raise ConfigError(f"too few prompts fit the model's context of {job.model.cfg.context_length} tokens "
                              f"with room for {a.max_new_tokens} answer tokens; lower max_new_tokens or start from "
                              "a model with a longer context.")
        # Measured: the first MEASURED_PROMPTS of each (answering one prompt at a time costs a generation each)
        self.measured = {"held_out": (self.test_prompts[:MEASURED_PROMPTS], self.test_records[:MEASURED_PROMPTS]),
                         "train": (self.train_prompts[:MEASURED_PROMPTS], self.train_records[:MEASURED_PROMPTS])}
        self.settings = RLSettings(beta=a.beta, kl_estimator=a.kl_estimator, clip=a.clip, value_clip=a.value_clip,
                                   value_coef=a.value_coef, entropy_coef=a.entropy_coef, gamma=a.gamma, lam=a.lam,
                                   epochs=a.update_epochs, minibatch_size=a.minibatch_size, grad_clip=cfg.grad_clip,
                                   max_new_tokens=a.max_new_tokens, group_size=a.group_size)
        self.models = RLModels(job.model, job.reference, job.critic)
        self.description = self.describe_method()

    def describe_method(self) -> str:
        a, task = self.run.align, self.run.task
        samples = a.prompts_per_iteration * (a.group_size if task == "grpo" else 1)
        reward = "a reward model" if self.reward_model is not None else "exact match"
        return (f"{task.upper()}: {self.total_steps} rounds of {a.prompts_per_iteration} prompts"
                + (f" x {a.group_size} answers" if task == "grpo" else "")
                + f" ({samples} samples at temperature 1, at most {a.max_new_tokens} tokens), {a.update_epochs} "
                f"pass(es) in minibatches of {a.minibatch_size}; reward: {reward}; "
                + (f"KL penalty beta {a.beta:g} ({a.kl_estimator}) in the reward, value head, GAE gamma {a.gamma:g} "
                   f"lambda {a.lam:g}" if task == "ppo" else f"beta {a.beta:g} x KL (k3) in the loss")
                + f"; clip {a.clip:g}"
                + (f"; {self.dropped} prompt(s) too long for the context left out" if self.dropped else ""))

    def fitting(self, records: list[dict[str, str]], tokenizer, room: int) -> tuple[list[list[int]], list[dict]]:
        """The encoded prompts of `records` that are at most `room` tokens long, and their records."""
        style = self.run.align.prompt_style
        encoded = [(encode_prompt(format_prompt(r, style), tokenizer, style), r) for r in records]
        kept = [(ids, r) for ids, r in encoded if len(ids) <= room]
        self.dropped += len(encoded) - len(kept)
        return [ids for ids, _ in kept], [r for _, r in kept]

    def rewards_for(self, records: list[dict[str, str]]) -> Callable[[Rollout], torch.Tensor]:
        if self.reward_model is not None:
            return lambda rollout: reward_scores(self.reward_model, rollout.inputs, rollout.targets).float()
        return lambda rollout: exact_match_rewards(rollout, [r["output"] for r in records])

    def step(self, step: int) -> dict[str, float]:
        a = self.run.align
        rows = torch.randperm(len(self.train_prompts), generator=self.generator)[:a.prompts_per_iteration].tolist()
        prompts = [self.train_prompts[i] for i in rows]
        reward_fn = self.rewards_for([self.train_records[i] for i in rows])
        update = grpo_update if self.run.task == "grpo" else ppo_update  # in the run's precision (setup)
        return update(self.models, self.job.optimizer, prompts, self.tokenizer, reward_fn, self.settings,
                      self.generator, self.job.setup)

    @torch.no_grad()
    def greedy_reward(self, prompts, records) -> float:
        """Mean reward of the policy's greedy answers: exact-match accuracy, or the reward model's score."""
        rollout = sample_responses(self.model, prompts, self.tokenizer, 1, self.run.align.max_new_tokens, greedy=True)
        return self.rewards_for(records)(rollout).mean().item()

    def measure(self) -> dict[str, float]:
        return {split: self.greedy_reward(*self.measured[split]) for split in ("held_out", "train")}

    evaluate = measure

    def best_score(self, numbers: dict[str, float]) -> float:
        return numbers["held_out"]  # greedy accuracy, or the reward model's mean score

    def describe(self, numbers: dict[str, float]) -> str:
        held_out, train = (len(self.measured[split][0]) for split in ("held_out", "train"))
        if self.reward_model is not None:
            return (f"mean reward of greedy answers: {held_out} held-out prompts {numbers['held_out']:+.3f}, "
                    f"{train} training prompts {numbers['train']:+.3f}")
        return (f"exact-match accuracy (greedy): {held_out} held-out problems {100 * numbers['held_out']:.1f}%, "
                f"{train} training problems {100 * numbers['train']:.1f}%")

    def plot(self, state: AlignState, before, after, path: Path, title: str) -> None:
        steps = [h["step"] for h in state.history]
        evals = [{"step": 0, **before}] + state.evals + ([{"step": state.step, **after}] if after else [])
        at = [e["step"] for e in evals]
        measured = "accuracy" if self.reward_model is None else "mean reward"
        plot_panels([
            ("reward of sampled answers", {"reward": (steps, [h["reward"] for h in state.history])}),
            ("KL(policy || reference) per answer", {"k1": (steps, [h["kl"] for h in state.history])}),
            (f"greedy {measured}", {"training prompts": (at, [e["train"] for e in evals]),
                                    "held-out prompts": (at, [e["held_out"] for e in evals])}),
            ("entropy and clipped share", {"entropy": (steps, [h["entropy"] for h in state.history]),
                                           "clip fraction": (steps, [h["clip_fraction"] for h in state.history])}),
        ], path, title, xlabel="round")


def make_method(job: _Align):
    """The task's method: its steps, its held-out numbers and its plot."""
    if job.run.task == "reward":
        return _RewardMethod(job)
    if job.run.task == "dpo":
        return _DPOMethod(job)
    return _RLMethod(job)
