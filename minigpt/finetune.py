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

The pipeline `python main.py --task classify | sft` runs is `minigpt.task_finetune.finetune`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from minigpt.config import ConfigError, FinetuneConfig, RunConfig
from minigpt.data import IGNORE_INDEX, SeededSampler, encode_prompt, format_prompt
from minigpt.generation import generate
from minigpt.lora import count_parameters, inject_lora, lora_layers, merge_lora
from minigpt.model import GPTModel

# Splits, as in the book: labelled texts 70% / 10% / 20% (train / validation / test) after a
# seeded shuffle; instructions (and preference pairs, chapter 8) 85% train, then 5% validation
# and 10% test, in file order.
CLASSIFY_SPLIT = (0.7, 0.1)
SFT_SPLIT = (0.85, 0.05)


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
# Instruction fine-tuning: the model answers an instruction
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


# ---------------------------------------------------------------------------------------
# Batches of examples
# ---------------------------------------------------------------------------------------

def make_loader(dataset, collate, batch_size: int, micro: int, train: bool, seed: int, name: str,
                num_workers: int = 0) -> DataLoader:
    """Training batches in a seeded order that a resumed run replays (whole batches only, read in
    micro-batches of `micro`), or every example once in order for evaluation."""
    if train and len(dataset) < batch_size:
        raise ConfigError(f"{name} has {len(dataset)} examples, fewer than one batch of batch_size="
                          f"{batch_size}; lower batch_size (--batch-size) or give more data.")
    sampler = SeededSampler(len(dataset), shuffle=train, seed=seed, batch_size=batch_size if train else 1)
    return DataLoader(dataset, batch_size=micro, sampler=sampler, collate_fn=collate, drop_last=train,
                      num_workers=num_workers, generator=torch.Generator().manual_seed(seed))
