"""From `config_run.py`, the modes and the command-line flags to one validated `RunConfig`.

The order of precedence, lowest first: the task's mode defaults (`MODE_DEFAULTS[task][mode]`;
custom mode starts from full mode and takes `custom_params`, `finetune_params`, `align_params`),
then `config_run.py`'s top-level names, then the flags of this one run. Every value is checked
here or by the dataclasses of `minigpt.config`, before any data is read or any weight exists.
"""

from __future__ import annotations

import json
import types
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from minigpt.config import (ALIGN_TASKS, DEVICES, EXPORTING_TASKS, FINETUNE_TASKS, GENERATION_DEFAULTS, MODEL_PRESETS, MODES,
                            PRETRAINED_MODELS, PRETRAINED_NAMES, TASKS, TOKENIZERS, DATA_FORMATS, AlignConfig, ConfigError, FinetuneConfig, GPTConfig,
                            RunConfig, TrainConfig, check_choice, check_float, check_generation, check_int,
                            check_keys, check_max_length, did_you_mean, model_config)

# What each mode trains. Quick: a small model that finishes in well under a minute on a
# laptop CPU. Full: the book's GPT-2 124M run on the-verdict (context 256, 10 epochs).
_PRETRAIN_MODES: dict[str, dict[str, Any]] = {
    "quick": dict(
        model="gpt-mini", model_overrides=dict(context_length=128, drop_rate=0.0),
        train=dict(num_epochs=1, batch_size=2, learning_rate=3e-3, weight_decay=0.1,
                   eval_freq=5, eval_iter=5, max_length=64, stride=64,
                   lr_schedule="cosine", warmup_steps=5, grad_clip=1.0)),
    "full": dict(
        model="gpt2-small", model_overrides=dict(context_length=256, drop_rate=0.1),
        train=dict(num_epochs=10, batch_size=2, learning_rate=4e-4, weight_decay=0.1,
                   eval_freq=5, eval_iter=5, max_length=256, stride=256)),
}

# Fine-tuning's modes. Quick: a small new model, to watch the mechanics in a minute on a CPU.
# Full: the book's runs, starting from OpenAI's GPT-2 (downloaded once): a spam classifier from
# GPT-2 124M training its last block, final norm and a new head; an instruction follower from
# GPT-2 medium (355M) training everything.
_FINETUNE_MODES: dict[str, dict[str, dict[str, Any]]] = {
    "classify": {
        "quick": dict(
            model="gpt-mini", model_overrides=dict(context_length=128, drop_rate=0.0), pretrained=None,
            train=dict(num_epochs=3, batch_size=8, learning_rate=1e-3, weight_decay=0.1, eval_freq=20,
                       eval_iter=5, max_length=128, lr_schedule="cosine", warmup_steps=10, grad_clip=1.0),
            finetune=dict(trainable="all")),
        "full": dict(
            model="gpt2-small", model_overrides=dict(drop_rate=0.0), pretrained="gpt2",
            train=dict(num_epochs=5, batch_size=8, learning_rate=5e-5, weight_decay=0.1, eval_freq=50,
                       eval_iter=5, max_length=256),
            finetune=dict(trainable="last_blocks", last_blocks=1)),
    },
    "sft": {
        "quick": dict(
            model="gpt-mini", model_overrides=dict(context_length=256, drop_rate=0.0), pretrained=None,
            train=dict(num_epochs=1, batch_size=8, learning_rate=1e-3, weight_decay=0.1, eval_freq=20,
                       eval_iter=5, max_length=256, lr_schedule="cosine", warmup_steps=10, grad_clip=1.0),
            finetune=dict(trainable="all", max_new_tokens=64)),
        "full": dict(
            model="gpt2-medium", model_overrides=dict(drop_rate=0.0), pretrained="gpt2-medium",
            train=dict(num_epochs=2, batch_size=8, learning_rate=5e-5, weight_decay=0.1, eval_freq=5,
                       eval_iter=5, max_length=1024),
            finetune=dict(trainable="all", max_new_tokens=256)),
    },
}

