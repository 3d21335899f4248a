"""Fine-tuning (chapter 7): the same GPT, taught to sort texts into classes or to follow
instructions, by the same training loop.

- Classification: the output head that scored 50,257 tokens is replaced by one that scores
  `num_classes` classes, read at each text's last real token (the one position whose causal
  attention has seen the whole text). Training only the head, the last blocks, everything,
  or LoRA adapters (`minigpt.lora`) are one setting apart.
- Instruction fine-tuning (SFT): each example is a prompt written with one template
  (`minigpt.data.format_prompt`) followed by the answer and <|endoftext|>; the loss is the
  usual next-token loss, optionally on the answer only. After training, the model answers
  the held-out instructions, and the answers are scored against the references with ROUGE-L
  and, when one runs locally, an LLM judge.

`finetune(run)` is what `python main.py --task classify | sft` runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from minigpt.config import PRETRAINED_NAMES, ConfigError, FinetuneConfig, RunConfig
from minigpt.data import (CHAT_TOKENS, IGNORE_INDEX, ClassificationDataset, InstructionDataset, SeededSampler,
                          balance_classes, classification_collate, encode_prompt, format_prompt,
                          instruction_collate, load_instruction_data, load_sms_spam, read_labeled_texts,
                          split_dataset)
from minigpt.evaluate import judge_responses, mean_rouge_l, rouge_l
from minigpt.generation import generate
from minigpt.lora import count_parameters, inject_lora, lora_layers, merge_lora, save_adapter
from minigpt.model import GPTModel
from minigpt.plot import plot_accuracy, plot_losses
from minigpt.tokenizer import get_tokenizer, tokenizer_from_spec
from minigpt.train import (BEST_NAME, CHECKPOINT_NAME, Distributed, Loaders, StepSetup, StopRequest, TrainState,
                           autocast, calc_loss_loader, choose_run_dir, compile_model, fit_micro_batch, load_checkpoint,
                           load_model, make_metrics, make_optimizer, micro_batch_size, peak_tflops, pick_device,
                           precision_reason, print_rows, print_summary, resolve_precision, restore_rng, rng_states,
                           save_checkpoint, save_weights, train_loop)

# Splits, as in the book: labelled texts 70% / 10% / 20% (train / validation / test) after a
# seeded shuffle; instructions 85% train, then 5% validation and 10% test, in file order.
CLASSIFY_SPLIT = (0.7, 0.1)
SFT_SPLIT = (0.85, 0.05)
ADAPTER_NAME = "adapter.pt"
RESPONSES_NAME = "test_responses.json"
_ONE_PROCESS = Distributed()  # fine-tuning runs in one process; torchrun is for pretraining


# ---------------------------------------------------------------------------------------
# The model: a new head, a bigger vocabulary, and what to train
# ---------------------------------------------------------------------------------------

def replace_head(model: GPTModel, num_outputs: int, std: float = 0.02) -> GPTModel:
    """Give the model a new output head of `num_outputs` scores per position: weights N(0, std)
    (std 0 gives zeros), zero bias. A tied head is untied: the token embedding keeps its weights."""
    weight = model.out_head.weight
    model.out_head = nn.Linear(model.cfg.emb_dim, num_outputs).to(weight.device, weight.dtype)
    if std > 0:
        nn.init.normal_(model.out_head.weight, mean=0.0, std=std)
    else:
        nn.init.zeros_(model.out_head.weight)
    nn.init.zeros_(model.out_head.bias)
    model.cfg = replace(model.cfg, tie_weights=False)
    return model


def add_classification_head(model: GPTModel, num_classes: int) -> GPTModel:
    """Replace the vocabulary head by a `num_classes` head: logits (B, T, num_classes), starting
    like every Linear of the model (N(0, 0.02), zero bias)."""
    if num_classes < 2:
        raise ConfigError(f"a classifier needs at least two classes, got {num_classes}.")
    return replace_head(model, num_classes)


def grow_vocabulary(model: GPTModel, vocab_size: int) -> GPTModel:
    """Give the embedding and the head rows for new tokens (a chat format's special tokens).

    A new token starts at the mean of the existing token vectors, so its first logits are an
    average token's rather than random ones, and a tied head stays tied.
    """
    old_size = model.cfg.vocab_size
    if vocab_size <= old_size:
        return model
    def grown(rows: torch.Tensor) -> nn.Parameter:  # (old_size, C) -> (vocab_size, C)
        mean = rows.mean(dim=0, keepdim=True).expand(vocab_size - old_size, -1)
        return nn.Parameter(torch.cat([rows, mean]))

    head = model.out_head.weight.data
    model.tok_emb.weight = grown(model.tok_emb.weight.data)
    model.tok_emb.num_embeddings = vocab_size
    model.out_head.weight = model.tok_emb.weight if model.cfg.tie_weights else grown(head)
    model.out_head.out_features = vocab_size
    model.cfg = replace(model.cfg, vocab_size=vocab_size)
    return model


def choose_trainable(model: GPTModel, cfg: FinetuneConfig, new_head: bool = True) -> GPTModel:
    """Freeze what `cfg.trainable` leaves out.

    all          every weight;
    last_blocks  the last `last_blocks` transformer blocks, the final norm and the head;
    head         the head only (the model is a fixed feature extractor);
    lora         LoRA adapters in `lora_targets`, every other weight frozen; and the head if it
                 is `new_head` (a classifier's, which starts untrained). A language model's
                 head stays frozen: tied to the embedding, it is a third of GPT-2 small.
    """
    if cfg.trainable == "lora":
        inject_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets,
                    dropout=cfg.lora_dropout)
        if new_head:
            model.out_head.requires_grad_(True)
        return model
    if cfg.trainable == "last_blocks" and cfg.last_blocks > len(model.trf_blocks):
        raise ConfigError(f"last_blocks is {cfg.last_blocks} but the model has {len(model.trf_blocks)} "
                          f"blocks; lower it, or set trainable to 'all'.")
    model.requires_grad_(cfg.trainable == "all")
    if cfg.trainable == "last_blocks":
        model.trf_blocks[-cfg.last_blocks:].requires_grad_(True)
        model.final_norm.requires_grad_(True)
    model.out_head.requires_grad_(True)
    return model


def build_model(run: RunConfig, labels: list[str] | None = None) -> GPTModel:
    """The model a fine-tuning run trains, with new weights: what a checkpoint's weights load into."""
    model = GPTModel(run.model)
    if run.task == "classify":
        if not labels:
            raise ConfigError("the checkpoint of a classifier lists no class names; it is damaged.")
        add_classification_head(model, len(labels))
    return choose_trainable(model, run.finetune, new_head=run.task == "classify")


def merge_and_unload(model: GPTModel) -> GPTModel:
    """Fold every LoRA adapter into its weight and put the plain Linear back: the same
    outputs, no extra cost, and the state dict of an ordinary GPTModel (for export)."""
    merge_lora(model)
    for name, layer in lora_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)
    model.requires_grad_(True)
    return model


def trainable_description(model: nn.Module, cfg: FinetuneConfig) -> str:
    trainable, total = count_parameters(model)
    what = {"all": "every weight", "head": "the output head only",
            "last_blocks": f"the last {cfg.last_blocks} block(s), the final norm and the head",
            "lora": f"LoRA rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g} on {', '.join(cfg.lora_targets)} "
                    f"({len(lora_layers(model))} layers)"
                    + (", and the head" if model.out_head.weight.requires_grad else "")}[cfg.trainable]
    return f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%): {what}"


