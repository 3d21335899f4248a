"""The pretraining pipeline, what `python main.py` runs: settings -> start point (new weights, or
a checkpoint to resume) -> data (a text tokenized in memory, or token files on disk for a large
corpus) -> model -> `make_optimizer` -> `train_loop` -> the final evaluation -> the run's files.

Started by `torchrun --nproc_per_node=N`, it is one of N data-parallel processes: each trains on
its share of every batch, and only rank 0 prints and writes files. `train_model` is the same
pipeline for a script or a notebook.
"""

from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from minigpt.config import (MODEL_PRESETS, TOKENIZERS, ConfigError, GPTConfig, RunConfig, TrainConfig,
                            check_max_length, did_you_mean, model_config)
from minigpt.data import (VOCAB_NAME, ClassificationDataset, SplitTexts, TokenFile, corpus_characters, corpus_files,
                          corpus_path, corpus_sample, create_dataloader, data_format, file_sha256, first_characters,
                          hf_split_texts, is_large, is_large_corpus, keyed_token_folder, labelled_sequence_collate,
                          named_split_texts, read_corpus, read_labeled_texts,
                          read_token_files, split_dataset, split_text, token_folder, token_id_chunks, vocabulary_files,
                          write_split_token_files, write_token_files, write_token_stream)
from minigpt.finetune import make_loader
from minigpt.generation import generate_text, text_to_token_ids
from minigpt.graph import GraphModel
from minigpt.model import GPTModel
from minigpt.plot import plot_losses
from minigpt.runs import (BEST_NAME, CHECKPOINT_NAME, TOKENIZER_NAME, RunDirectory, StopRequest,
                          check_same_data, device_row, finished, load_checkpoint, make_metrics, optimizer_row,
                          pick_device, print_rows, print_summary, restore_training, rng_states, run_dir_row,
                          save_checkpoint, save_weights, speed_row, write_atomically, write_config, write_json,
                          export_hf_folders, language_model)
from minigpt.runs import fingerprint as fingerprint_of  # (the runs' own word for it; `fingerprint` names values here)
from minigpt.scale import (Distributed, ScaledSetup, check_before_building, fit_micro_batch, micro_batch_size,
                           resolve_precision, scaled_setup, start_distributed)
from minigpt.tokenizer import BPETokenizer, VocabTokenizer, get_tokenizer, tokenizer_from_spec
from minigpt.train import Loaders, LoopEvents, TrainState, evaluate_model, make_optimizer, planned_steps, train_loop

# A BPE trained for a large corpus learns from its first this many characters.
BPE_SAMPLE_CHARS = 10_000_000
# The final evaluation of a token-file corpus reads this many batches (of batch_size windows) of each split.
FINAL_EVAL_BATCHES = 200
# The training split's loss is measured on at most this many windows, spread evenly over the split:
# every window of Tiny Shakespeare's would take a fifth of a 2,000-step run to score (chapter 9).
TRAIN_EVAL_WINDOWS = 2_000


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------

@dataclass
class Corpus:
    """The training data, tokenized: ids in memory for a small text, token files for a large one."""

    tokenizer: Any
    train_ids: list[int] | TokenFile
    val_ids: list[int] | TokenFile
    fingerprint: str        # identifies the data, so a resumed run can check it is the same
    description: str        # the header's "data" line
    tokenizer_note: str     # the header's "tokenizer" line
    on_disk: bool           # token files (random windows by default) rather than a list
    source: str             # where the data came from (config.json's data_path)
    labelled: tuple[ClassificationDataset, ClassificationDataset] | None = None  # labelled texts: train, validation


def prepare_corpus(run: RunConfig, checkpoint: dict[str, Any] | None, world: Distributed) -> Corpus:
    """Read and tokenize `run.data` in its format (`data_format`), building the tokenizer first unless a
    resumed run brings its own: a text cut by val_fraction, a corpus with its own splits, or token ids."""
    if run.graph is not None and run.graph.get("labels"):
        return _prepare_labelled(run, checkpoint)
    kind = data_format(run.data, run.data_format)
    if kind == "tokens":
        return _prepare_token_ids(run, corpus_path(run.data), checkpoint, world)
    splits = hf_split_texts(run.data, run.text_field, run.train.val_fraction) if kind == "hf" \
        else named_split_texts(run.data)
    if splits is not None:
        return _prepare_splits(run, splits, checkpoint, world)
    path = corpus_path(run.data)
    text_field = run.text_field if kind == "json" else None  # "text": a .jsonl read as plain text
    if is_large_corpus(path):
        return _prepare_token_files(run, path, text_field, checkpoint, world)
    text = read_corpus(path, text_field)
    fingerprint = hashlib.sha256(text.encode("utf-8")).hexdigest()
    train_text, val_text = split_text(text, train_ratio=1 - run.train.val_fraction)
    started = time.perf_counter()
    if checkpoint is not None:
        tokenizer = tokenizer_from_spec(checkpoint["tokenizer_spec"])
    else:
        # A trained BPE learns from the training split only, so validation text stays unseen;
        # a character vocabulary needs every character of both splits to encode them.
        tokenizer = _build_tokenizer(run, train_text if run.tokenizer == "train" else text)
    note = describe_tokenizer(tokenizer, run, time.perf_counter() - started, resumed=checkpoint is not None)
    # "<|endoftext|>" written in the corpus separates documents: encode it as its token.
    train_ids = tokenizer.encode(train_text, allowed_special="all")
    val_ids = tokenizer.encode(val_text, allowed_special="all")
    description = (f"{path.name}: {len(text):,} characters, {len(train_ids) + len(val_ids):,} tokens "
                   f"({tokenizer.name}); train {len(train_ids):,} / validation {len(val_ids):,} tokens")
    return Corpus(tokenizer, train_ids, val_ids, fingerprint, description, note, on_disk=False,
                  source=str(path.resolve()))