# Alignment's modes. Quick: a small new model on a CPU in a few minutes each: the reward model and
# DPO on the 1,100 preference records, PPO and GRPO on sums of small numbers after a short SFT
# (a task whose answers a program checks). Full: the book's path, GPT-2 weights and the
# instruction-tuned run of `--task sft --mode full` (runs/sft-full), which DPO and PPO refine.
_QUICK_RL = dict(  # ppo and grpo in quick mode: the same small model, warm-up and training settings
    model="gpt-mini", model_overrides=dict(context_length=64, drop_rate=0.0), pretrained=None,
    train=dict(num_epochs=1, batch_size=16, learning_rate=5e-4, weight_decay=0.0, eval_freq=10, eval_iter=5,
               max_length=64, grad_clip=1.0))
_ALIGN_MODES: dict[str, dict[str, dict[str, Any]]] = {
    "reward": {
        "quick": dict(
            model="gpt-mini", model_overrides=dict(context_length=256, drop_rate=0.0), pretrained=None,
            train=dict(num_epochs=2, batch_size=8, learning_rate=5e-4, weight_decay=0.1, eval_freq=20,
                       eval_iter=5, max_length=256, lr_schedule="cosine", warmup_steps=10, grad_clip=1.0),
            align=dict()),
        "full": dict(
            model="gpt2-small", model_overrides=dict(drop_rate=0.0), pretrained="gpt2",
            train=dict(num_epochs=2, batch_size=8, learning_rate=1e-5, weight_decay=0.0, eval_freq=20,
                       eval_iter=5, max_length=512, grad_clip=1.0),
            align=dict()),
    },
    "dpo": {
        "quick": dict(
            model="gpt-mini", model_overrides=dict(context_length=256, drop_rate=0.0), pretrained=None,
            train=dict(num_epochs=1, batch_size=8, learning_rate=5e-4, weight_decay=0.0, eval_freq=40,
                       eval_iter=5, max_length=128, lr_schedule="cosine", warmup_steps=5, grad_clip=1.0),
            align=dict(beta=0.1)),
        "full": dict(
            model="gpt2-medium", model_overrides=dict(drop_rate=0.0), pretrained=None, checkpoint="runs/sft-full",
            train=dict(num_epochs=1, batch_size=8, learning_rate=5e-6, weight_decay=0.0, eval_freq=5,
                       eval_iter=5, max_length=1024, grad_clip=1.0),
            align=dict(beta=0.1)),
    },
    "ppo": {
        "quick": dict(
            **_QUICK_RL,
            align=dict(prompt_style="chat", beta=0.02, prompts_per_iteration=64, update_epochs=2,
                       minibatch_size=64, max_new_tokens=4)),
        "full": dict(
            model="gpt2-medium", model_overrides=dict(drop_rate=0.0), pretrained=None, checkpoint="runs/sft-full",
            train=dict(num_epochs=1, batch_size=8, learning_rate=1e-6, weight_decay=0.0, eval_freq=25,
                       eval_iter=5, max_length=1024, grad_clip=1.0),
            align=dict(beta=0.05, reward_model="runs/reward-full", iterations=200, prompts_per_iteration=16,
                       update_epochs=2, minibatch_size=8, max_new_tokens=128)),
    },
    "grpo": {
        "quick": dict(
            **_QUICK_RL,
            align=dict(prompt_style="chat", beta=0.02, prompts_per_iteration=16, group_size=8,
                       minibatch_size=64, max_new_tokens=4)),
        "full": dict(
            model="gpt2-small", model_overrides=dict(drop_rate=0.0), pretrained="gpt2",
            train=dict(num_epochs=1, batch_size=16, learning_rate=1e-5, weight_decay=0.0, eval_freq=10,
                       eval_iter=5, max_length=128, grad_clip=1.0),
            align=dict(beta=0.02, iterations=300, prompts_per_iteration=16, group_size=8, minibatch_size=32,
                       max_new_tokens=8, max_operand=99)),
    },
}

# The one table: MODE_DEFAULTS[task][mode] is what a task trains in quick and full mode (custom
# mode starts from full). generate, evaluate and export read the pretraining settings.
MODE_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "pretrain": _PRETRAIN_MODES, **_FINETUNE_MODES, **_ALIGN_MODES}

# The TrainConfig values that have a command-line flag (they override every mode).
TRAIN_FLAGS = ("num_epochs", "batch_size", "learning_rate", "max_steps", "micro_batch_size", "precision",
               "compile", "lr_schedule", "warmup_steps", "min_lr", "grad_clip", "weight_decay", "beta2", "sampling",
               "eval_freq", "eval_iter", "start_context", "max_length", "val_fraction")
