"""The fine-tuning pipeline behind `python main.py --task classify | sft` (chapter 7):
settings -> start point (new weights, a minigpt run, GPT-2, or a checkpoint to resume) -> data
(labelled texts or instruction records, split 70/10/20 or 85/5/10) -> model (a new head, a
grown vocabulary, what trains) -> `make_optimizer` -> `train_loop` -> the numbers before and
after (accuracy and a confusion matrix; or the test instructions answered and scored) -> files.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from minigpt.config import ConfigError, FinetuneConfig, RunConfig, check_max_length
from minigpt.data import (CHAT_TOKENS, ClassificationDataset, InstructionDataset, balance_classes,
                          classification_collate, format_prompt, instruction_collate, load_instruction_data,
                          load_sms_spam, read_labeled_texts, split_dataset)
from minigpt.evaluate import judge_responses, mean_rouge_l, rouge_l
from minigpt.finetune import (CLASSIFY_SPLIT, SFT_SPLIT, add_classification_head, build_model, choose_trainable,
                              classification_report, classify, confusion_matrix, grow_vocabulary, make_loader,
                              respond, trainable_description)
from minigpt.lora import save_adapter
from minigpt.model import GPTModel
from minigpt.plot import plot_accuracy, plot_losses
from minigpt.evaluate import perplexity
from minigpt.runs import (BEST_NAME, CHECKPOINT_NAME, RunDirectory, StopRequest, check_same_data, device_row,
                          finished, fingerprint, load_checkpoint, load_model, make_metrics, optimizer_row, pick_device,
                          print_rows, print_summary, refuse_several_processes, restore_training, rng_states,
                          run_dir_row, save_checkpoint, save_weights, speed_row, starting_point, typed_lines,
                          write_atomically, write_config, write_json,
                          export_hf_folders)
from minigpt.scale import (Distributed, ScaledSetup, check_before_building, fit_micro_batch, micro_batch_size,
                           resolve_precision, scaled_setup)
from minigpt.tokenizer import get_tokenizer, tokenizer_from_spec
from minigpt.train import Loaders, LoopEvents, TrainState, calc_loss_loader, make_optimizer, planned_steps, train_loop

ADAPTER_NAME = "adapter.pt"
RESPONSES_NAME = "test_responses.json"
_ONE_PROCESS = Distributed()  # fine-tuning runs in one process; torchrun is for pretraining


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------

@dataclass
class FinetuneData:
    """The three splits of a fine-tuning task, as datasets, with what the header says about them."""

    train: Dataset
    val: Dataset
    test: Dataset
    description: str                  # the header's "data" line
    fingerprint: str                  # identifies the data, so that a resumed run can check it
    collate: Callable                 # builds a padded batch from a list of examples
    labels: list[str] | None = None   # a classifier's class names, in the order of its outputs
    test_records: list[dict[str, str]] | None = None  # the instructions the model answers at the end


def load_classification_pairs(data: str | None) -> tuple[list[tuple[str, str]], str]:
    """The labelled texts of `--data` (a CSV, TSV or JSONL file), or the SMS Spam Collection."""
    if data is None or data == "sms-spam":
        return load_sms_spam(), "the SMS Spam Collection (UCI)"
    return read_labeled_texts(data), Path(data).name


def prepare_classification(run: RunConfig, tokenizer, labels: list[str] | None) -> FinetuneData:
    pairs, source = load_classification_pairs(run.data)
    counts = {label: sum(1 for _, l in pairs if l == label) for label in sorted({l for _, l in pairs})}
    if run.finetune.balance:
        pairs = balance_classes(pairs, seed=run.seed)
    labels = labels or sorted({label for _, label in pairs})
    train, val, test = split_dataset(pairs, *CLASSIFY_SPLIT, seed=run.seed)
    if not val or not test:
        raise ConfigError(f"{source} gives {len(pairs)} texts: too few for a 70/10/20 split with a validation "
                          "and a test text; give at least 10 labelled texts.")
    max_length = run.train.max_length
    datasets = [ClassificationDataset(split, tokenizer, labels, max_length) for split in (train, val, test)]
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    balanced = (f"balanced to {len(pairs) // len(labels):,} per class, " if run.finetune.balance else "")
    description = (f"{source}: {sum(counts.values()):,} texts ({', '.join(f'{k} {v:,}' for k, v in counts.items())}); "
                   f"{balanced}train / validation / test {len(train):,} / {len(val):,} / {len(test):,}; "
                   f"texts cut to {max_length} tokens")
    return FinetuneData(*datasets, description, fingerprint(pairs),
                        partial(classification_collate, pad_id=pad_id), labels=labels)


def prepare_instructions(run: RunConfig, tokenizer) -> FinetuneData:
    records = load_instruction_data(run.data)
    train, val, test = split_dataset(records, *SFT_SPLIT)
    if not val or not test:
        raise ConfigError(f"{len(records)} instruction records are too few for an 85/5/10 split with a "
                          "validation and a test record; give at least 20.")
    style = run.finetune.prompt_style
    datasets = [InstructionDataset(split, tokenizer, style) for split in (train, val, test)]
    limit = run.train.max_length
    if run.finetune.mask_prompt:  # a prompt that fills the whole window leaves nothing to learn from
        datasets[0].examples = [ex for ex in datasets[0].examples if ex[1] < limit]
    longest = max(len(ids) + 1 for ids, _ in datasets[0].examples)
    description = (f"{Path(run.data).name if run.data else 'instruction-data.json'}: {len(records):,} records; "
                   f"train / validation / test {len(train):,} / {len(val):,} / {len(test):,}; {style} template; "
                   f"longest training example {longest} tokens (cut to {limit}); "
                   f"loss on {'the responses only' if run.finetune.mask_prompt else 'prompt and response'}")
    collate = partial(instruction_collate, eos_id=tokenizer.eos_id, allowed_max_length=limit,
                      mask_prompt=run.finetune.mask_prompt)
    return FinetuneData(*datasets, description, fingerprint(records), collate, test_records=test)


# ---------------------------------------------------------------------------------------
# Evaluation: the numbers fine-tuning should move
# ---------------------------------------------------------------------------------------

def answer_test_set(model: nn.Module, tokenizer, records: list[dict[str, str]], cfg: FinetuneConfig,
                    progress: bool = True) -> list[dict[str, Any]]:
    """Every test record with the model's response and its ROUGE-L against the reference."""
    was_training = model.training
    model.eval()
    answered = []
    for record in tqdm(records, desc="answering the test instructions", disable=not progress, leave=False):
        response = respond(model, tokenizer, record, cfg.prompt_style, cfg.max_new_tokens)
        answered.append({**record, "model_response": response,
                         "rouge_l_f1": rouge_l(response, record["output"])["f1"]})
    model.train(was_training)
    return answered


