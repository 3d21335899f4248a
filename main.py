"""minigpt's entry point: does what config_run.py says; command-line flags override it.

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
import json
import sys
from pathlib import Path

import config_run
from minigpt.config import (ALIGN_TASKS, DPO_LOSSES, GENERATION_DEFAULTS, KL_ESTIMATORS, LR_SCHEDULES,
                            MODEL_PRESETS, MODES, PRECISIONS, PROMPT_STYLES, SAMPLINGS, TASKS, TOKENIZERS, TRAINABLE,
                            ConfigError, resolve_resume_config, resolve_run_config, settings_from_module)


def whole_number_or_auto(text: str) -> int | str:
    """argparse type for --batch-size and --micro-batch-size: a whole number or "auto"."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> dict:
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
    parser.add_argument("--data", help="a UTF-8 text file or a folder of .txt files, or a corpus by name: "
                                       "the-verdict (default), tinyshakespeare; for --task classify a "
                                       ".csv/.tsv/.jsonl of text,label (default: SMS spam); for --task sft "
                                       "a JSON list of instruction records (default: instruction-data.json)")
    parser.add_argument("--out", help="run directory (default: runs/<task>-<mode>)")
    parser.add_argument("--resume", metavar="DIR", help="continue the stopped or finished run in DIR")
    parser.add_argument("--epochs", dest="num_epochs", type=int, help="number of epochs")
    parser.add_argument("--batch-size", type=whole_number_or_auto, metavar="N|auto",
                        help="sequences per optimizer step; auto: keep the mode's and pick the largest "
                             "micro-batch that fits the device (measured), accumulating the rest")
    parser.add_argument("--lr", dest="learning_rate", type=float, help="peak learning rate")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    parser.add_argument("--seed", type=int, help="config_run.SEED")
    parser.add_argument("--graph", metavar="FILE",
                        help="pretrain the model of a studio graph (a JSON file the studio exports)")
    studio = parser.add_argument_group("the studio (--task studio)")
    studio.add_argument("--host", help="address to listen on (default 127.0.0.1: this machine only)")
    studio.add_argument("--port", type=int, help="port to listen on (default 5000)")
    studio.add_argument("--no-browser", dest="open_browser", action="store_false", default=None,
                        help="do not open the page in a browser")
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
    scale.add_argument("--sampling", choices=SAMPLINGS,
                       help="sliding: each window once per epoch; random: random windows (auto: random for token files)")
    scale.add_argument("--eval-freq", type=int, metavar="N", help="evaluate every N steps")
    parser.add_argument("--checkpoint", metavar="DIR", action="append",
                        help="run directory to generate from, export, fine-tune from, or classify with; "
                             "--task generate / evaluate: repeat it for an ensemble of runs")
    parser.add_argument("--ensemble-weights", type=float, nargs="+", metavar="W",
                        help="an ensemble's weights, one per --checkpoint (default: equal)")
    parser.add_argument("--pretrained", metavar="NAME|DIR",
                        help="OpenAI's GPT-2 to generate with or fine-tune: gpt2, gpt2-medium, gpt2-large, "
                             "gpt2-xl, or a Hugging Face GPT-2 folder")
    parser.add_argument("--prompt", help="text to continue (--task generate); without it, an interactive loop")
    parser.add_argument("--choices", metavar="hellaswag|FILE",
                        help="--task evaluate: multiple-choice items, HellaSwag's validation set (downloaded "
                             "once) or a JSONL of {context, endings, label}")
    parser.add_argument("--limit", type=int, metavar="N", help="--task evaluate: score the first N items only")
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