# The FinetuneConfig values that have a command-line flag.
# (--task sft also takes --max-new-tokens for the responses it generates.)
FINETUNE_FLAGS = ("trainable", "last_blocks", "lora_rank", "lora_alpha", "prompt_style", "mask_prompt", "judge")
# The AlignConfig values that have a command-line flag.
ALIGN_FLAGS = ("prompt_style", "beta", "dpo_loss", "reward_model", "iterations", "group_size", "kl_estimator",
               "sft_steps")

# The keys `custom_params` may hold; model_overrides may hold any GPTConfig field but vocab_size.
CUSTOM_PARAM_KEYS = [f.name for f in fields(TrainConfig)] + ["model_overrides"]
MODEL_OVERRIDE_KEYS = [f.name for f in fields(GPTConfig) if f.name != "vocab_size"]

# The names config_run.py may define.
RUN_SETTINGS = ["TASK", "DEVICE", "QUICK_MODE", "CUSTOM_MODE", "MODEL", "TOKENIZER", "BPE_VOCAB_SIZE",
                "DATA", "DATA_FORMAT", "TEXT_FIELD", "OUT", "EXPORT_HF", "SEED", "LOG_EVERY", "INIT", "custom_params", "generation_params",
                "finetune_params", "align_params"]
FINETUNE_PARAM_KEYS = [f.name for f in fields(FinetuneConfig)]
ALIGN_PARAM_KEYS = [f.name for f in fields(AlignConfig)]


def resolve_run_config(settings: dict[str, Any], cli: dict[str, Any] | None = None) -> RunConfig:
    """Combine config_run.py's names (`settings`) with command-line overrides (`cli`).

    `cli` holds only the flags the user gave: task, mode, device, model, tokenizer,
    bpe_vocab_size, data, out, resume, checkpoint, pretrained, prompt, seed, the training
    values in TRAIN_FLAGS, and the generation values (the keys of GENERATION_DEFAULTS).
    """
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    check_keys("config_run.py", {k: v for k, v in settings.items() if not k.startswith("_")}, RUN_SETTINGS)
    task = cli.get("task", settings.get("TASK", "pretrain"))
    check_choice("TASK (or --task)", task, TASKS)
    mode = cli.get("mode") or _mode_from_flags(settings)
    check_choice("--mode", mode, MODES)
    base = MODE_DEFAULTS.get(task, MODE_DEFAULTS["pretrain"])["full" if mode == "custom" else mode]
    model_name, model, train = _resolve_model_and_training(settings, cli, mode, base)
    finetune = _resolve_finetune(settings, cli, task, mode, base) if task in FINETUNE_TASKS else None
    align = _resolve_align(settings, cli, mode, base) if task in ALIGN_TASKS else None
    checkpoint, pretrained, ensemble, weights = _resolve_models(settings, cli, task, base)
    if task in FINETUNE_TASKS + ALIGN_TASKS and (checkpoint or pretrained):
        train = _fit_to_start(train, settings, cli, mode, checkpoint, pretrained)
        finetune, align = _template_of_start(settings, cli, mode, checkpoint, finetune, align)
    values = _resolve_run_values(settings, cli)
    if task == "export" and not (checkpoint and values["out"]):
        raise ConfigError("--task export needs --checkpoint DIR (a run directory) and --out FOLDER (where the "
                          "model and its tokenizer are written, a folder transformers loads whole).")
    if values["export_hf"] and task not in EXPORTING_TASKS:
        raise ConfigError(f"EXPORT_HF (--export-hf) writes a language model for transformers after training; "
                          f"--task {task} trains none. It is for {', '.join(EXPORTING_TASKS)}.")
    show_probs = _resolve_show_probs(cli, task, values["generation"])
    return _build("the run's settings", RunConfig, task=task, mode=mode, model_name=model_name, model=model,
                  train=train, **values, resume=cli.get("resume"), checkpoint=checkpoint, pretrained=pretrained,
                  prompt=cli.get("prompt"), finetune=finetune, align=align, choices=cli.get("choices"),
                  limit=cli.get("limit"), ensemble=ensemble, ensemble_weights=weights, show_probs=show_probs)