def _prepare_labelled(run: RunConfig, checkpoint: dict[str, Any] | None) -> Corpus:
    """Labelled texts for a studio graph with a sequence-classification loss: each text a sequence of
    its own (its first max_length + 1 tokens), a seeded val_fraction of the texts held out."""
    path = corpus_path(run.data)
    pairs = read_labeled_texts(path)
    val_fraction = run.train.val_fraction
    train_pairs, val_pairs, _ = split_dataset(pairs, 1 - val_fraction, val_fraction, seed=run.seed)
    started = time.perf_counter()
    if checkpoint is not None:
        tokenizer = tokenizer_from_spec(checkpoint["tokenizer_spec"])
    else:  # characters: every one of the file (as the studio counted them); a BPE: the training texts
        tokenizer = _build_tokenizer(run, "\n".join(t for t, _ in train_pairs) if run.tokenizer == "train"
                                     else path.read_text(encoding="utf-8"))
    note = describe_tokenizer(tokenizer, run, time.perf_counter() - started, resumed=checkpoint is not None)
    labels = run.graph["labels"]
    splits = [ClassificationDataset(part, tokenizer, labels, run.train.max_length + 1) for part in (train_pairs, val_pairs)]
    for split in splits:  # a text of one token has no next token to predict
        split.examples = [example for example in split.examples if len(example[0]) >= 2]
    train, val = splits
    if len(train) < run.train.batch_size or not len(val):
        raise ConfigError(f"{path.name} gives {len(train)} training and {len(val)} validation texts of two tokens "
                          f"or more; it needs a batch ({run.train.batch_size}) of training texts and one to "
                          "validate: give more texts, or lower the batch size.")
    description = (f"{path.name}: {len(pairs):,} labelled texts, {len(labels)} classes ({', '.join(labels[:6])}"
                   f"{', ...' if len(labels) > 6 else ''}); train {len(train):,} / validation {len(val):,} texts, "
                   f"each padded on the left to {run.train.max_length} tokens")
    return Corpus(tokenizer, [t for ids, _ in train.examples for t in ids], [t for ids, _ in val.examples for t in ids],
                  file_sha256(path), description, note, on_disk=False, source=str(path.resolve()), labelled=(train, val))


def _prepare_token_files(run: RunConfig, path: Path, text_field: str | None, checkpoint: dict[str, Any] | None,
                         world: Distributed) -> Corpus:
    """Tokenize a large corpus once into token files (rank 0 writes, the others wait), or reuse them."""
    files = corpus_files(path)
    key = _tokenizer_key(run)
    if run.train.val_fraction != 0.1 or text_field != "text":  # other splits or texts: other token files
        key += f"-val{run.train.val_fraction}-{text_field}"

    def write(folder: Path) -> None:
        if checkpoint is not None:
            tokenizer = tokenizer_from_spec(checkpoint["tokenizer_spec"])
        elif run.tokenizer == "char":
            tokenizer = _build_tokenizer(run, corpus_characters(files, text_field))
        else:
            tokenizer = _build_tokenizer(run, corpus_sample(files, BPE_SAMPLE_CHARS, text_field))
        write_token_files(files, tokenizer, folder, 1 - run.train.val_fraction, text_field)

    listing = [(str(f.resolve()), f.stat().st_size) for f in files]
    return _token_file_corpus(run, token_folder(files, key), write, checkpoint, world,
                              f"{path.name}: {len(files):,} file(s)", fingerprint=fingerprint_of(listing),
                              source=str(path.resolve()))


