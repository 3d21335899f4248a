"""minigpt's command line, behind both `python main.py` and the `minigpt` command (pip install):
it does what config_run.py says, and command-line flags override it.

`python main.py` reads the config_run.py beside it; `minigpt` reads ./config_run.py when the
folder it runs in has one, and the built-in defaults (quick mode) otherwise.

    python main.py                                   # pretrain, quick mode (see config_run.py)
    python main.py --mode full                       # GPT-2 124M on the-verdict, 10 epochs
    python main.py --data my.txt --tokenizer char    # your own text
    python main.py --tokenizer train --vocab-size 2048   # learn a BPE on the training text first
    python main.py --resume runs/pretrain-quick --epochs 3
    python main.py --data tinyshakespeare --tokenizer char --max-steps 2000   # Shakespeare, character by character
    torchrun --nproc_per_node=2 main.py --batch-size 8 --micro-batch-size 2   # data-parallel, 2 processes
    python main.py --task generate --checkpoint runs/pretrain-quick --prompt "Every effort moves you"
    python main.py --task generate --pretrained gpt2          # chat with OpenAI's GPT-2 (downloads 0.5 GB once)
    python main.py --task export --checkpoint runs/pretrain-quick --out exported/   # for transformers
    python main.py --task generate --pretrained smollm2-135m --prompt "The capital of France"   # a Llama-family model
    python main.py --task sft --pretrained smollm2-135m --trainable lora   # fine-tune it with minigpt
    python main.py --task evaluate --checkpoint runs/pretrain-quick      # loss, perplexity, bits per byte
    python main.py --task evaluate --pretrained gpt2 --choices hellaswag # GPT-2 on HellaSwag
    python main.py --task evaluate --checkpoint runs/a --checkpoint runs/b   # an ensemble and each member
    python main.py --task classify --data reviews.csv            # a classifier (columns text,label)
    python main.py --task classify --checkpoint runs/classify-quick --prompt "WINNER! Claim your prize"
    python main.py --task sft --mode full                        # GPT-2 medium follows instructions
    python main.py --task sft --pretrained gpt2 --trainable lora --lora-rank 16
    python main.py --task generate --checkpoint runs/sft-quick --prompt "Name a primary color."
    python main.py --task reward                                 # a reward model from preference pairs
    python main.py --task dpo --checkpoint runs/sft-quick        # DPO on the preference pairs
    python main.py --task grpo                                   # GRPO on sums of small numbers
    python main.py --task ppo --checkpoint runs/sft-quick --reward-model runs/reward-quick --max-new-tokens 32
    python main.py --task generate --checkpoint runs/grpo-quick --prompt "What is 7 + 5?"
    python main.py --task studio                                 # build, train and chat in a web page
    python main.py --graph my-model.json                         # train a model built in the studio
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from dataclasses import replace
from pathlib import Path

from minigpt.config import (DATA_FORMATS, DPO_LOSSES, KL_ESTIMATORS, LR_SCHEDULES, MODEL_PRESETS, MODES, PRECISIONS, PRETRAINED_MODELS, PROMPT_STYLES,
                            SAMPLINGS, TASKS, TOKENIZERS, TRAINABLE, ConfigError)
from minigpt.data import NAMED_CORPORA
from minigpt.runs import EXIT_ERROR, EXIT_FINISHED, EXIT_INTERRUPTED, EXIT_STOPPED, Stopped, resume_settings
from minigpt.settings import resolve_resume_config, resolve_run_config, settings_from_module
from minigpt.task_align import align
from minigpt.task_evaluate import run_evaluate
from minigpt.task_export import run_export
from minigpt.task_finetune import finetune, run_classify
from minigpt.task_generate import run_generate
from minigpt.task_pretrain import pretrain

# What runs each task (the studio serves its own page: run_studio below).
PIPELINES = {"pretrain": pretrain, "generate": run_generate, "evaluate": run_evaluate, "export": run_export,
             "classify": run_classify, "sft": finetune, "reward": align, "dpo": align, "ppo": align, "grpo": align}


def whole_number_or_auto(text: str) -> int | str:
    """argparse type for --batch-size and --micro-batch-size: a whole number or "auto"."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got {text!r}") from None