def score_responses(answered: list[dict[str, Any]], cfg: FinetuneConfig) -> dict[str, Any]:
    """ROUGE-L always; the judge's 0-100 scores when `cfg.judge` and a judge server answers."""
    scores: dict[str, Any] = {"rouge_l": mean_rouge_l([a["model_response"] for a in answered],
                                                      [a["output"] for a in answered]),
                              "responses": len(answered), "max_new_tokens": cfg.max_new_tokens, "judge": None}
    if cfg.judge:
        items = [{"prompt": format_prompt(a, "alpaca"), "reference": a["output"], "response": a["model_response"]}
                 for a in answered]
        try:
            scores["judge"] = judge_responses(items, cfg.judge_url, cfg.judge_model)
        except ConfigError as err:  # e.g. the server runs but lacks the model: keep the run's results
            print(f"note: judge scores skipped: {err}", file=sys.stderr)
        if scores["judge"]:
            for item, score in zip(answered, scores["judge"]["scores"]):
                item["judge_score"] = score
    return scores


@torch.no_grad()
def measure(model: nn.Module, loaders: Loaders, test_loader: DataLoader, setup: ScaledSetup,
            labels: list[str] | None, with_train: bool = False) -> dict[str, Any]:
    """Loss on every example of the validation and test splits (and the training split), and for a
    classifier each split's report."""
    splits = {"val": loaders.val, "test": test_loader} | ({"train": loaders.train_eval} if with_train else {})
    result: dict[str, Any] = {}
    with setup.autocast():
        for name, loader in splits.items():
            result[f"{name}_loss"] = calc_loss_loader(loader, model, setup.device)
        if labels:
            for name, loader in splits.items():
                result[f"{name}_report"] = classification_report(
                    confusion_matrix(model, loader, len(labels), setup.device), labels)
    return result