def _prepare_splits(run: RunConfig, splits: SplitTexts, checkpoint: dict[str, Any] | None,
                    world: Distributed) -> Corpus:
    """A corpus with splits of its own (WikiText, the Penn Treebank, a Hugging Face dataset): its train
    split trains and its validation split validates, in memory, or through token files when large."""
    def build_tokenizer():
        if checkpoint is not None:
            return tokenizer_from_spec(checkpoint["tokenizer_spec"])
        if run.tokenizer == "char":  # every split's characters (the test split's too, for --task evaluate)
            return _build_tokenizer(run, splits.characters())
        return _build_tokenizer(run, first_characters(splits.texts["train"](), BPE_SAMPLE_CHARS))

    if is_large(splits.num_bytes):
        def write(folder: Path) -> None:
            write_split_token_files(splits, build_tokenizer(), folder)

        folder = keyed_token_folder(splits.name.replace(":", "-"), splits.fingerprint, _tokenizer_key(run))
        return _token_file_corpus(run, folder, write, checkpoint, world, f"{splits.name} (its own splits)",
                                  splits.fingerprint, splits.name)
    started = time.perf_counter()
    tokenizer = build_tokenizer()
    texts = {split: splits.text(split) for split in ("train", "val")}
    note = describe_tokenizer(tokenizer, run, time.perf_counter() - started, resumed=checkpoint is not None)
    if run.tokenizer == "train" and checkpoint is None and len(texts["train"]) > BPE_SAMPLE_CHARS:
        note += f" (learned from the train split's first {BPE_SAMPLE_CHARS:,} characters)"
    train_ids = tokenizer.encode(texts["train"], allowed_special="all")
    val_ids = tokenizer.encode(texts["val"], allowed_special="all")
    description = (f"{splits.name}: its train split, {len(texts['train']):,} characters, {len(train_ids):,} tokens "
                   f"({tokenizer.name}); its validation split, {len(texts['val']):,} characters, {len(val_ids):,} "
                   "tokens")
    return Corpus(tokenizer, train_ids, val_ids, splits.fingerprint, description, note, on_disk=False,
                  source=splits.name)


def _prepare_token_ids(run: RunConfig, path: Path, checkpoint: dict[str, Any] | None, world: Distributed) -> Corpus:
    """Pre-tokenized data: the ids as they are, the vocabulary beside them (vocab.json, with merges.txt an
    exact BPE), the split after 1 - val_fraction of the file; in memory, or token files when large."""
    vocab, merges = vocabulary_files(path)
    if checkpoint is None and run.tokenizer != "gpt2":
        raise ConfigError(f"{path.name} holds token ids made with the {VOCAB_NAME} beside it, so it brings its own "
                          f"tokenizer: drop --tokenizer (TOKENIZER = {run.tokenizer!r}).")
    if checkpoint is not None:
        tokenizer = tokenizer_from_spec(checkpoint["tokenizer_spec"])
    else:
        tokenizer = VocabTokenizer.from_vocab_json(vocab)
        if merges is not None and tokenizer.style == "byte-level":  # the merges make it an exact BPE
            tokenizer = BPETokenizer.from_vocab_files(vocab, merges)
    how = ("a byte-level BPE: decodes and encodes as the tool that made the ids" if tokenizer.name == "bpe" else
           f"{tokenizer.style} tokens: decodes exactly, encodes new text (prompts) by longest match")
    note = f"{vocab} ({tokenizer.vocab_size:,} tokens{', with merges.txt' if merges else ''}), {how}"
    fingerprint = fingerprint_of([file_sha256(path), file_sha256(vocab)])
    chunks = functools.partial(token_id_chunks, path, tokenizer.vocab_size, tokenizer.eos_id,
                               1 - run.train.val_fraction)
    if is_large(path.stat().st_size):
        def write(folder: Path) -> None:
            write_token_stream(folder, chunks(), tokenizer, path.stat().st_size, {"files": [str(path)]})

        folder = keyed_token_folder(path.stem, fingerprint, f"ids-val{run.train.val_fraction}")
        corpus = _token_file_corpus(run, folder, write, checkpoint, world, f"{path.name}: token ids", fingerprint,
                                    str(path.resolve()))
        return replace(corpus, tokenizer_note=note)
    ids: dict[str, list[int]] = {"train": [], "val": []}
    for split, part, _ in chunks():
        ids[split].extend(part)
    description = (f"{path.name}: {len(ids['train']) + len(ids['val']):,} token ids; train {len(ids['train']):,} / "
                   f"validation {len(ids['val']):,} tokens")
    return Corpus(tokenizer, ids["train"], ids["val"], fingerprint, description, note, on_disk=False,
                  source=str(path.resolve()))