def _add_studio_flags(parser: argparse.ArgumentParser) -> None:
    """The studio's address and browser."""
    studio = parser.add_argument_group("the studio (--task studio)")
    studio.add_argument("--host", help="address to listen on (default 127.0.0.1: this machine only)")
    studio.add_argument("--port", type=int, help="port to listen on (default 5000)")
    studio.add_argument("--no-browser", dest="open_browser", action="store_false", default=None,
                        help="do not open the page in a browser")


def _add_scale_flags(parser: argparse.ArgumentParser) -> None:
    """How a step is computed and scheduled (chapter 9)."""
    scale = parser.add_argument_group("training at scale (chapter 9; defaults: the mode's settings)")
    scale.add_argument("--micro-batch-size", type=whole_number_or_auto, metavar="N|auto",
                       help="windows per forward/backward; batch size / N = gradient accumulation steps "
                            "(auto: the largest that fits)")
    scale.add_argument("--precision", choices=PRECISIONS, help="auto: bf16 on recent CUDA GPUs, fp32 on CPU")
    scale.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the model (ignored where unsupported)")
    scale.add_argument("--lr-schedule", choices=LR_SCHEDULES)
    scale.add_argument("--warmup-steps", type=int, metavar="N")
    scale.add_argument("--min-lr", type=float, help="where the cosine schedule ends (default: lr / 10)")
    scale.add_argument("--grad-clip", type=float, help="clip the gradient norm to this")
    scale.add_argument("--weight-decay", type=float, help="AdamW's decay of the weight matrices")
    scale.add_argument("--beta2", type=float, help="AdamW's momentum of the squared gradient (0.95-0.99 for small batches)")
    scale.add_argument("--sampling", choices=SAMPLINGS,
                       help="sliding: each window once per epoch; random: random windows (auto: random for token files)")
    scale.add_argument("--eval-freq", type=int, metavar="N", help="evaluate every N steps")
    scale.add_argument("--eval-iter", type=int, metavar="N", help="batches per split in each evaluation")


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The models a task reads: runs, ensembles, GPT-2; and what generate and evaluate read."""
    parser.add_argument("--checkpoint", metavar="DIR", action="append",
                        help="run directory to generate from, export, fine-tune from, or classify with; "
                             "--task generate / evaluate: repeat it for an ensemble of runs")
    parser.add_argument("--ensemble-weights", type=float, nargs="+", metavar="W",
                        help="an ensemble's weights, one per --checkpoint (default: equal)")
    published = "; ".join(f"{name} ({model.parameters}, {model.download})" for name, model in PRETRAINED_MODELS.items())
    parser.add_argument("--pretrained", metavar="NAME|REPO|DIR",
                        help=f"a Hugging Face model to generate with, evaluate or fine-tune, downloaded once: "
                             f"{published}; or a hub repository owner/name, or a folder (GPT-2, Llama and Qwen2 "
                             "layouts, with their tokenizer)")
    parser.add_argument("--prompt", help="text to continue (--task generate); without it, an interactive loop")
    parser.add_argument("--choices", metavar="hellaswag|FILE",
                        help="--task evaluate: multiple-choice items, HellaSwag's validation set (downloaded "
                             "once) or a JSONL of {context, endings, label}")
    parser.add_argument("--limit", type=int, metavar="N", help="--task evaluate: score the first N items only")


def _add_decoding_flags(parser: argparse.ArgumentParser) -> None:
    """How --task generate decodes."""
    sampling = parser.add_argument_group("decoding (--task generate; defaults: config_run.generation_params)")
    sampling.add_argument("--max-new-tokens", type=int, help="tokens to generate (default 60)")
    sampling.add_argument("--temperature", type=float, help="0 = greedy (default 0.8)")
    sampling.add_argument("--top-k", type=int, help="sample among the k most likely tokens (default 40)")
    sampling.add_argument("--top-p", type=float, help="sample among the smallest set holding probability p")
    sampling.add_argument("--repetition-penalty", type=float, help="> 1 makes repeated tokens less likely")
    sampling.add_argument("--num-beams", type=int, help="beam search with this many beams (needs --temperature 0)")
    sampling.add_argument("--length-penalty", type=float, help="beam search: > 0 favours longer texts")
    sampling.add_argument("--stop", dest="stop_strings", action="append", metavar="TEXT",
                          help="stop when this text appears (repeatable; \\n is a newline), e.g. --stop '\\n\\n'")
    sampling.add_argument("--no-cache", dest="use_cache", action="store_false", default=None,
                          help="recompute the whole text at every step (slower; for comparison)")
    sampling.add_argument("--show-probs", type=int, metavar="K",
                          help="print each generated token with the model's K most likely candidates and their "
                               "probabilities")


def _add_finetune_flags(parser: argparse.ArgumentParser) -> None:
    """Fine-tuning (chapter 7)."""
    tuning = parser.add_argument_group("fine-tuning (--task classify | sft, chapter 7; defaults: the mode's settings)")
    tuning.add_argument("--trainable", choices=TRAINABLE,
                        help="what trains: all weights, the last blocks + final norm + head, the head, or LoRA")
    tuning.add_argument("--last-blocks", type=int, metavar="N", help="with --trainable last_blocks: how many")
    tuning.add_argument("--lora-rank", type=int, metavar="R", help="rank of the LoRA matrices (default 8)")
    tuning.add_argument("--lora-alpha", type=float, help="LoRA's scale is alpha / rank (default 16)")
    tuning.add_argument("--prompt-style", choices=PROMPT_STYLES,
                        help="sft, reward, dpo, ppo, grpo: the instruction template")
    tuning.add_argument("--mask-prompt", action=argparse.BooleanOptionalAction, default=None,
                        help="sft: put the loss on the responses only")
    tuning.add_argument("--judge", action=argparse.BooleanOptionalAction, default=None,
                        help="sft: score the test responses with a local Ollama judge when one answers")


def _add_align_flags(parser: argparse.ArgumentParser) -> None:
    """Alignment (chapter 8)."""
    aligning = parser.add_argument_group("alignment (--task reward | dpo | ppo | grpo, chapter 8; defaults: the "
                                         "mode's settings)")
    aligning.add_argument("--beta", type=float, help="dpo: the implicit reward's scale; ppo/grpo: the KL penalty")
    aligning.add_argument("--dpo-loss", choices=DPO_LOSSES, help="dpo: sigmoid (Bradley-Terry) or ipo")
    aligning.add_argument("--reward-model", metavar="DIR",
                          help="ppo: a --task reward run scores the answers (default: exact match with the records)")
    aligning.add_argument("--iterations", type=int, metavar="N", help="ppo/grpo: rounds of sampling and updating")
    aligning.add_argument("--group-size", type=int, metavar="G", help="grpo: answers sampled per prompt")
    aligning.add_argument("--kl-estimator", choices=KL_ESTIMATORS, help="ppo: the per-token KL penalty's estimator")
    aligning.add_argument("--sft-steps", type=int, metavar="N",
                          help="ppo/grpo from new weights: supervised warm-up steps on the task first")


def parse_args(argv: list[str] | None = None) -> dict:
    """The flags the user gave (None for the rest), as the names resolve_run_config reads."""
    parser = argparse.ArgumentParser(
        description="Train and sample a GPT written from scratch. Defaults come from config_run.py.")
    parser.add_argument("--task", choices=TASKS,
                        help="what to do (config_run.TASK); studio: the web page that builds, trains and chats")
    parser.add_argument("--mode", choices=MODES, help="quick, full or custom (config_run.QUICK_MODE / CUSTOM_MODE)")
    parser.add_argument("--device", choices=["cpu", "cuda", "mps"], help="default: the best available")
    parser.add_argument("--model", choices=list(MODEL_PRESETS), help="model preset (config_run.MODEL)")
    parser.add_argument("--tokenizer", metavar="NAME|PATH",
                        help=f"{', '.join(TOKENIZERS)}, or a saved BPE file (config_run.TOKENIZER)")
    parser.add_argument("--vocab-size", dest="bpe_vocab_size", type=int, metavar="N",
                        help="size of the BPE that --tokenizer train learns (config_run.BPE_VOCAB_SIZE)")
    parser.add_argument("--data", help="a UTF-8 text file, a .jsonl / .json of texts (--text-field), pre-tokenized "
                                       "JSONL ({\"input_ids\": [...]}, vocab.json beside it), a folder of .txt files, a "
                                       "Hugging Face dataset (hf:NAME[:CONFIG], or hf:FOLDER it saved), or a corpus by "
                                       f"name: {', '.join(NAMED_CORPORA)} (default the-verdict; wikitext-2, "
                                       "wikitext-103 and ptb with their own splits); for --task classify a "
                                       ".csv/.tsv/.jsonl of text,label (default: SMS spam); for --task sft "
                                       "a JSON list of instruction records (default: instruction-data.json)")
    parser.add_argument("--data-format", choices=DATA_FORMATS,
                        help="how to read --data (default auto: by what it is; text reads a .jsonl as plain text)")
    parser.add_argument("--out", help="run directory (default: runs/<task>-<mode>)")
    parser.add_argument("--resume", metavar="DIR", help="continue the stopped or finished run in DIR")
    parser.add_argument("--epochs", dest="num_epochs", type=int, help="number of epochs")
    parser.add_argument("--batch-size", type=whole_number_or_auto, metavar="N|auto",
                        help="sequences per optimizer step; auto: keep the mode's and pick the largest "
                             "micro-batch that fits the device (measured), accumulating the rest")
    parser.add_argument("--lr", dest="learning_rate", type=float, help="peak learning rate")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    parser.add_argument("--text-field", metavar="NAME",
                        help="a .jsonl / .json corpus or a Hugging Face dataset: the field of each record that holds "
                             "its text (default text)")
    parser.add_argument("--val-fraction", type=float, metavar="F",
                        help="the share at the end of a text held out for validation (default 0.1; a corpus with "
                             "its own validation split uses that)")
    parser.add_argument("--max-length", type=int, metavar="N",
                        help="tokens per training window (default: the mode's, cut to the model's context)")
    parser.add_argument("--context-length", type=int, metavar="N",
                        help="the context of new weights (a run that starts from a model keeps that model's)")
    parser.add_argument("--start-context", metavar="TEXT",
                        help="the prompt of the sample after each epoch (default: 'Every effort moves you', or the "
                             "text's first words where the tokenizer cannot encode that)")
    parser.add_argument("--seed", type=int, help="config_run.SEED")
    parser.add_argument("--export-hf", action="store_const", const=True,
                        help="after training, write hf/final and hf/best in the run directory: folders transformers "
                             "loads whole, model and tokenizer (config_run.EXPORT_HF)")
    parser.add_argument("--graph", metavar="FILE",
                        help="pretrain the model of a studio graph (a JSON file the studio exports)")
    for add_flags in (_add_studio_flags, _add_scale_flags, _add_model_flags, _add_decoding_flags,
                      _add_finetune_flags, _add_align_flags):
        add_flags(parser)
    cli = {key: value for key, value in vars(parser.parse_args(argv)).items() if value is not None}
    if cli.get("batch_size") == "auto":  # keep the batch per step; measure the micro-batch
        if cli.get("micro_batch_size", "auto") != "auto":
            parser.error("--batch-size auto picks the micro-batch itself; drop --micro-batch-size, or give "
                         "--batch-size a number.")
        del cli["batch_size"]
        cli["micro_batch_size"] = "auto"
    if "checkpoint" in cli:  # several: an ensemble, led by the first
        cli["checkpoint"], *others = cli["checkpoint"]
        if others:
            cli["ensemble"] = others
    if "stop_strings" in cli:  # let --stop "\n\n" mean two newlines, as users type it
        cli["stop_strings"] = [s.replace("\\n", "\n").replace("\\t", "\t") for s in cli["stop_strings"]]
    return cli


def run_studio(cli: dict) -> None:
    from minigpt.studio import serve

    unused = sorted(set(cli) - {"task", "host", "port", "open_browser"})
    if unused:
        raise ConfigError(f"--task studio takes --host, --port and --no-browser only; drop "
                          f"{', '.join('--' + name.replace('_', '-') for name in unused)} (the page sets the rest).")
    serve(cli.get("host", "127.0.0.1"), cli.get("port", 5000), cli.get("open_browser", True))


def graph_settings(cli: dict, config_run: types.ModuleType) -> tuple[dict, dict | None, str]:
    """config_run.py's settings with a studio graph's model, data and training goal on top, the graph
    itself when it is not the standard chain (the run trains it compiled), and the graph's name."""
    from minigpt.studio import GraphError, settings_from_graph

    if cli.get("task", getattr(config_run, "TASK", "pretrain")) != "pretrain":
        raise ConfigError("--graph describes a model to pretrain; drop --task, or use --task pretrain.")
    path = Path(cli.pop("graph"))
    try:
        graph = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read the graph {path}: {err.strerror}; export it from the studio first.") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not JSON ({err}); export the graph from the studio again.") from None
    try:
        settings, free_graph, name = settings_from_graph(graph)
        return {**settings_from_module(config_run), **settings, "TASK": "pretrain"}, free_graph, name
    except GraphError as err:
        raise ConfigError(f"the graph in {path} cannot be built: {err}") from None