def _resolve_show_probs(cli: dict[str, Any], task: str, generation: dict[str, Any]) -> int:
    """--show-probs K: generate shows each token's K most likely candidates (0: not shown)."""
    k = cli.get("show_probs", 0)
    check_int("--show-probs", k, low=0, high=100)
    if k and task != "generate":
        raise ConfigError(f"--show-probs shows the candidates of generated tokens; it is for --task generate, "
                          f"not {task}.")
    if k and (generation["num_beams"] > 1 or generation["stop_strings"]):
        raise ConfigError("--show-probs follows one text a token at a time to end-of-text or --max-new-tokens; "
                          "drop --num-beams and --stop to use it.")
    return k


def _resolve_model_and_training(settings: dict[str, Any], cli: dict[str, Any], mode: str,
                                base: dict[str, Any]) -> tuple[str, GPTConfig, TrainConfig]:
    """The model preset, its GPTConfig and the TrainConfig: the mode's, custom_params, then the flags."""
    custom = settings.get("custom_params", {})
    if not isinstance(custom, dict):
        raise ConfigError(f"custom_params must be a dict, got {type(custom).__name__}.")
    check_keys("custom_params", custom, CUSTOM_PARAM_KEYS)
    overrides = custom.get("model_overrides", {})
    if not isinstance(overrides, dict):
        raise ConfigError(f"custom_params['model_overrides'] must be a dict, got {overrides!r}.")
    check_keys("custom_params['model_overrides']", overrides, MODEL_OVERRIDE_KEYS)
    train_values, model_values = dict(base["train"]), dict(base["model_overrides"])
    if mode == "custom":
        train_values.update({k: v for k, v in custom.items() if k != "model_overrides"})
        model_values.update(overrides)
    train_values.update({key: cli[key] for key in TRAIN_FLAGS if key in cli})
    if "context_length" in cli:
        model_values["context_length"] = cli["context_length"]
    model_name = cli.get("model") or settings.get("MODEL") or base["model"]
    check_choice("MODEL (or --model)", model_name, tuple(MODEL_PRESETS))
    model = _build(f"the model settings ({mode} mode)", model_config, model_name, **model_values)
    train = _build(f"the training settings ({mode} mode)", TrainConfig, **train_values)
    if not _max_length_given(settings, cli, mode):  # the mode's windows, no longer than the context asked for
        train = _shorter_windows(train, model.context_length)
    check_max_length(train, model, f"lower --max-length (custom_params['max_length']) to at most "
                                   f"{model.context_length}, or raise --context-length "
                                   "(custom_params['model_overrides']['context_length']).")
    return model_name, model, train


def _max_length_given(settings: dict[str, Any], cli: dict[str, Any], mode: str) -> bool:
    """Whether the user chose the window length (--max-length, or custom_params in custom mode)."""
    return "max_length" in cli or (mode == "custom" and "max_length" in settings.get("custom_params", {}))


def _shorter_windows(train: TrainConfig, context_length: int) -> TrainConfig:
    """The training windows cut to `context_length` if they are longer (stride too, where it was theirs)."""
    if train.max_length <= context_length:
        return train
    stride = context_length if train.stride >= train.max_length else min(train.stride, context_length)
    return replace(train, max_length=context_length, stride=stride)