# ---------------------------------------------------------------------------------------
# Classification: predictions and the numbers that judge them
# ---------------------------------------------------------------------------------------

def last_token_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The (B, num_classes) logits at each text's last real token: where its target is set."""
    return logits[targets != IGNORE_INDEX]


@torch.no_grad()
def confusion_matrix(model: nn.Module, loader: DataLoader, num_classes: int,
                     device: torch.device | str, num_batches: int | None = None) -> torch.Tensor:
    """counts[true class, predicted class] over the loader's batches (all of them if None)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for i, (inputs, targets) in enumerate(loader):
        if num_batches is not None and i >= num_batches:
            break
        logits = model(inputs.to(device))
        predicted = last_token_logits(logits, targets.to(device)).argmax(dim=-1).cpu()
        labels = targets[targets != IGNORE_INDEX]
        counts += torch.bincount(labels * num_classes + predicted, minlength=num_classes ** 2).view(num_classes, num_classes)
    model.train(was_training)
    return counts


def classification_report(counts: torch.Tensor, labels: list[str]) -> dict[str, Any]:
    """Accuracy, and precision / recall / F1 per class and their unweighted (macro) means.

    precision: of the texts predicted as c, the share that are c; recall: of the texts that
    are c, the share predicted as c; F1 = 2PR / (P + R). A class never predicted (or never
    present) gets precision (recall) 0.
    """
    counts = counts.double()
    correct = counts.diag()
    predicted, actual = counts.sum(dim=0), counts.sum(dim=1)
    precision = torch.where(predicted > 0, correct / predicted.clamp(min=1), torch.zeros_like(correct))
    recall = torch.where(actual > 0, correct / actual.clamp(min=1), torch.zeros_like(correct))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(correct))
    return {
        "examples": int(counts.sum()),
        "accuracy": float(correct.sum() / counts.sum().clamp(min=1)),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "per_class": {label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                              "support": int(actual[i])} for i, label in enumerate(labels)},
        "confusion_matrix": counts.long().tolist(),  # rows: true class, columns: predicted
        "labels": labels,
    }


@torch.no_grad()
def classify(model: nn.Module, tokenizer, text: str, labels: list[str],
             max_length: int | None = None) -> tuple[str, dict[str, float]]:
    """The predicted class of `text` and every class's probability."""
    ids = tokenizer.encode(text, disallowed_special=())[:max_length or model.cfg.context_length]
    if not ids:
        raise ConfigError("the text to classify is empty; give some text.")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits = model(torch.tensor([ids], device=device))[0, -1]  # the last token: (num_classes,)
    model.train(was_training)
    probabilities = torch.softmax(logits.float(), dim=-1).tolist()
    best = max(range(len(labels)), key=lambda i: probabilities[i])
    return labels[best], dict(zip(labels, probabilities))