def load_for_generation(run):
    """The model, its tokenizer, a one-line description, and the instruction template if the
    model was instruction-tuned (None otherwise), from a run directory or a pretrained GPT-2."""
    from minigpt.model import GPTModel
    from minigpt.tokenizer import get_tokenizer
    from minigpt.train import load_model, pick_device

    if run.ensemble:  # several runs decode as one
        return load_ensemble(run)
    device = pick_device(run.device)
    if run.checkpoint:
        model, tokenizer, saved = load_model(run.checkpoint, device)
        if saved["task"] == "classify":
            raise ConfigError(f"{run.checkpoint} holds a classifier, which scores classes, not text; "
                              f"classify with --task classify --checkpoint {run.checkpoint} --prompt TEXT.")
        if saved["task"] == "reward":
            raise ConfigError(f"{run.checkpoint} holds a reward model, which scores answers, not text; "
                              f"use it with --task ppo --reward-model {run.checkpoint}.")
        style = (saved["finetune"]["prompt_style"] if saved["task"] == "sft" else
                 saved["align"]["prompt_style"] if saved["task"] in ALIGN_TASKS else None)
        what = f", instruction-tuned ({style} template)" if style else ""
        return model, tokenizer, f"{run.checkpoint} ({saved['model_name']}, {tokenizer.name} tokenizer{what})", style
    model = GPTModel.from_pretrained(run.pretrained).to(device)
    if model.cfg.vocab_size != 50257:
        raise ConfigError(f"{run.pretrained} has a vocabulary of {model.cfg.vocab_size} tokens, not GPT-2's "
                          "50,257, so GPT-2's tokenizer does not fit it; generate from its minigpt run "
                          "directory with --checkpoint instead.")
    size = f"{model.num_parameters() / 1e6:.0f}M parameters"
    return model, get_tokenizer("gpt2"), f"{run.pretrained} ({size}, gpt2 tokenizer)", None


def load_ensemble(run):
    """load_for_generation for several runs (--checkpoint repeated): an `Ensemble` of their models,
    which must share a tokenizer (compared by its saved spec) and an instruction template."""
    from dataclasses import replace

    from minigpt.generation import Ensemble

    checkpoints = [run.checkpoint, *run.ensemble]
    loaded = [load_for_generation(replace(run, checkpoint=checkpoint, ensemble=[])) for checkpoint in checkpoints]
    _, tokenizer, _, style = loaded[0]
    for checkpoint, (_, other_tokenizer, _, other_style) in zip(checkpoints[1:], loaded[1:]):
        if other_tokenizer.spec() != tokenizer.spec():
            names = (f"both {tokenizer.name}, with different vocabularies" if other_tokenizer.name == tokenizer.name
                     else f"{tokenizer.name} and {other_tokenizer.name}")
            raise ConfigError(f"{checkpoints[0]} and {checkpoint} use different tokenizers ({names}); an "
                              "ensemble averages the scores of the same tokens, so give runs trained with "
                              "the same tokenizer.")
        if other_style != style:
            raise ConfigError(f"{checkpoints[0]} and {checkpoint} expect different prompts (instruction "
                              f"template {style} and {other_style}); ensemble runs that read the same template.")
    ensemble = Ensemble([model for model, *_ in loaded], run.ensemble_weights)
    members = ", ".join(f"{source} x {weight:.3g}" for (_, _, source, _), weight in zip(loaded, ensemble.weights))
    return ensemble, tokenizer, f"ensemble of {len(loaded)}: {members}", style