def _token_file_corpus(run: RunConfig, folder: Path, write: Callable[[Path], Any], checkpoint: dict[str, Any] | None,
                       world: Distributed, what: str, fingerprint: str, source: str) -> Corpus:
    """Token files in `folder`: written once by `write(folder)` (rank 0 writes, the others wait), or reused."""
    started = time.perf_counter()
    reused = read_token_files(folder) is not None
    if world.is_main and not reused:
        write(folder)
    if world.active:
        dist.barrier()
    train_ids, val_ids, meta = read_token_files(folder)
    tokenizer = tokenizer_from_spec(meta["tokenizer_spec"])
    seconds = time.perf_counter() - started
    note = describe_tokenizer(tokenizer, run, 0.0, resumed=checkpoint is not None)
    if run.tokenizer == "train" and checkpoint is None:
        note += f" (learned from the corpus's first {BPE_SAMPLE_CHARS:,} characters)"
    how = f"reused from {folder}" if reused else f"written to {folder} in {seconds:.1f} s"
    description = (f"{what}, {meta['bytes'] / 2**20:,.1f} MiB, {meta['train_tokens'] + meta['val_tokens']:,} tokens "
                   f"({tokenizer.name}); train {meta['train_tokens']:,} / validation {meta['val_tokens']:,} tokens; "
                   f"token files {how}")
    return Corpus(tokenizer, train_ids, val_ids, fingerprint, description, note, on_disk=True, source=source)


def _tokenizer_key(run: RunConfig) -> str:
    """Names the tokenizer a run asks for, for the token files' folder."""
    request = run.tokenizer if run.tokenizer in TOKENIZERS else str(Path(run.tokenizer).resolve())
    return f"{request}-{run.bpe_vocab_size}" if request == "train" else request


def _build_tokenizer(run: RunConfig, text: str):
    try:
        return get_tokenizer(run.tokenizer, text=text, vocab_size=run.bpe_vocab_size)
    except ConfigError as err:
        if run.tokenizer != "train":
            raise
        raise ConfigError(f"training a BPE of BPE_VOCAB_SIZE (or --vocab-size) = {run.bpe_vocab_size} "
                          f"tokens on the training split: {err}") from None


def describe_tokenizer(tokenizer, run: RunConfig, seconds: float, resumed: bool) -> str:
    """One line for the header: which tokenizer, its size, and where it came from."""
    size = f"{tokenizer.vocab_size:,} tokens"
    if resumed:
        return f"{tokenizer.name}, {size} (the run's own, from its checkpoint)"
    if tokenizer.name == "gpt2":
        return f"gpt2 (GPT-2's BPE through tiktoken), {size}"
    if tokenizer.name == "char":
        return f"char (the text's distinct characters), {size}"
    if tokenizer.name == "vocab":
        return f"vocab ({tokenizer.style} tokens of a vocab.json), {size}"
    if tokenizer.source == "gpt2":
        return f"bpe (minigpt's BPE with GPT-2's vocabulary), {size}"
    where = "trained on the training split" if run.tokenizer == "train" else f"loaded from {run.tokenizer}"
    return (f"bpe {where} in {seconds:.2f} s: {size} ({len(tokenizer.merges):,} merges), "
            f"saved as {TOKENIZER_NAME}")


