"""The generate pipeline behind `python main.py --task generate`: a run's model (or an ensemble of
runs, or OpenAI's GPT-2) continues a prompt, or every line typed, streamed as it is written."""

from __future__ import annotations

import sys
from functools import partial

import torch

from minigpt.config import GENERATION_DEFAULTS, ConfigError, RunConfig
from minigpt.data import format_prompt
from minigpt.generation import generate_text, stream_text, token_choices
from minigpt.model import GPTModel
from minigpt.runs import load_for_generation, typed_lines


class DepthRecorder(torch.nn.Module):
    """A model with adaptive depth (chapter 11) that keeps, at each decoding step, the blocks its
    newest token ran; it decodes exactly as the model does."""

    def __init__(self, model: GPTModel) -> None:
        super().__init__()
        self.model = model
        self.depths: list[torch.Tensor] = []

    @property
    def cfg(self):
        return self.model.cfg

    def new_kv_cache(self, batch_size: int, max_tokens: int | None = None):
        return self.model.new_kv_cache(batch_size, max_tokens)

    def forward(self, idx: torch.Tensor, cache=None, last_only: bool = False) -> torch.Tensor:
        output = self.model(idx, cache, details=True, last_only=last_only)
        self.depths.append(output.depth[:, -1])
        return output.logits


def run_generate(run: RunConfig) -> None:
    """Continue the prompt (`--prompt`), or every line typed, with a run's model or GPT-2."""
    model, tokenizer, source, style = load_for_generation(run)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(run.seed)
    options = dict(run.generation)
    shown = {k: v for k, v in options.items() if v != GENERATION_DEFAULTS[k] or k in ("max_new_tokens", "temperature")}
    print(f"minigpt | generate | {source} | " + ", ".join(f"{k}={v!r}" for k, v in shown.items()), file=sys.stderr)

    def stream_answer(prompt: str) -> None:  # reads `model` when called: the recorder, if one wraps it
        if style is not None:  # an instruction-tuned model answers prompts in its template
            prompt = format_prompt({"instruction": prompt}, style)
        if options["num_beams"] > 1:  # beam search knows its answer only at the end
            print(generate_text(model, tokenizer, prompt, generator=generator, **options)[len(prompt):], flush=True)
            return
        options_for_stream = {k: v for k, v in options.items() if k not in ("num_beams", "length_penalty")}
        for piece in stream_text(model, tokenizer, prompt, generator=generator, **options_for_stream):
            print(piece, end="", flush=True)
        print(flush=True)

    answer = stream_answer if not run.show_probs else (  # the next-token view: each token with its candidates
        partial(_show_choices, model, tokenizer, style, options, run.show_probs, generator))
    if run.prompt is not None:
        recorder = None
        if isinstance(model, GPTModel) and model.cfg.halting:  # adaptive depth: the blocks each new token ran
            model = recorder = DepthRecorder(model)
        print(run.prompt, end="\n" if style else "", flush=True)
        answer(run.prompt)
        if recorder is not None and recorder.depths:
            print(f"mean depth per generated token: {torch.cat(recorder.depths).float().mean():.2f} of "
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
        except ConfigError as err:  # e.g. a character the model's vocabulary lacks: say why, keep listening
            print(f"error: {err}", file=sys.stderr, flush=True)


def _show_choices(model, tokenizer, style: str | None, options: dict, k: int, generator, prompt: str) -> None:
    """One line per generated token: its text and probability, then the model's k likeliest
    candidates at that step (the softmax of its scores, before temperature and filtering); then
    the whole continuation."""
    if style is not None:
        prompt = format_prompt({"instruction": prompt}, style)
    decoding = {key: options[key] for key in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty",
                                              "use_cache")}
    print(f"\n{'token':>16}  {'p':>6}   the model's {k} most likely next tokens", flush=True)
    tokens = []
    for choice in token_choices(model, tokenizer, prompt, k, generator=generator, **decoding):
        tokens.append(choice.token)
        others = "  ".join(f"{text!r} {100 * p:.1f}%" for _, text, p in choice.candidates)
        print(f"{choice.text!r:>16}  {100 * choice.probability:5.1f}%   {others}", flush=True)
    print(f"\n{tokenizer.decode(tokens)}", flush=True)