def run_generate(run) -> None:
    import torch

    from minigpt.data import format_prompt
    from minigpt.generation import generate_text, stream_text

    model, tokenizer, source, style = load_for_generation(run)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(run.seed)
    options = dict(run.generation)
    shown = {k: v for k, v in options.items() if v != GENERATION_DEFAULTS[k] or k in ("max_new_tokens", "temperature")}
    print(f"minigpt | generate | {source} | " + ", ".join(f"{k}={v!r}" for k, v in shown.items()), file=sys.stderr)

    def answer(prompt: str) -> None:
        if style is not None:  # an instruction-tuned model answers prompts in its template
            prompt = format_prompt({"instruction": prompt}, style)
        if options["num_beams"] > 1:  # beam search knows its answer only at the end
            print(generate_text(model, tokenizer, prompt, generator=generator, **options)[len(prompt):], flush=True)
            return
        options_for_stream = {k: v for k, v in options.items() if k not in ("num_beams", "length_penalty")}
        for piece in stream_text(model, tokenizer, prompt, generator=generator, **options_for_stream):
            print(piece, end="", flush=True)
        print(flush=True)

    depths: list[torch.Tensor] = []  # adaptive depth: the blocks each generated token ran
    if getattr(model, "halt_units", None) is not None:  # a GPTModel with adaptive depth (not an ensemble)
        model.register_forward_hook(lambda module, inputs, output: depths.append(module.depth[:, -1]))
    if run.prompt is not None:
        print(run.prompt, end="\n" if style else "", flush=True)
        answer(run.prompt)
        if depths:
            print(f"mean depth per generated token: {torch.cat(depths).float().mean():.2f} of "
                  f"{model.cfg.n_layers} blocks", file=sys.stderr)
        return
    print("Type an instruction and press Enter: the model answers it." if style else
          "Type a text and press Enter: the model continues it.",
          "Ctrl-C stops an answer; an empty line or Ctrl-D quits.", file=sys.stderr)
    for prompt in typed_lines():
        try:
            answer(prompt)
        except KeyboardInterrupt:
            print(" [stopped]", flush=True)


def typed_lines():
    """Lines the user types at a "> " prompt, until an empty line, Ctrl-D or Ctrl-C."""
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if not line.strip():
            return
        yield line


def run_evaluate(run) -> None:
    """Loss, perplexity, bits per byte and next-token accuracy on a text, and multiple-choice accuracy
    (HellaSwag style) if asked; the report goes to evaluation.json and evaluation.md."""
    from minigpt.data import corpus_path, read_text
    from minigpt.evaluate import evaluate_multiple_choice, evaluate_text, load_multiple_choice, report_markdown, write_report

    from minigpt.generation import Ensemble

    model, tokenizer, source, _ = load_for_generation(run)
    device = next(model.parameters()).device
    path = corpus_path(run.data)
    print(f"minigpt | evaluate | {source} | text {path}", file=sys.stderr)
    text = read_text(path)
    items = load_multiple_choice(run.choices)[:run.limit] if run.choices else None
    max_length = min(model.cfg.context_length, 1024)  # an ensemble's members all read the same windows

    def scores(scored) -> dict:
        result = {"text": {"file": str(path), **evaluate_text(scored, tokenizer, text, max_length, batch_size=4,
                                                               device=device)}}
        if items is not None:
            result["multiple_choice"] = {"file": run.choices, **evaluate_multiple_choice(scored, tokenizer, items,
                                                                                         device)}
        return result

    report = {"model": source, **scores(model)}
    if isinstance(model, Ensemble):  # each member beside the ensemble
        report["weights"] = model.weights
        report["members"] = [{"model": checkpoint, **scores(member)}
                             for checkpoint, member in zip([run.checkpoint, *run.ensemble], model.models)]
    if run.out:
        out = Path(run.out)
    elif run.ensemble:  # its own directory, not one member's
        out = Path("runs") / "-".join(["evaluate-ensemble"] + [Path(c).name for c in [run.checkpoint, *run.ensemble]])
    else:
        out = Path(run.checkpoint) if run.checkpoint else Path("runs") / f"evaluate-{Path(run.pretrained).name}"
    paths = write_report(report, out)
    print(report_markdown(report))
    print(f"wrote {paths[0]} and {paths[1]}")


def run_classify(run) -> None:
    """Fine-tune a classifier; or, given a classifier's run directory, classify texts with it."""
    from minigpt.finetune import classify, finetune
    from minigpt.train import load_checkpoint, load_model, pick_device

    if not (run.checkpoint and load_checkpoint(run.checkpoint)["run"]["task"] == "classify"):
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
        show(text)


