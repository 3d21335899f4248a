"""minigpt: a GPT written from scratch in plain PyTorch, as a library.

    from minigpt import train_model, generate_text

    model, tokenizer, metrics = train_model(texts=["The cat sat on the mat."] * 200, epochs=2)
    print(generate_text(model, tokenizer, "The cat", max_new_tokens=20))

The names below are the public API; each lives in the module of its chapter (or in the run
layer and the pipelines above them) and is loaded on first use, so `import minigpt` stays
cheap and a module never imports the package back. `python main.py` and the `minigpt` command
are minigpt/cli.py.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> the module that defines it
_API = {
    # settings and errors
    "ConfigError": "minigpt.config", "GPTConfig": "minigpt.config", "TrainConfig": "minigpt.config",
    "RunConfig": "minigpt.config", "MODEL_PRESETS": "minigpt.config", "model_config": "minigpt.config",
    "resolve_run_config": "minigpt.settings",
    # text in
    "get_tokenizer": "minigpt.tokenizer", "BPETokenizer": "minigpt.tokenizer", "load_text": "minigpt.data",
    "create_dataloader": "minigpt.data",
    # the model
    "GPTModel": "minigpt.model",
    # training
    "train_model": "minigpt.task_pretrain", "pretrain": "minigpt.task_pretrain", "finetune": "minigpt.task_finetune",
    "align": "minigpt.task_align", "train_loop": "minigpt.train", "make_optimizer": "minigpt.train",
    # using a model
    "load_model": "minigpt.runs", "generate_text": "minigpt.generation", "stream_text": "minigpt.generation",
    "token_choices": "minigpt.generation", "text_to_token_ids": "minigpt.generation",
    "evaluate_text": "minigpt.evaluate", "perplexity": "minigpt.evaluate",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'minigpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # the next lookup is an ordinary one
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