# ---------------------------------------------------------------------------------------
# Instruction fine-tuning: answers to held-out instructions, and their scores
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def respond(model: nn.Module, tokenizer, record: dict[str, str], style: str = "alpaca",
            max_new_tokens: int = 128) -> str:
    """The model's answer to one instruction record: greedy, until <|endoftext|> or the limit."""
    device = next(model.parameters()).device
    prompt = encode_prompt(format_prompt(record, style), tokenizer, style)
    room = model.cfg.context_length - len(prompt)
    if room <= 0:
        return ""
    ids = generate(model, torch.tensor([prompt], device=device), max_new_tokens=min(max_new_tokens, room),
                   temperature=0.0, eos_id=tokenizer.eos_id)[0, len(prompt):].tolist()
    if tokenizer.eos_id in ids:
        ids = ids[:ids.index(tokenizer.eos_id)]
    return tokenizer.decode(ids).strip()


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


# ---------------------------------------------------------------------------------------
# The pipeline behind `python main.py --task classify | sft`
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


def fingerprint(items: Any) -> str:
    """Identifies the data, so that a resumed run can check it trains on the same."""
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()


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


def make_loader(dataset, collate, batch_size: int, micro: int, train: bool, seed: int, name: str) -> DataLoader:
    """Training batches in a seeded order that a resumed run replays (whole batches only), or
    every example once in order for evaluation."""
    if train and len(dataset) < batch_size:
        raise ConfigError(f"{name} has {len(dataset)} examples, fewer than one batch of batch_size="
                          f"{batch_size}; lower batch_size (--batch-size) or give more data.")
    sampler = SeededSampler(len(dataset), shuffle=train, seed=seed, batch_size=batch_size if train else 1)
    return DataLoader(dataset, batch_size=micro, sampler=sampler, collate_fn=collate, drop_last=train,
                      generator=torch.Generator().manual_seed(seed))


def starting_point(run: RunConfig, device: torch.device) -> tuple[GPTModel | None, Any, str]:
    """The weights fine-tuning starts from (None: new ones), their tokenizer, and a description."""
    if run.checkpoint:
        model, tokenizer, saved = load_model(run.checkpoint, device)
        if saved.get("task") == "classify":
            raise ConfigError(f"{run.checkpoint} holds a classifier; fine-tune from a pretrained or "
                              "instruction-tuned run, or classify texts with it: --task classify "
                              f"--checkpoint {run.checkpoint} --prompt TEXT.")
        return model, tokenizer, f"the minigpt run {run.checkpoint} ({saved['model_name']})"
    if run.pretrained:
        model = GPTModel.from_pretrained(run.pretrained).to(device)
        where = f"OpenAI's {run.pretrained}" if run.pretrained in PRETRAINED_NAMES else f"the GPT-2 in {run.pretrained}"
        return model, get_tokenizer("gpt2"), f"{where} ({model.num_parameters():,} parameters)"
    return None, None, f"new weights ({run.model_name})"