def run_export(run) -> None:
    from minigpt.model import save_hf_gpt2
    from minigpt.train import load_model

    model, tokenizer, saved = load_model(run.checkpoint, "cpu")
    if saved["task"] in ("classify", "reward"):
        raise ConfigError(f"{run.checkpoint} holds a {'classifier' if saved['task'] == 'classify' else 'reward model'}; "
                          "Hugging Face's GPT2LMHeadModel has a vocabulary head, so only language models "
                          "(pretrained, instruction-tuned or aligned runs) export.")
    folder = save_hf_gpt2(model, run.out)
    print(f"wrote {folder}/config.json and {folder}/model.safetensors ({saved['model_name']}, "
          f"{model.num_parameters():,} parameters); load them with "
          f"transformers.GPT2LMHeadModel.from_pretrained({str(folder)!r}).")
    if tokenizer.name != "gpt2":
        print(f"note: this run used the {tokenizer.name} tokenizer, not GPT-2's; encode text with it "
              f"(minigpt.train.load_model({run.checkpoint!r})) before giving ids to transformers.")


def run_studio(cli: dict) -> None:
    from minigpt.studio import serve

    unused = sorted(set(cli) - {"task", "host", "port", "open_browser"})
    if unused:
        raise ConfigError(f"--task studio takes --host, --port and --no-browser only; drop "
                          f"{', '.join('--' + name.replace('_', '-') for name in unused)} (the page sets the rest).")
    serve(cli.get("host", "127.0.0.1"), cli.get("port", 5000), cli.get("open_browser", True))


def graph_settings(cli: dict) -> dict:
    """config_run.py's settings with a studio graph's model, data and training goal on top."""
    from minigpt.studio import GraphError, settings_from_graph

    if cli.get("task", config_run.TASK) != "pretrain":
        raise ConfigError("--graph describes a model to pretrain; drop --task, or use --task pretrain.")
    path = Path(cli.pop("graph"))
    try:
        graph = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read the graph {path}: {err.strerror}; export it from the studio first.") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not JSON ({err}); export the graph from the studio again.") from None
    try:
        return {**settings_from_module(config_run), **settings_from_graph(graph), "TASK": "pretrain"}
    except GraphError as err:
        raise ConfigError(f"the graph in {path} cannot be built: {err}") from None


def main(argv: list[str] | None = None) -> int:
    cli = parse_args(argv)
    try:
        if cli.get("task", getattr(config_run, "TASK", None)) == "studio":
            run_studio(cli)
            return 0
        studio_flags = [f"--{name.replace('_', '-')}" for name in ("host", "port", "open_browser") if name in cli]
        if studio_flags:
            raise ConfigError(f"{', '.join(studio_flags).replace('--open-browser', '--no-browser')} "
                              "only apply to --task studio.")
        if "graph" in cli:
            run = resolve_run_config(graph_settings(cli), cli)
        elif "resume" in cli:
            config_path = Path(cli["resume"]) / "config.json"
            if not config_path.is_file():
                raise ConfigError(f"no run to resume in {cli['resume']} (it has no config.json); "
                                  "point --resume at a run directory such as runs/pretrain-quick.")
            run = resolve_resume_config(json.loads(config_path.read_text()), cli)
        else:
            run = resolve_run_config(settings_from_module(config_run), cli)
        if run.task == "generate":
            run_generate(run)
        elif run.task == "evaluate":
            run_evaluate(run)
        elif run.task == "export":
            run_export(run)
        elif run.task == "classify":
            run_classify(run)
        elif run.task == "sft":
            from minigpt.finetune import finetune
            finetune(run)
        elif run.task in ALIGN_TASKS:
            from minigpt.rlhf import align
            align(run)
        else:
            from minigpt.train import pretrain
            pretrain(run)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
