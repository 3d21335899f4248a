"""minigpt's entry point: does what config_run.py says; command-line flags override it.

    python main.py                                   # pretrain, quick mode (see config_run.py)
    python main.py --mode full                       # GPT-2 124M on the-verdict, 10 epochs
    python main.py --data my.txt --tokenizer char    # your own text
    python main.py --tokenizer train --vocab-size 2048   # learn a BPE on the training text first
    python main.py --resume runs/pretrain-quick --epochs 3
    python main.py --task generate --checkpoint runs/pretrain-quick --prompt "Every effort moves you"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import config_run
from minigpt.config import (MODEL_PRESETS, MODES, TASKS, TOKENIZERS, ConfigError, resolve_resume_config,
                            resolve_run_config, settings_from_module)


def parse_args(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description="Train and sample a GPT written from scratch. Defaults come from config_run.py.")
    parser.add_argument("--task", choices=TASKS, help="what to do (config_run.TASK)")
    parser.add_argument("--mode", choices=MODES, help="quick, full or custom (config_run.QUICK_MODE / CUSTOM_MODE)")
    parser.add_argument("--device", choices=["cpu", "cuda", "mps"], help="default: the best available")
    parser.add_argument("--model", choices=list(MODEL_PRESETS), help="model preset (config_run.MODEL)")
    parser.add_argument("--tokenizer", metavar="NAME|PATH",
                        help=f"{', '.join(TOKENIZERS)}, or a saved BPE file (config_run.TOKENIZER)")
    parser.add_argument("--vocab-size", dest="bpe_vocab_size", type=int, metavar="N",
                        help="size of the BPE that --tokenizer train learns (config_run.BPE_VOCAB_SIZE)")
    parser.add_argument("--data", help="a UTF-8 text file to train on (default: the-verdict.txt)")
    parser.add_argument("--out", help="run directory (default: runs/<task>-<mode>)")
    parser.add_argument("--resume", metavar="DIR", help="continue the stopped or finished run in DIR")
    parser.add_argument("--epochs", dest="num_epochs", type=int, help="number of epochs")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", dest="learning_rate", type=float, help="peak learning rate")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    parser.add_argument("--seed", type=int, help="config_run.SEED")
    parser.add_argument("--checkpoint", metavar="DIR", help="run directory to generate from (--task generate)")
    parser.add_argument("--prompt", help="text to continue (--task generate)")
    parser.add_argument("--max-new-tokens", type=int, help="tokens to generate (default 60)")
    parser.add_argument("--temperature", type=float, help="0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens (default 40)")
    parser.add_argument("--top-p", type=float, help="sample among the smallest set holding probability p")
    return {key: value for key, value in vars(parser.parse_args(argv)).items() if value is not None}


def run_generate(run) -> None:
    import torch

    from minigpt.generation import generate_text
    from minigpt.train import load_model, pick_device

    device = pick_device(run.device)
    model, tokenizer, saved = load_model(run.checkpoint, device)
    prompt = run.prompt or saved["train"]["start_context"]
    generator = torch.Generator(device=device).manual_seed(run.seed)
    options = run.generation
    print(f"minigpt | generate | {run.checkpoint} ({saved['model_name']}, {tokenizer.name} tokenizer) | "
          + ", ".join(f"{k}={v}" for k, v in options.items()), file=sys.stderr)
    print(generate_text(model, tokenizer, prompt, generator=generator, **options))


def main(argv: list[str] | None = None) -> int:
    cli = parse_args(argv)
    try:
        if "resume" in cli:
            config_path = Path(cli["resume"]) / "config.json"
            if not config_path.is_file():
                raise ConfigError(f"no run to resume in {cli['resume']} (it has no config.json); "
                                  "point --resume at a run directory such as runs/pretrain-quick.")
            run = resolve_resume_config(json.loads(config_path.read_text()), cli)
        else:
            run = resolve_run_config(settings_from_module(config_run), cli)
        if run.task == "generate":
            run_generate(run)
        else:
            from minigpt.train import pretrain
            pretrain(run)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
