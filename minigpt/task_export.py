"""The export pipeline behind `python main.py --task export`: a run's model as a folder that
Hugging Face `transformers` loads."""

from __future__ import annotations

from minigpt.config import ConfigError, RunConfig
from minigpt.model import save_hf_gpt2
from minigpt.runs import load_model


def run_export(run: RunConfig) -> None:
    """Write a run's language model as a Hugging Face GPT-2 folder (config.json, model.safetensors)."""
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
              f"(minigpt.runs.load_model({run.checkpoint!r})) before giving ids to transformers.")