def saved_run_config(path: str | None) -> dict[str, Any]:
    """The config.json of the run (or Hugging Face folder) at `path`, a folder or a file in it such
    as best.pt; {} where there is none to read (the pipeline checks the model itself later)."""
    if not path:
        return {}
    folder = Path(path)
    try:
        saved = json.loads(((folder.parent if folder.is_file() else folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def _start_context_length(checkpoint: str | None, pretrained: str | None) -> int | None:
    """The context of the model a run starts from (None if unknown here)."""
    if pretrained in PRETRAINED_MODELS:
        return PRETRAINED_MODELS[pretrained].context_length
    saved = saved_run_config(checkpoint or pretrained)
    try:  # a minigpt run's config.json, or a Hugging Face one (GPT-2's n_positions, Llama's max_position_embeddings)
        return int(saved["model"]["context_length"] if checkpoint else
                   saved.get("n_positions", saved.get("max_position_embeddings")))
    except (KeyError, TypeError, ValueError):
        return None


def _fit_to_start(train: TrainConfig, settings: dict[str, Any], cli: dict[str, Any], mode: str,
                  checkpoint: str | None, pretrained: str | None) -> TrainConfig:
    """A run that starts from a model takes its context from it: the mode's windows are cut to it
    (a window you chose must fit it), and --context-length, which would rebuild it, is refused."""
    start = checkpoint or pretrained
    context = _start_context_length(checkpoint, pretrained)
    if "context_length" in cli:
        raise ConfigError(f"the run starts from {start}, whose context ({context or 'its own'}) it keeps: drop "
                          "--context-length, or train new weights (INIT = 'scratch') to choose one.")
    if context is None:
        return train
    if _max_length_given(settings, cli, mode):
        if train.max_length > context:
            raise ConfigError(f"max_length ({train.max_length}) is longer than the context of {start} ({context} "
                              f"tokens): lower --max-length to at most {context}.")
        return train
    return _shorter_windows(train, context)


def start_template(saved: dict[str, Any]) -> str | None:
    """The instruction template a saved run (its config.json) answers in; None for one that has none."""
    settings = saved.get("finetune") if saved.get("task") == "sft" else \
        saved.get("align") if saved.get("task") in ALIGN_TASKS else None
    return settings.get("prompt_style") if isinstance(settings, dict) else None


def _template_of_start(settings: dict[str, Any], cli: dict[str, Any], mode: str, checkpoint: str | None,
                      finetune: FinetuneConfig | None, align: AlignConfig | None):
    """An instruction-tuned starting run answers in its own template: a run from it writes prompts the
    same way unless the user chose one (--prompt-style, or finetune_params / align_params in custom mode)."""
    params = settings.get("finetune_params" if finetune is not None else "align_params", {})
    if not checkpoint or "prompt_style" in cli or (mode == "custom" and "prompt_style" in params):
        return finetune, align
    style = start_template(saved_run_config(checkpoint))
    if not style:
        return finetune, align
    if finetune is not None:
        return replace(finetune, prompt_style=style), align
    return finetune, replace(align, prompt_style=style)


def _resolve_run_values(settings: dict[str, Any], cli: dict[str, Any]) -> dict[str, Any]:
    """The run-wide names of config_run.py (TOKENIZER, DEVICE, SEED, ...) with their flags, checked."""
    tokenizer = cli.get("tokenizer", settings.get("TOKENIZER", "gpt2"))
    _check_tokenizer(tokenizer)
    bpe_vocab_size = cli.get("bpe_vocab_size", settings.get("BPE_VOCAB_SIZE", 1024))
    check_int("BPE_VOCAB_SIZE (or --vocab-size)", bpe_vocab_size, low=257, high=1_000_000)
    device = cli.get("device", settings.get("DEVICE"))
    if device is not None:
        check_choice("DEVICE (or --device)", device, DEVICES)
    seed = cli.get("seed", settings.get("SEED", 123))
    check_int("SEED (or --seed)", seed, low=0)
    log_every = settings.get("LOG_EVERY", 10)
    check_int("LOG_EVERY", log_every)
    data = cli.get("data", settings.get("DATA"))
    out = cli.get("out", settings.get("OUT"))
    for name, value in (("DATA (or --data)", data), ("OUT (or --out)", out)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"{name} must be a path string or None, got {value!r}.")
    params = settings.get("generation_params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"generation_params must be a dict, got {type(params).__name__}.")
    generation = check_generation({**params, **{k: cli[k] for k in GENERATION_DEFAULTS if k in cli}})
    text_field = cli.get("text_field", settings.get("TEXT_FIELD", "text"))
    if not isinstance(text_field, str) or not text_field:
        raise ConfigError(f"TEXT_FIELD (or --text-field) must name a field, got {text_field!r}.")
    data_format = cli.get("data_format", settings.get("DATA_FORMAT", "auto"))
    check_choice("DATA_FORMAT (or --data-format)", data_format, DATA_FORMATS)
    export_hf = cli.get("export_hf", settings.get("EXPORT_HF", False))
    if not isinstance(export_hf, bool):
        raise ConfigError(f"EXPORT_HF must be True or False, got {export_hf!r}.")
    return dict(tokenizer=tokenizer, bpe_vocab_size=bpe_vocab_size, data=data, out=out, device=device, seed=seed,
                log_every=log_every, generation=generation, text_field=text_field, data_format=data_format,
                export_hf=export_hf)


def _resolve_models(settings: dict[str, Any], cli: dict[str, Any], task: str,
                    base: dict[str, Any]) -> tuple[str | None, str | None, list[str], list[float] | None]:
    """The models a run starts from or reads: --checkpoint (repeated: an ensemble), --pretrained, INIT."""
    checkpoint, pretrained = cli.get("checkpoint"), cli.get("pretrained")
    if task in FINETUNE_TASKS + ALIGN_TASKS:
        if checkpoint and pretrained:
            raise ConfigError("fine-tuning and alignment start from one model: give --checkpoint DIR (a "
                              "minigpt run) or --pretrained NAME (a Hugging Face model), not both.")
        checkpoint, pretrained = _resolve_init(settings, checkpoint, pretrained, base)
    if task in ("generate", "evaluate") and bool(checkpoint) == bool(pretrained):
        raise ConfigError(f"--task {task} needs one model: --checkpoint DIR (the run directory of a "
                          "trained model, e.g. runs/pretrain-quick) or --pretrained NAME (a Hugging Face model: "
                          f"{', '.join(PRETRAINED_MODELS)}; a hub repository owner/name; or a folder).")
    ensemble, weights = list(cli.get("ensemble", [])), cli.get("ensemble_weights")
    if ensemble and task not in ("generate", "evaluate"):
        raise ConfigError(f"--checkpoint once for --task {task}; several only for generate and evaluate "
                          "(an ensemble of models).")
    if weights is not None:
        if not checkpoint or len(weights) != 1 + len(ensemble):
            raise ConfigError(f"--ensemble-weights takes one number per --checkpoint: got {len(weights)} "
                              f"for {(1 + len(ensemble)) if checkpoint else 0} checkpoints.")
        for weight in weights:
            check_float("each of --ensemble-weights", weight, 0.0, low_inclusive=False)
    if cli.get("limit") is not None:
        check_int("--limit", cli["limit"])
    return checkpoint, pretrained, ensemble, weights


def _resolve_finetune(settings: dict[str, Any], cli: dict[str, Any], task: str, mode: str,
                      base: dict[str, Any]) -> FinetuneConfig:
    """The fine-tuning settings: the mode's, finetune_params in custom mode, then the flags."""
    params = settings.get("finetune_params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"finetune_params must be a dict, got {type(params).__name__}.")
    check_keys("finetune_params", params, FINETUNE_PARAM_KEYS)
    values = {**base["finetune"], **(params if mode == "custom" else {})}
    values.update({key: cli[key] for key in FINETUNE_FLAGS if key in cli})
    if task == "sft" and "max_new_tokens" in cli:
        values["max_new_tokens"] = cli["max_new_tokens"]
    return _build(f"the fine-tuning settings ({mode} mode)", FinetuneConfig, **values)


def _resolve_align(settings: dict[str, Any], cli: dict[str, Any], mode: str, base: dict[str, Any]) -> AlignConfig:
    """The alignment settings: the mode's, align_params in custom mode, then the flags."""
    params = settings.get("align_params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"align_params must be a dict, got {type(params).__name__}.")
    check_keys("align_params", params, ALIGN_PARAM_KEYS)
    values = {**base["align"], **(params if mode == "custom" else {})}
    values.update({key: cli[key] for key in ALIGN_FLAGS if key in cli})
    if "max_new_tokens" in cli:
        values["max_new_tokens"] = cli["max_new_tokens"]
    return _build(f"the alignment settings ({mode} mode)", AlignConfig, **values)


def _resolve_init(settings: dict[str, Any], checkpoint: str | None, pretrained: str | None,
                  base: dict[str, Any]) -> tuple[str | None, str | None]:
    """Where fine-tuning starts: --checkpoint / --pretrained, else INIT, else the mode's choice.

    INIT is "scratch" (a new model), a `PRETRAINED_MODELS` name, a Hugging Face model folder, or
    a minigpt run directory (one holding checkpoint.pt).
    """
    if checkpoint or pretrained:
        return checkpoint, pretrained
    init = settings.get("INIT")
    if init is None:
        return base.get("checkpoint"), base["pretrained"]
    if not isinstance(init, str) or not init:
        raise ConfigError(f"INIT must be None, 'scratch', a pretrained model's name, or a directory, got {init!r}.")
    if init == "scratch":
        return None, None
    if init in PRETRAINED_NAMES:
        return None, init
    if (Path(init) / "checkpoint.pt").is_file():
        return init, None
    if (Path(init) / "config.json").is_file():
        return None, init
    raise ConfigError(f"INIT is {init!r}: not 'scratch', not a pretrained model ({', '.join(PRETRAINED_NAMES)}), "
                      "and not a directory holding a minigpt run (checkpoint.pt) or a Hugging Face model "
                      f"(config.json).{did_you_mean(init, ('scratch',) + PRETRAINED_NAMES)}")


# What may change when a stopped run continues; everything else is the run's own. How a
# step is computed (micro-batches, precision, compile) may change with the machine.
RESUME_TRAIN_OVERRIDES = ("num_epochs", "max_steps", "micro_batch_size", "precision", "compile")
RESUME_OVERRIDES = ("resume", "device", "task") + RESUME_TRAIN_OVERRIDES


def resolve_resume_config(saved: dict[str, Any], cli: dict[str, Any]) -> RunConfig:
    """The settings of a run being resumed: its saved ones, plus --epochs, --max-steps, --device."""
    cli = {k: v for k, v in cli.items() if v is not None}
    for key in cli:
        if key not in RESUME_OVERRIDES:
            flags = {"learning_rate": "--lr", "bpe_vocab_size": "--vocab-size"}
            flag = flags.get(key, "--" + key.replace("_", "-"))
            raise ConfigError(f"{flag} cannot change when resuming: a resumed run "
                              f"keeps its own settings (see {cli['resume']}/config.json). Drop the "
                              "flag, or start a new run with --out.")
    run = RunConfig.from_dict(saved)
    if cli.get("task", run.task) != run.task:
        raise ConfigError(f"--resume continues the {run.task} run in {cli['resume']}; use --task "
                          f"{run.task} (or leave --task out).")
    train = _build("the resumed training settings", replace, run.train,
                   **{k: cli[k] for k in RESUME_TRAIN_OVERRIDES if k in cli})
    return replace(run, train=train, resume=cli["resume"], device=cli.get("device", run.device))


def _check_tokenizer(tokenizer: Any) -> None:
    """A tokenizer name, or the path of a saved BPE file (read later, when the run starts)."""
    if tokenizer in TOKENIZERS:
        return
    if not isinstance(tokenizer, str) or not tokenizer:
        raise ConfigError(f"TOKENIZER (or --tokenizer) must be one of {', '.join(map(repr, TOKENIZERS))} "
                          f"or the path of a saved BPE tokenizer file, got {tokenizer!r}.")
    if not Path(tokenizer).is_file():
        raise ConfigError(
            f"TOKENIZER (or --tokenizer) is {tokenizer!r}, which is neither a tokenizer name "
            f"({', '.join(map(repr, TOKENIZERS))}) nor an existing file. Give a name, or the path "
            f"of a saved BPE tokenizer such as runs/pretrain-quick/tokenizer.bpe."
            f"{did_you_mean(tokenizer, TOKENIZERS)}")


def _mode_from_flags(settings: dict[str, Any]) -> str:
    quick, custom = settings.get("QUICK_MODE", True), settings.get("CUSTOM_MODE", False)
    for name, value in (("QUICK_MODE", quick), ("CUSTOM_MODE", custom)):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be True or False, got {value!r}.")
    if quick and custom:
        raise ConfigError("QUICK_MODE and CUSTOM_MODE are both True in config_run.py; "
                          "set QUICK_MODE = False to use custom_params (or CUSTOM_MODE = False).")
    return "quick" if quick else "custom" if custom else "full"


def _build(where: str, factory, *args, **kwargs):
    """Call a config constructor, naming where the failing values came from."""
    try:
        return factory(*args, **kwargs)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    except TypeError as err:  # e.g. a value of the wrong kind that slipped past a check
        raise ConfigError(f"{where}: {err}") from None


def settings_from_module(module) -> dict[str, Any]:
    """The values a config_run.py module defines (imports and private names left out)."""
    return {name: value for name, value in vars(module).items()
            if not name.startswith("_") and not isinstance(value, types.ModuleType)}