def load_config_run(folder: Path) -> types.ModuleType:
    """The config_run.py in `folder` as a module; an empty one (the built-in defaults) if there is none."""
    path = folder / "config_run.py"
    if not path.is_file():
        return types.ModuleType("config_run")
    spec = importlib.util.spec_from_file_location("config_run", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - the user's file: say which line is wrong, as Python does
        raise ConfigError(f"{path} does not run ({type(err).__name__}: {err}); fix it, or delete it to use the "
                          "defaults.") from None
    return module


def main(argv: list[str] | None = None, config_run: types.ModuleType | None = None) -> int:
    """Run what the settings (`config_run`, default ./config_run.py) and the flags say; the exit code
    says how it ended (README, "Exit codes"): 0 finished, 2 refused or failed with a message, 3
    stopped and resumable, 130 interrupted at once."""
    cli = parse_args(argv)
    try:
        if config_run is None:
            config_run = load_config_run(Path.cwd())
        if cli.get("task", getattr(config_run, "TASK", None)) == "studio":
            run_studio(cli)
            return EXIT_FINISHED
        studio_flags = [f"--{name.replace('_', '-')}" for name in ("host", "port", "open_browser") if name in cli]
        if studio_flags:
            raise ConfigError(f"{', '.join(studio_flags).replace('--open-browser', '--no-browser')} "
                              "only apply to --task studio.")
        if "graph" in cli:
            settings, free_graph, name = graph_settings(cli, config_run)
            run = replace(resolve_run_config(settings, cli), graph=free_graph, model_name=f"{name} (studio graph)")
        elif "resume" in cli:
            run = resolve_resume_config(resume_settings(cli["resume"]), cli)
        else:
            run = resolve_run_config(settings_from_module(config_run), cli)
        outcome = PIPELINES[run.task](run)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except Stopped:  # a stop before the first step or during the last measurements: the line above says what is kept
        return EXIT_STOPPED
    except KeyboardInterrupt:  # Ctrl-C twice, or outside a run: no traceback
        print("interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    stopped = isinstance(outcome, tuple) and not outcome[2]["completed"]  # a training task's metrics
    return EXIT_STOPPED if stopped else EXIT_FINISHED


if __name__ == "__main__":
    sys.exit(main())