def make_loaders(corpus: Corpus, cfg: TrainConfig, world: Distributed, seed: int) -> tuple[Loaders, bool]:
    """Shuffled training batches (this process's share, in micro-batches) and the evaluation windows of
    both splits; and whether training reads random windows (token files) instead of sliding ones."""
    if corpus.labelled is not None:
        return _labelled_loaders(corpus, cfg, world, seed), False
    random_windows = cfg.sampling == "random" or (cfg.sampling == "auto" and corpus.on_disk)
    shape = dict(max_length=cfg.max_length, stride=cfg.stride, num_workers=cfg.num_workers, seed=seed)
    micro = micro_batch_size(cfg, world)
    per_batch = cfg.batch_size // micro  # evaluations read eval_iter batches of batch_size windows, in micro-batches
    evaluation = dict(batch_size=micro, shuffle=False, drop_last=False, **shape)
    train_eval = create_dataloader(corpus.train_ids, name="the training split", **evaluation)
    spread = -(-len(train_eval.dataset) // TRAIN_EVAL_WINDOWS)  # windows this far apart: at most TRAIN_EVAL_WINDOWS
    if spread > 1:  # the same tokens (already a tensor, or a token file), windows further apart
        train_eval = create_dataloader(train_eval.dataset.token_ids, name="the training split",
                                       **{**evaluation, "stride": cfg.stride * spread})
    loaders = Loaders(
        train=create_dataloader(corpus.train_ids, batch_size=cfg.batch_size, micro_batch_size=micro,
                                rank=world.rank, world_size=world.world_size, random_windows=random_windows,
                                shuffle=True, drop_last=True, name=f"the training split ({1 - cfg.val_fraction:.0%})",
                                **shape),
        train_eval=train_eval,
        val=create_dataloader(corpus.val_ids, name=f"the validation split ({cfg.val_fraction:.0%}; --val-fraction)",
                              **evaluation),
        accumulation=cfg.batch_size // (micro * world.world_size), eval_batches=cfg.eval_iter * per_batch)
    return loaders, random_windows


def _labelled_loaders(corpus: Corpus, cfg: TrainConfig, world: Distributed, seed: int) -> Loaders:
    """Batches of labelled texts: (inputs, next-token targets, classes), in a seeded order."""
    if world.active:
        raise ConfigError("a graph with a sequence-classification loss trains in one process; run it without "
                          "torchrun.")
    collate = functools.partial(labelled_sequence_collate, length=cfg.max_length)
    micro = micro_batch_size(cfg, world)
    train, val = corpus.labelled
    return Loaders(train=make_loader(train, collate, cfg.batch_size, micro, True, seed, "the labelled training texts"),
                   train_eval=make_loader(train, collate, cfg.batch_size, micro, False, seed, "the training texts"),
                   val=make_loader(val, collate, cfg.batch_size, micro, False, seed, "the validation texts"),
                   accumulation=cfg.batch_size // micro, eval_batches=cfg.eval_iter * (cfg.batch_size // micro))


# ---------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------

def pretrain(run: RunConfig, stop: StopRequest | None = None,
             on_event: Callable[[dict[str, Any]], None] | None = None) -> tuple[GPTModel, Any, dict[str, Any], Path]:
    """Train a GPT as `run` says, writing the run directory; returns (model, tokenizer, metrics, dir).

    The directory is this run's alone while it trains (`RunDirectory`). `stop` lets a caller ask
    the run to stop and save (the studio's Stop button; Ctrl-C and SIGTERM do it too); a stopped
    run returns with metrics["completed"] False and resumes with --resume. `on_event(event)`
    receives the start, each log line and each sample as a dict.
    """
    world, device = start_distributed(pick_device(run.device))
    try:
        with RunDirectory(run, lock=world.is_main) as run_dir, (stop or StopRequest()) as stop:
            if world.active:  # the folder the first process claimed (a default one may be -2 by then)
                claimed = [str(run_dir)]
                dist.broadcast_object_list(claimed, src=0)
                run_dir = Path(claimed[0])
            checkpoint = load_checkpoint(run.resume) if run.resume else None
            return _pretrain(run, checkpoint, world, device, stop, on_event, run_dir)
    finally:
        if world.active:
            dist.destroy_process_group()


def _pretrain(run: RunConfig, checkpoint: dict[str, Any] | None, world: Distributed, device: torch.device,
              stop: StopRequest, on_event: Callable[[dict[str, Any]], None] | None, run_dir: Path
              ) -> tuple[GPTModel, Any, dict[str, Any], Path]:
    torch.manual_seed(run.seed)
    corpus = prepare_corpus(run, checkpoint, world)
    check_same_data(checkpoint, corpus.fingerprint, run_dir, run.data)
    tokenizer = corpus.tokenizer
    run = _with_sample_prompt(replace(run, model=replace(run.model, vocab_size=tokenizer.vocab_size)), corpus)
    precision = resolve_precision(run.train.precision, device)
    with torch.device("meta"):  # the shapes alone, to refuse a model that cannot fit before allocating it
        shapes = language_model(run)
    check_before_building(shapes, run.train, world, device, precision, run.train.max_length)
    model = language_model(run).to(device)
    optimizer = make_optimizer(model, run.train)

    def random_windows_of(size: int) -> tuple[torch.Tensor, torch.Tensor]:  # a micro-batch's shape, for the memory trials
        ids = torch.randint(tokenizer.vocab_size, (size, run.train.max_length), device=device)
        return ids, ids

    cfg, memory_note = fit_micro_batch(model, run.train, world, device, precision, random_windows_of,
                                       run.train.max_length)
    run = replace(run, train=cfg)
    loaders, random_windows = make_loaders(corpus, cfg, world, run.seed)
    # A token file may hold billions of tokens: the final evaluation then reads a fixed sample.
    final_eval_batches = max(cfg.eval_iter, FINAL_EVAL_BATCHES) * (cfg.batch_size // micro_batch_size(cfg, world)) \
        if corpus.on_disk else None
    total_steps = planned_steps(cfg, loaders.train.sampler.steps_per_epoch)
    setup, compile_note = scaled_setup(model, cfg, device, world)
    state = _restore_or_seed(checkpoint, model, optimizer, setup, run, run_dir, total_steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if world.is_main:
        if isinstance(tokenizer, BPETokenizer) and tokenizer.source != "gpt2":
            write_atomically(run_dir / TOKENIZER_NAME, tokenizer.save)  # reusable: TOKENIZER = "<run>/tokenizer.bpe"
        header = _Header(corpus, loaders, total_steps, random_windows, final_eval_batches, memory_note,
                         compile_note, optimizer.defaults.get("fused", False))
        print_header(run, model, setup, state, run_dir, header)
        if on_event is not None:
            on_event({"type": "start", "run_dir": str(run_dir), "total_steps": total_steps,
                      "steps_per_epoch": loaders.train.sampler.steps_per_epoch, "step": state.global_step,
                      "parameters": model.num_parameters(), "memory": memory_note})
    files = _RunFiles(run_dir, run, model, optimizer, state, setup, corpus, compile_note)
    events = LoopEvents(should_stop=lambda: stop.requested, epoch_end=files.save, best=files.save_best,
                        epoch_note=_sample_note(model, tokenizer, cfg.start_context),
                        on_event=on_event if world.is_main else None)
    with stop.deferred("after this step"):
        completed = train_loop(model, optimizer, loaders, cfg, state, setup, events, run.log_every)
        files.save_checkpoint()  # the last step's, before the final evaluation (minutes on a large text)
    final = None
    if completed:  # measure the finished model: every validation window, training windows spread over the split
        def evaluate() -> tuple[float, float]:
            with setup.autocast():
                return evaluate_model(model, loaders.train_eval, loaders.val, device, final_eval_batches)

        final = stop.unless_stopped(evaluate, "the final evaluation", show=world.is_main)
        if final is not None and corpus.labelled is not None:
            files.more["val_accuracy"] = class_accuracy(model, loaders.val, device)
    with stop.deferred("once the run's files are written"):
        metrics = files.write(completed and final is not None, final)
    if world.is_main:
        print_summary(metrics, run_dir, metrics["completed"])
        if "val_accuracy" in metrics:
            print(f"  classes            {metrics['val_accuracy']:.1%} of {len(corpus.labelled[1]):,} validation texts "
                  f"labelled right (chance: {1 / len(run.graph['labels']):.1%})")
        export_hf_folders(run, run_dir, metrics["completed"])
    return model, tokenizer, metrics, run_dir


@torch.no_grad()
def class_accuracy(model: torch.nn.Module, loader, device: torch.device) -> float:
    """The share of labelled texts whose class the model's first classification head ranks first."""
    model.eval()
    right = total = 0
    for inputs, _, labels in loader:
        scores = model(inputs.to(device), details=True).classes[0][1]  # (B, K)
        right += int((scores.argmax(dim=-1).cpu() == labels).sum())
        total += len(labels)
    return right / total


def _with_sample_prompt(run: RunConfig, corpus: Corpus) -> RunConfig:
    """The per-epoch sample's prompt, checked now rather than after an epoch of training. The
    default one ("Every effort moves you") gives way to the corpus's own first words where the
    tokenizer cannot encode it (a character vocabulary of a Chinese text); one the user set must."""
    start = run.train.start_context
    try:
        text_to_token_ids(start, corpus.tokenizer)
        return run
    except ConfigError as err:
        if start != TrainConfig.__dataclass_fields__["start_context"].default:
            raise ConfigError(f"start_context {start!r} cannot be encoded: {err} Or set --start-context (or "
                              "custom_params['start_context']) to text from the corpus.") from None
    ids = corpus.train_ids[:64]
    opening = corpus.tokenizer.decode(ids.tolist() if isinstance(ids, torch.Tensor) else list(ids))
    return replace(run, train=replace(run.train, start_context=" ".join(opening.split()[:3])[:24] or opening[:8]))


def _restore_or_seed(checkpoint: dict[str, Any] | None, model: GPTModel, optimizer: torch.optim.Optimizer,
                     setup: ScaledSetup, run: RunConfig, run_dir: Path, total_steps: int) -> TrainState:
    """A resumed run's state (weights, moments, random state); a new run's, with each process its own seed."""
    if checkpoint is None:
        if setup.world.active:
            torch.manual_seed(run.seed + setup.world.rank)  # each process its own dropout draws
        return TrainState()
    restore_training(checkpoint, model, optimizer, setup)
    state = TrainState(**checkpoint["state"])
    if (state.epoch >= run.train.num_epochs or state.global_step >= total_steps) and finished(run_dir):
        raise ConfigError(f"the run in {run_dir} already finished {state.global_step} steps "
                          f"({state.epoch} epochs); raise --epochs (or --max-steps, if it set "
                          "one) to train it further.")
    return state


def _sample_note(model: GPTModel, tokenizer, start_context: str) -> Callable[[int], tuple[str, dict[str, Any]]]:
    """After each epoch: a greedy continuation of `start_context`."""
    def note(epoch: int) -> tuple[str, dict[str, Any]]:
        text = generate_text(model, tokenizer, start_context, max_new_tokens=50)
        return f"sample after epoch {epoch}: {text!r}", {"text": text}
    return note


class _RunFiles:
    """The run directory's files: checkpoint.pt, best.pt, config.json, metrics.json and the loss plot."""

    def __init__(self, run_dir: Path, run: RunConfig, model: GPTModel, optimizer: torch.optim.Optimizer,
                 state: TrainState, setup: ScaledSetup, corpus: Corpus, compile_note: str) -> None:
        self.run_dir, self.run, self.model, self.optimizer = run_dir, run, model, optimizer
        self.state, self.setup, self.corpus, self.compile_note = state, setup, corpus, compile_note
        self.extra = {"tokenizer_spec": corpus.tokenizer.spec(), "data_sha256": corpus.fingerprint}
        self.more: dict[str, Any] = {}  # measures a task adds to metrics.json (a graph's class accuracy)

    def save(self) -> None:
        """A resumable checkpoint and the files that describe it (at an epoch's end)."""
        self.save_checkpoint()
        self.write(completed=False)

    def save_checkpoint(self) -> None:
        rng = rng_states(self.setup.world)  # every process takes part in gathering the random states
        if self.setup.is_main:
            save_checkpoint(self.run_dir / CHECKPOINT_NAME, self.model, self.optimizer, self.state, self.run,
                            self.extra, rng, self.setup.scaler)

    def write(self, completed: bool, final: tuple[float, float] | None = None) -> dict[str, Any]:
        metrics = {**make_metrics(self.state, self.model, completed, final, self.run, self.setup, self.compile_note),
                   **self.more}
        if self.setup.is_main:
            write_run_files(self.run_dir, self.run, metrics, self.extra, self.corpus)
        return metrics

    def save_best(self) -> None:
        if self.setup.is_main:
            save_weights(self.run_dir / BEST_NAME, self.model, self.run, self.extra)


def write_run_files(run_dir: Path, run: RunConfig, metrics: dict[str, Any], extra: dict[str, Any],
                    corpus: Corpus) -> None:
    """config.json (enough to rebuild and rerun), metrics.json, and the loss plot."""
    config = {"data_path": corpus.source, **extra,
              "train_tokens": len(corpus.train_ids), "val_tokens": len(corpus.val_ids)}
    if "saved" in config["tokenizer_spec"]:  # a BPE's merges: in the checkpoint and tokenizer.bpe
        config["tokenizer_spec"] = {"name": "bpe", "file": TOKENIZER_NAME}
    write_config(run_dir, run, config)
    write_json(run_dir / "metrics.json", metrics)
    if metrics["batch_losses"]:
        final = None
        if metrics["completed"]:
            final = (metrics["steps"], metrics["final_train_loss"], metrics["final_val_loss"])
        write_atomically(run_dir / "training_losses.png", lambda path: plot_losses(
            metrics["eval_steps"], metrics["train_losses"], metrics["val_losses"], path,
            batch_losses=metrics["batch_losses"], tokens_per_step=run.train.batch_size * run.train.max_length,
            final=final, title=f"{run.task}, {run.mode} mode ({run.model_name})"))


@dataclass
class _Header:
    """What the pretraining header shows beside the run's settings."""

    corpus: Corpus
    loaders: Loaders
    total_steps: int
    random_windows: bool
    final_eval_batches: int | None
    memory_note: str
    compile_note: str
    fused: bool


def print_header(run: RunConfig, model: GPTModel, setup: ScaledSetup, state: TrainState, run_dir: Path,
                 header: _Header) -> None:
    """The lines before the first step: device, speed, model, data, batches, schedule, memory, evaluation."""
    cfg, m = run.train, run.model
    micro = micro_batch_size(cfg, setup.world)
    split = "" if header.loaders.accumulation == 1 and not setup.world.active else (
        f" = {micro} per micro-batch x {header.loaders.accumulation} accumulation step(s) x "
        f"{setup.world.world_size} process(es)")
    windows = "one labelled text per sequence" if header.corpus.labelled is not None else \
        "random windows" if header.random_windows else f"sliding windows, stride {cfg.stride}"
    final = header.final_eval_batches
    print_rows(f"minigpt | {run.task} | {run.mode} mode", [
        ("device", device_row(setup, cfg)),
        ("speed", speed_row(setup, cfg, header.compile_note, header.fused)),
        ("model", f"{run.model_name}: {model.describe()}" if isinstance(model, GraphModel) else
                  f"{run.model_name}: {m.n_layers} layers, {m.n_heads} heads, emb_dim {m.emb_dim}, "
                  f"context {m.context_length}, vocab {m.vocab_size:,}, dropout {m.drop_rate}, "
                  f"qkv_bias {m.qkv_bias}, tied head {m.tie_weights}"
                  f"{'' if m.bias else ', no other biases'}{', exact GELU' if m.activation == 'gelu' else ''}"
                  f"{'; ' + m.architecture() if m.architecture() else ''}"),
        ("parameters", f"{model.num_parameters():,} ({model.num_parameters(exclude_output_head=True):,} "
                       f"without the output head); {model.parameter_memory_bytes() / 2**20:,.1f} MiB in fp32"),
        ("tokenizer", header.corpus.tokenizer_note),
        ("data", header.corpus.description),
        ("batches", f"{cfg.batch_size} x {cfg.max_length} tokens per step{split}; {windows}; "
                    f"{header.loaders.train.sampler.steps_per_epoch:,} steps per epoch"),
        ("training", optimizer_row(cfg, header.total_steps)),
        ("memory", header.memory_note),
        ("evaluation", f"every {cfg.eval_freq} steps on {cfg.eval_iter} batches per split, at the end on "
                       f"{final_windows(header.loaders, final, micro)}; sample from {cfg.start_context!r} each epoch"),
        ("seed", str(run.seed)),
        ("run directory", run_dir_row(run_dir, state.global_step)),
    ])


def final_windows(loaders: Loaders, batches: int | None, micro: int) -> str:
    """What the final evaluation reads: a sample of a token file's splits, or every validation window
    and the training windows (every one, or TRAIN_EVAL_WINDOWS at most, spread over the split)."""
    if batches is not None:
        return f"{batches * micro:,} windows of each split"
    train, val = len(loaders.train_eval.dataset), len(loaders.val.dataset)
    if isinstance(loaders.val.dataset, ClassificationDataset):  # labelled texts, each a sequence
        return f"every text of both splits ({val:,} validation, {train:,} training)"
    spread = loaders.train_eval.dataset.starts.step > loaders.val.dataset.starts.step
    if not spread:
        return f"every window of both splits ({val:,} validation, {train:,} training)"
    return f"every validation window ({val:,}) and {train:,} training windows spread over the split"


# ---------------------------------------------------------------------------------------
# From a script or a notebook
# ---------------------------------------------------------------------------------------

def train_model(texts: list[str] | None = None, data: str | None = None, model: str = "gpt-mini",
                epochs: int = 1, batch_size: int = 8, learning_rate: float = 4e-4, out: str | None = None,
                **overrides: Any) -> tuple[GPTModel, Any, dict[str, Any]]:
    """Pretrain from a script or a notebook: `pretrain`, with the loop, run directory and
    validation split `python main.py` uses; returns (model, tokenizer, metrics).

    `texts` are strings to train on (joined by blank lines and written to texts.txt beside the
    run), or `data` names what `--data` takes: a file or folder, a corpus ("the-verdict",
    "wikitext-2" ...), "hf:NAME" (with `text_field`, `data_format` as the flags). `model` is a
    preset; `overrides` set any GPTConfig field (emb_dim=64, attn_tau=True ...) or TrainConfig
    field (max_length=32, max_steps=100 ...) by name, and `device`, `seed` (default 123),
    `tokenizer` ("gpt2", "char", "train": a BPE learned from the text, with bpe_vocab_size=...;
    or a saved BPE file). Every tokenizer works on bytes or characters, so any language,
    mixed ones included, round-trips.
    """
    if (texts is None) == (data is None):
        raise ConfigError("give train_model either texts=[...] (strings) or data=\"file.txt\", not both or neither.")
    if model not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset {model!r}; pick one of {', '.join(MODEL_PRESETS)}."
                          f"{did_you_mean(model, list(MODEL_PRESETS))}")
    run_values = {key: overrides.pop(key) for key in ("device", "seed", "tokenizer", "bpe_vocab_size", "text_field",
                                                      "data_format") if key in overrides}
    model_fields, train_fields = set(GPTConfig.__dataclass_fields__) - {"vocab_size"}, set(TrainConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - model_fields - train_fields)
    if unknown:
        raise ConfigError(f"train_model has no setting {unknown[0]!r}: give a GPTConfig or TrainConfig field."
                          f"{did_you_mean(unknown[0], sorted(model_fields | train_fields))}")
    cfg = model_config(model, **{k: v for k, v in overrides.items() if k in model_fields})
    train = {k: v for k, v in overrides.items() if k in train_fields}
    train.setdefault("max_length", min(cfg.context_length, 128))
    train.setdefault("stride", train["max_length"])
    run = RunConfig(task="pretrain", mode="custom", model_name=model, model=cfg,
                    train=TrainConfig(num_epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, **train),
                    data=data, out=out, **{"tokenizer": "gpt2", "bpe_vocab_size": 1024, "seed": 123, **run_values})
    check_max_length(run.train, cfg, "lower max_length or raise context_length.")
    if texts is not None and (isinstance(texts, str) or not all(isinstance(t, str) for t in texts)
                              or not "".join(texts).strip()):
        raise ConfigError("texts must be a list of non-empty strings, e.g. texts=[\"first document\", ...].")
    with RunDirectory(run) as run_dir:  # claimed before the texts are written into it
        if texts is not None:
            path = run_dir / "texts.txt"
            write_atomically(path, lambda tmp: tmp.write_text("\n\n".join(texts), encoding="utf-8"))
            run = replace(run, data=str(path))
        model_out, tokenizer_out, metrics, _ = pretrain(replace(run, out=str(run_dir)))
    return model_out, tokenizer_out, metrics