def finetune(run: RunConfig, stop: StopRequest | None = None) -> tuple[GPTModel, Any, dict[str, Any], Path]:
    """Fine-tune as `run` says (task classify or sft), writing the run directory; returns
    (model, tokenizer, metrics, run directory). One process: torchrun is for pretraining."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("fine-tuning runs in one process (torchrun is for pretraining); start it with "
                          "python main.py --task classify | sft.")
    checkpoint = load_checkpoint(run.resume) if run.resume else None
    device = pick_device(run.device)
    torch.manual_seed(run.seed)
    run_dir = choose_run_dir(run)
    cfg, task = run.train, run.task

    labels = checkpoint.get("labels") if checkpoint else None
    if checkpoint is not None:
        base, tokenizer, origin = None, tokenizer_from_spec(checkpoint["tokenizer_spec"]), "its checkpoint"
    else:
        base, tokenizer, origin = starting_point(run, device)
    if tokenizer is None:  # new weights: the tokenizer the settings name
        tokenizer = _new_tokenizer(run)
    if task == "sft" and run.finetune.prompt_style == "chat":
        tokenizer = tokenizer.with_special_tokens(CHAT_TOKENS)
    data = prepare_classification(run, tokenizer, labels) if task == "classify" else prepare_instructions(run, tokenizer)
    if checkpoint is not None and checkpoint["data_sha256"] != data.fingerprint:
        raise ConfigError(f"the data differs from what the run in {run_dir} started with; resume with the "
                          "same --data, or start a new run.")
    labels = data.labels

    if base is not None:  # the starting weights decide the architecture; the mode, the dropout
        model = GPTModel(replace(base.cfg, drop_rate=run.model.drop_rate)).to(device)
        model.load_state_dict(base.state_dict())
        run = replace(run, model_name=run.pretrained or run.checkpoint)
        grow_vocabulary(model, tokenizer.vocab_size)
        if task == "classify":
            add_classification_head(model, len(labels))
        choose_trainable(model, run.finetune, new_head=task == "classify")
    else:
        run = replace(run, model=replace(run.model, vocab_size=tokenizer.vocab_size))
        model = build_model(run, labels)
    run = replace(run, model=model.cfg)  # what build_model rebuilds from the checkpoint
    if cfg.max_length > model.cfg.context_length:
        raise ConfigError(f"max_length ({cfg.max_length}) is longer than the model's context_length "
                          f"({model.cfg.context_length}); lower max_length to at most {model.cfg.context_length}.")
    model.to(device)

    # Optimizer, precision and memory before the loaders: they need the micro-batch size it settles.
    optimizer = make_optimizer(model, cfg)  # frozen weights get no gradient, so AdamW keeps no state for them
    precision = resolve_precision(cfg.precision, device)
    longest = max((data.train[i] for i in range(len(data.train))), key=lambda example: len(example[0]))

    def copies_of_longest(size: int) -> tuple[torch.Tensor, torch.Tensor]:  # the widest micro-batch
        inputs, targets = data.collate([longest] * size)
        return inputs.to(device), targets.to(device)

    cfg, memory_note = fit_micro_batch(model, cfg, _ONE_PROCESS, device, precision, copies_of_longest,
                                       copies_of_longest(1)[0].shape[1])
    run = replace(run, train=cfg)
    micro = micro_batch_size(cfg, _ONE_PROCESS)
    loaders = Loaders(
        train=make_loader(data.train, data.collate, cfg.batch_size, micro, True, run.seed, "the training split"),
        train_eval=make_loader(data.train, data.collate, cfg.batch_size, micro, False, run.seed, "the training split"),
        val=make_loader(data.val, data.collate, cfg.batch_size, micro, False, run.seed, "the validation split"))
    test_loader = make_loader(data.test, data.collate, cfg.batch_size, micro, False, run.seed, "the test split")
    eval_batches = cfg.eval_iter * (cfg.batch_size // micro)
    steps_per_epoch = loaders.train.sampler.steps_per_epoch
    total_steps = min(steps_per_epoch * cfg.num_epochs, cfg.max_steps or math.inf)

    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    state = TrainState()
    before: dict[str, Any] = {}
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = TrainState(**checkpoint["state"])
        restore_rng(checkpoint["rng"], _ONE_PROCESS)
        before = checkpoint.get("before", {})
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        if state.epoch >= cfg.num_epochs or state.global_step >= total_steps:
            raise ConfigError(f"the run in {run_dir} already finished; raise --epochs to train it further.")
    fast_model, compile_note = compile_model(model, cfg.compile, device)
    setup = StepSetup(device, precision, scaler, _ONE_PROCESS, peak_tflops(device, cfg),
                      model.flops_per_token(cfg.max_length))

    run_dir.mkdir(parents=True, exist_ok=True)
    print_rows(f"minigpt | {task} | {run.mode} mode", [
        ("device", f"{device}, torch {torch.__version__}; precision {precision}"
                   f"{precision_reason(cfg.precision, device)}, compile {compile_note}"),
        ("starting from", origin),
        ("model", f"{model.cfg.n_layers} layers, {model.cfg.n_heads} heads, emb_dim {model.cfg.emb_dim}, "
                  f"context {model.cfg.context_length}, dropout {model.cfg.drop_rate}; "
                  + (f"head: {len(labels)} classes ({', '.join(labels)})" if task == "classify"
                     else f"vocab {model.cfg.vocab_size:,}")),
        ("trainable", trainable_description(model, run.finetune)),
        ("tokenizer", f"{tokenizer.name}, {tokenizer.vocab_size:,} tokens"),
        ("data", data.description),
        ("batches", f"{cfg.batch_size} examples per step, padded to the longest in the batch; "
                    f"{steps_per_epoch:,} steps per epoch"),
        ("training", f"{cfg.num_epochs} epoch(s), {total_steps:,} steps; AdamW lr {cfg.learning_rate:g} "
                     f"({cfg.lr_schedule}{f', {cfg.warmup_steps} warm-up steps' if cfg.warmup_steps else ''}), "
                     f"weight decay {cfg.weight_decay}, grad clip {cfg.grad_clip}"),
        ("memory", memory_note),
        ("evaluation", f"every {cfg.eval_freq} steps on {cfg.eval_iter} batches per split; at the end on every "
                       "example of every split"),
        ("seed", str(run.seed)),
        ("run directory", str(run_dir) + (f" (resuming at step {state.global_step})" if state.global_step else "")),
    ])

    if not before:  # where fine-tuning starts: the numbers it should move
        before = _measure(model, loaders.val, test_loader, device, precision, labels)
        print("before fine-tuning: " + _describe(before), flush=True)

    def epoch_note() -> dict[str, Any]:
        if task == "classify":
            with autocast(precision, device):
                train_acc = classification_report(confusion_matrix(model, loaders.train_eval, len(labels), device,
                                                                   eval_batches), labels)["accuracy"]
                val_acc = classification_report(confusion_matrix(model, loaders.val, len(labels), device),
                                                 labels)["accuracy"]
            return {"text": f"train accuracy {100 * train_acc:.1f}% ({eval_batches} batches), "
                            f"validation accuracy {100 * val_acc:.1f}%",
                    "train_accuracy": train_acc, "val_accuracy": val_acc}
        record = data.test_records[0]
        return {"text": f"{record['instruction'][:60]!r} -> "
                        f"{respond(model, tokenizer, record, run.finetune.prompt_style, 40)!r}"}

    extra = {"tokenizer_spec": tokenizer.spec(), "data_sha256": data.fingerprint, "labels": labels, "before": before}

    def save(completed: bool) -> None:
        save_checkpoint(run_dir / CHECKPOINT_NAME, model, optimizer, state, run, extra, rng_states(_ONE_PROCESS),
                        scaler)

    with (stop or StopRequest()) as stop:
        completed = train_loop(model, optimizer, loaders, device, cfg, state, total_steps, tokenizer,
                               log_every=run.log_every, stop=stop, on_epoch_end=lambda: save(False), setup=setup,
                               train_model=fast_model, eval_batches=eval_batches, epoch_note=epoch_note,
                               on_best=lambda: save_weights(run_dir / BEST_NAME, model, run, extra))
    save(completed)
    metrics = make_metrics(state, model, device, completed, None, run, setup, compile_note)
    files = [CHECKPOINT_NAME, "config.json", "metrics.json", "training_losses.png"]
    if completed:
        after = _measure(model, loaders.val, test_loader, device, precision, labels, loaders.train_eval)
        print("after fine-tuning:  " + _describe(after), flush=True)
        metrics.update(final_train_loss=after["train_loss"], final_val_loss=after["val_loss"],
                       best_val_loss=min(metrics["val_losses"] + [after["val_loss"]]),
                       # perplexity reads a language model's loss; a classifier's loss is over classes
                       perplexity=math.exp(after["val_loss"]) if task == "sft" else None)
        metrics.update(before=before, after=after)
        if task == "sft":
            answered = answer_test_set(model, tokenizer, data.test_records, run.finetune)
            scores = score_responses(answered, run.finetune)
            (run_dir / RESPONSES_NAME).write_text(json.dumps(answered, indent=2, ensure_ascii=False) + "\n")
            metrics["test_scores"] = scores
            files.append(RESPONSES_NAME)
    if run.finetune.trainable == "lora":
        save_adapter(model, run_dir / ADAPTER_NAME, {"rank": run.finetune.lora_rank, "alpha": run.finetune.lora_alpha,
                                                      "targets": list(run.finetune.lora_targets)})
        files.append(ADAPTER_NAME)
    _write_files(run_dir, run, metrics, extra, task, labels)
    if task == "classify" and metrics["samples"]:
        files.append("accuracy.png")
    print_summary(metrics, run_dir, completed, files)
    if completed:
        _print_task_summary(metrics, task)
    return model, tokenizer, metrics, run_dir



def _new_tokenizer(run: RunConfig):
    """The tokenizer the settings name, for a model trained from new weights."""
    if run.tokenizer in ("char", "train"):
        raise ConfigError(f"fine-tuning new weights with the {run.tokenizer!r} tokenizer is not supported: "
                          "use --tokenizer gpt2 or bpe, a saved BPE file, or start from a run (--checkpoint).")
    return get_tokenizer(run.tokenizer)


@torch.no_grad()
def _measure(model: nn.Module, val_loader: DataLoader, test_loader: DataLoader, device: torch.device,
             precision: str, labels: list[str] | None, train_loader: DataLoader | None = None) -> dict[str, Any]:
    """Loss on every example of the splits given, and for a classifier its test report."""
    with autocast(precision, device):
        result: dict[str, Any] = {"val_loss": calc_loss_loader(val_loader, model, device),
                                  "test_loss": calc_loss_loader(test_loader, model, device)}
        if train_loader is not None:
            result["train_loss"] = calc_loss_loader(train_loader, model, device)
        if labels:
            for name, loader in (("val", val_loader), ("test", test_loader)) + (
                    (("train", train_loader),) if train_loader is not None else ()):
                result[f"{name}_report"] = classification_report(
                    confusion_matrix(model, loader, len(labels), device), labels)
    return result


def _describe(numbers: dict[str, Any]) -> str:
    text = f"validation loss {numbers['val_loss']:.3f}, test loss {numbers['test_loss']:.3f}"
    if "test_report" in numbers:
        text += (f"; accuracy: validation {100 * numbers['val_report']['accuracy']:.1f}%, "
                 f"test {100 * numbers['test_report']['accuracy']:.1f}%")
    return text


def _write_files(run_dir: Path, run: RunConfig, metrics: dict[str, Any], extra: dict[str, Any], task: str,
                 labels: list[str] | None) -> None:
    config = {**run.to_dict(), "labels": labels, "tokenizer_spec": extra["tokenizer_spec"],
              "data_sha256": extra["data_sha256"], "torch_version": torch.__version__}
    (run_dir / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    if metrics["batch_losses"]:
        final = (metrics["steps"], metrics["final_train_loss"], metrics["final_val_loss"]) if "after" in metrics else None
        plot_losses(metrics["eval_steps"], metrics["train_losses"], metrics["val_losses"],
                    run_dir / "training_losses.png", batch_losses=metrics["batch_losses"], final=final,
                    title=f"{task}, {run.mode} mode: loss")
    if task == "classify" and metrics["samples"]:
        points = [(0, metrics["before"]["val_report"]["accuracy"], None)] if metrics.get("before") else []
        points += [(s["step"], s["val_accuracy"], s["train_accuracy"]) for s in metrics["samples"]]
        plot_accuracy(points, run_dir / "accuracy.png", title=f"classify, {run.mode} mode: accuracy")


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