def _describe(numbers: dict[str, Any]) -> str:
    text = f"validation loss {numbers['val_loss']:.3f}, test loss {numbers['test_loss']:.3f}"
    if "test_report" in numbers:
        text += (f"; accuracy: validation {100 * numbers['val_report']['accuracy']:.1f}%, "
                 f"test {100 * numbers['test_report']['accuracy']:.1f}%")
    return text


# ---------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------

@dataclass
class _Run:
    """One fine-tuning run as it is being assembled: what every step after the start needs."""

    run: RunConfig
    run_dir: Path
    device: torch.device
    tokenizer: Any
    data: FinetuneData
    model: GPTModel | None = None
    origin: str = ""


def finetune(run: RunConfig, stop: StopRequest | None = None) -> tuple[GPTModel, Any, dict[str, Any], Path]:
    """Fine-tune as `run` says (task classify or sft), writing the run directory (this run's alone
    while it trains); returns (model, tokenizer, metrics, run directory). One process: torchrun is
    for pretraining. A stopped run returns with metrics["completed"] False and resumes with --resume."""
    refuse_several_processes(run.task)
    with RunDirectory(run) as run_dir, (stop or StopRequest()) as stop:
        checkpoint = load_checkpoint(run.resume) if run.resume else None
        return _finetune(run, checkpoint, run_dir, stop)


def _finetune(run: RunConfig, checkpoint: dict[str, Any] | None, run_dir: Path,
              stop: StopRequest) -> tuple[GPTModel, Any, dict[str, Any], Path]:
    device = pick_device(run.device)
    torch.manual_seed(run.seed)
    job = _start(run, checkpoint, device, run_dir)
    run, model, cfg = job.run, job.model, job.run.train
    optimizer = make_optimizer(model, cfg)  # frozen weights get no gradient, so AdamW keeps no state for them
    cfg, memory_note = _fit(job, cfg)
    run = job.run = replace(run, train=cfg)
    loaders, test_loader = _loaders(job.data, cfg, run.seed)
    total_steps = planned_steps(cfg, loaders.train.sampler.steps_per_epoch)
    setup, compile_note = scaled_setup(model, cfg, device)
    state, before = TrainState(), {}
    if checkpoint is not None:
        restore_training(checkpoint, model, optimizer, setup)
        state, before = TrainState(**checkpoint["state"]), checkpoint.get("before", {})
        if (state.epoch >= cfg.num_epochs or state.global_step >= total_steps) and finished(run_dir):
            raise ConfigError(f"the run in {run_dir} already finished; raise --epochs to train it further.")
    _print_header(job, setup, state, loaders, total_steps, [compile_note, memory_note],
                  optimizer.defaults.get("fused", False))
    if not before:  # where fine-tuning starts: the numbers it should move
        before = measure(model, loaders, test_loader, setup, job.data.labels)
        print("before fine-tuning: " + _describe(before), flush=True)
    extra = {"tokenizer_spec": job.tokenizer.spec(), "data_sha256": job.data.fingerprint,
             "labels": job.data.labels, "before": before}

    def save() -> None:
        save_checkpoint(run_dir / CHECKPOINT_NAME, model, optimizer, state, run, extra,
                        rng_states(_ONE_PROCESS), setup.scaler)

    events = LoopEvents(should_stop=lambda: stop.requested, epoch_end=save,
                        best=lambda: save_weights(run_dir / BEST_NAME, model, run, extra),
                        epoch_note=_epoch_note(job, loaders, setup))
    with stop.deferred("after this step"):
        completed = train_loop(model, optimizer, loaders, cfg, state, setup, events, run.log_every)
        save()  # the last step's, before the measurements after training (minutes for sft's answers)
    metrics = {**make_metrics(state, model, False, None, run, setup, compile_note), "before": before}
    answered = _measure_after(job, metrics, loaders, test_loader, setup, stop) if completed else None
    with stop.deferred("once the run's files are written"):
        files = _write_files(job, metrics, extra, answered)
    print_summary(metrics, run_dir, metrics["completed"], files)
    export_hf_folders(run, run_dir, metrics["completed"])
    if metrics["completed"]:
        _print_task_summary(metrics, run.task)
    return model, job.tokenizer, metrics, run_dir


def _start(run: RunConfig, checkpoint: dict[str, Any] | None, device: torch.device, run_dir: Path) -> _Run:
    """The start point, the tokenizer, the data and the model, built as the task and settings say."""
    labels = checkpoint.get("labels") if checkpoint else None
    if checkpoint is not None:
        base, tokenizer, origin = None, tokenizer_from_spec(checkpoint["tokenizer_spec"]), "its checkpoint"
    else:
        base, tokenizer, origin = starting_point(run, device)
    if tokenizer is None:  # new weights: the tokenizer the settings name
        tokenizer = _new_tokenizer(run)
    if run.task == "sft" and run.finetune.prompt_style == "chat":
        tokenizer = tokenizer.with_special_tokens(CHAT_TOKENS)
    data = (prepare_classification(run, tokenizer, labels) if run.task == "classify"
            else prepare_instructions(run, tokenizer))
    check_same_data(checkpoint, data.fingerprint, run_dir, run.data)
    if base is not None:  # the starting weights decide the architecture; the mode, the dropout
        model = GPTModel(replace(base.cfg, drop_rate=run.model.drop_rate)).to(device)
        model.load_state_dict(base.state_dict())
        run = replace(run, model_name=run.pretrained or run.checkpoint)
        grow_vocabulary(model, tokenizer.vocab_size)
        if run.task == "classify":
            add_classification_head(model, len(data.labels))
        choose_trainable(model, run.finetune, new_head=run.task == "classify")
    else:
        run = replace(run, model=replace(run.model, vocab_size=tokenizer.vocab_size))
        check_before_building(run.model, run.train, _ONE_PROCESS, device, resolve_precision(run.train.precision, device),
                              run.train.max_length)  # an upper bound for a classifier, whose head is smaller
        model = build_model(run, data.labels)
    run = replace(run, model=model.cfg)  # what build_model rebuilds from the checkpoint
    check_max_length(run.train, model.cfg, f"lower --max-length to at most {model.cfg.context_length}.")
    return _Run(run, run_dir, device, tokenizer, data, model.to(device), origin)


def _new_tokenizer(run: RunConfig):
    """The tokenizer the settings name, for a model trained from new weights."""
    if run.tokenizer in ("char", "train"):
        raise ConfigError(f"fine-tuning new weights with the {run.tokenizer!r} tokenizer is not supported: "
                          "use --tokenizer gpt2 or bpe, a saved BPE file, or start from a run (--checkpoint).")
    return get_tokenizer(run.tokenizer)


def _fit(job: _Run, cfg) -> tuple[Any, str]:
    """The memory check (or --batch-size auto) on the widest micro-batch: copies of the longest example."""
    data, device = job.data, job.device
    longest = max((data.train[i] for i in range(len(data.train))), key=lambda example: len(example[0]))

    def copies_of_longest(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = data.collate([longest] * size)
        return inputs.to(device), targets.to(device)

    return fit_micro_batch(job.model, cfg, _ONE_PROCESS, device, resolve_precision(cfg.precision, device),
                           copies_of_longest, copies_of_longest(1)[0].shape[1])


def _loaders(data: FinetuneData, cfg, seed: int) -> tuple[Loaders, DataLoader]:
    micro = micro_batch_size(cfg, _ONE_PROCESS)

    def loader(dataset, train: bool, name: str) -> DataLoader:
        return make_loader(dataset, data.collate, cfg.batch_size, micro, train, seed, name, cfg.num_workers)

    loaders = Loaders(train=loader(data.train, True, "the training split"),
                      train_eval=loader(data.train, False, "the training split"),
                      val=loader(data.val, False, "the validation split"),
                      accumulation=cfg.batch_size // micro, eval_batches=cfg.eval_iter * (cfg.batch_size // micro))
    return loaders, loader(data.test, False, "the test split")


def _print_header(job: _Run, setup: ScaledSetup, state: TrainState, loaders: Loaders, total_steps: int,
                  notes: list[str], fused: bool) -> None:
    run, model, cfg = job.run, job.model, job.run.train
    compile_note, memory_note = notes
    labels = job.data.labels
    print_rows(f"minigpt | {run.task} | {run.mode} mode", [
        ("device", device_row(setup, cfg)),
        ("speed", speed_row(setup, cfg, compile_note, fused)),
        ("starting from", job.origin),
        ("model", f"{model.cfg.n_layers} layers, {model.cfg.n_heads} heads, emb_dim {model.cfg.emb_dim}, "
                  f"context {model.cfg.context_length}, dropout {model.cfg.drop_rate}; "
                  + (f"head: {len(labels)} classes ({', '.join(labels)})" if run.task == "classify"
                     else f"vocab {model.cfg.vocab_size:,}")),
        ("trainable", trainable_description(model, run.finetune)),
        ("tokenizer", f"{job.tokenizer.name}, {job.tokenizer.vocab_size:,} tokens"),
        ("data", job.data.description),
        ("batches", f"{cfg.batch_size} examples per step, padded to the longest in the batch; "
                    f"{loaders.train.sampler.steps_per_epoch:,} steps per epoch"),
        ("training", optimizer_row(cfg, total_steps)),
        ("memory", memory_note),
        ("evaluation", f"every {cfg.eval_freq} steps on {cfg.eval_iter} batches per split; at the end on every "
                       "example of every split"),
        ("seed", str(run.seed)),
        ("run directory", run_dir_row(job.run_dir, state.global_step)),
    ])


def _epoch_note(job: _Run, loaders: Loaders, setup: ScaledSetup) -> Callable[[int], tuple[str, dict[str, Any]]]:
    """After each epoch: a classifier's train and validation accuracy, or an answer to a test instruction."""
    model, labels = job.model, job.data.labels

    def note(epoch: int) -> tuple[str, dict[str, Any]]:
        if job.run.task == "classify":
            with setup.autocast():
                train_acc = classification_report(confusion_matrix(model, loaders.train_eval, len(labels),
                                                                   setup.device, loaders.eval_batches),
                                                  labels)["accuracy"]
                val_acc = classification_report(confusion_matrix(model, loaders.val, len(labels), setup.device),
                                                labels)["accuracy"]
            text = (f"train accuracy {100 * train_acc:.1f}% ({loaders.eval_batches} batches), "
                    f"validation accuracy {100 * val_acc:.1f}%")
            return f"after epoch {epoch}: {text}", {"text": text, "train_accuracy": train_acc,
                                                    "val_accuracy": val_acc}
        record = job.data.test_records[0]
        text = (f"{record['instruction'][:60]!r} -> "
                f"{respond(model, job.tokenizer, record, job.run.finetune.prompt_style, 40)!r}")
        return f"after epoch {epoch}: {text}", {"text": text}

    return note


def _measure_after(job: _Run, metrics: dict[str, Any], loaders: Loaders, test_loader: DataLoader,
                   setup: ScaledSetup, stop: StopRequest) -> list[dict[str, Any]] | None:
    """After training: every split measured and, for sft, the test instructions answered and scored,
    into `metrics` (then "completed"); the answers. A stop request leaves `metrics` as it was."""
    run, model = job.run, job.model

    def measure_and_answer() -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
        after = measure(model, loaders, test_loader, setup, job.data.labels, with_train=True)
        print("after fine-tuning:  " + _describe(after), flush=True)
        return after, (answer_test_set(model, job.tokenizer, job.data.test_records, run.finetune)
                       if run.task == "sft" else None)

    measured = stop.unless_stopped(measure_and_answer, "the measurements after training")
    if measured is None:
        return None
    after, answered = measured
    metrics.update(completed=True, final_train_loss=after["train_loss"], final_val_loss=after["val_loss"],
                   best_val_loss=min(metrics["val_losses"] + [after["val_loss"]]), after=after,
                   # perplexity reads a language model's loss; a classifier's loss is over classes
                   perplexity=perplexity(after["val_loss"]) if run.task == "sft" else None)
    if answered is not None:
        metrics["test_scores"] = score_responses(answered, run.finetune)
    return answered


def _write_files(job: _Run, metrics: dict[str, Any], extra: dict[str, Any],
                 answered: list[dict[str, Any]] | None) -> list[str]:
    """The adapter (LoRA), the test answers (sft), config.json, metrics.json and the plots; their names."""
    run, run_dir = job.run, job.run_dir
    files = [CHECKPOINT_NAME, "config.json", "metrics.json"]
    if run.finetune.trainable == "lora":
        settings = {"rank": run.finetune.lora_rank, "alpha": run.finetune.lora_alpha,
                    "targets": list(run.finetune.lora_targets)}
        write_atomically(run_dir / ADAPTER_NAME, lambda path: save_adapter(job.model, path, settings))
        files.append(ADAPTER_NAME)
    if answered is not None:
        write_json(run_dir / RESPONSES_NAME, answered)  # a list, written as JSON like the rest
        files.append(RESPONSES_NAME)
    write_config(run_dir, run, {"labels": extra["labels"], "tokenizer_spec": extra["tokenizer_spec"],
                                "data_sha256": extra["data_sha256"]})
    write_json(run_dir / "metrics.json", metrics)
    if metrics["batch_losses"]:
        final = (metrics["steps"], metrics["final_train_loss"], metrics["final_val_loss"]) if "after" in metrics else None
        write_atomically(run_dir / "training_losses.png", lambda path: plot_losses(
            metrics["eval_steps"], metrics["train_losses"], metrics["val_losses"], path,
            batch_losses=metrics["batch_losses"], final=final, title=f"{run.task}, {run.mode} mode: loss"))
        files.append("training_losses.png")
    if run.task == "classify" and metrics["samples"]:
        points = [(0, metrics["before"]["val_report"]["accuracy"], None)] if metrics.get("before") else []
        points += [(s["step"], s["val_accuracy"], s["train_accuracy"]) for s in metrics["samples"]]
        write_atomically(run_dir / "accuracy.png", lambda path: plot_accuracy(
            points, path, title=f"classify, {run.mode} mode: accuracy"))
        files.append("accuracy.png")
    return files


def _print_task_summary(metrics: dict[str, Any], task: str) -> None:
    if task == "classify":
        report = metrics["after"]["test_report"]
        print(f"  test accuracy      {100 * report['accuracy']:.1f}% (before fine-tuning "
              f"{100 * metrics['before']['test_report']['accuracy']:.1f}%), macro F1 {report['macro_f1']:.3f}")
        print(f"  confusion (test)   rows true, columns predicted, {report['labels']}: {report['confusion_matrix']}")
        return
    scores = metrics["test_scores"]
    print(f"  val loss before    {metrics['before']['val_loss']:.3f} -> after {metrics['after']['val_loss']:.3f}")
    print(f"  test ROUGE-L F1    {scores['rouge_l']['f1']:.3f} (mean over the {scores['responses']} test responses, "
          f"greedy, at most {scores['max_new_tokens']} tokens each)")
    if scores["judge"]:
        print(f"  judge score        {scores['judge']['mean_score']} / 100 ({scores['judge']['judge_model']})")


def run_classify(run: RunConfig) -> None:
    """Fine-tune a classifier; or, given a classifier's run directory, classify texts with it."""
    task = load_checkpoint(run.checkpoint, mmap=True)["run"]["task"] if run.checkpoint else None
    if task != "classify":
        if run.prompt is not None:
            source = f"{run.checkpoint} holds a {task} run, not a classifier" if run.checkpoint else "no --checkpoint"
            raise ConfigError(f"--prompt classifies a text with a trained classifier, and {source}. Give a "
                              "--task classify run directory with --checkpoint, or drop --prompt to fine-tune a "
                              "classifier first.")
        finetune(run)
        return
    model, tokenizer, saved = load_model(run.checkpoint, pick_device(run.device))

    def show(text: str) -> None:
        label, probabilities = classify(model, tokenizer, text, saved["labels"], saved["train"]["max_length"])
        print(f"{label}  (" + ", ".join(f"{name} {p:.3f}" for name, p in probabilities.items()) + ")", flush=True)

    if run.prompt is not None:
        show(run.prompt)
        return
    print(f"Type a text and press Enter: the classifier in {run.checkpoint} names its class. "
          "An empty line or Ctrl-D quits.", file=sys.stderr)
    for text in typed_lines():
        try:
            show(text)
        except ConfigError as err:  # a text this tokenizer cannot read: say why, and keep listening
            print(f"error: {err}", file=sys.stderr, flush=True)
