"""The export pipeline behind `python main.py --task export`: a run's model and tokenizer as a
folder that Hugging Face `transformers` loads whole."""

from __future__ import annotations

from minigpt.config import RunConfig
from minigpt.model import hf_model_type
from minigpt.runs import export_run

HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def run_export(run: RunConfig) -> None:
    """Write a run's language model as a Hugging Face folder: the model as GPT-2, Llama or Qwen2
    (whichever computes its architecture), its tokenizer, and its chat template if it has one."""
    folder, model, saved = export_run(run.checkpoint, run.out)
    files = sorted(path.name for path in folder.iterdir())
    print(f"wrote {folder}/: {', '.join(files)}")
    print(f"  {saved['model_name']}, {model.num_parameters():,} parameters, as "
          f"{HF_CLASSES[hf_model_type(model.cfg)]}; its tokenizer as tokenizer.json")
    print("load it with:\n"
          "  from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline\n"
          f"  model = AutoModelForCausalLM.from_pretrained({str(folder)!r})\n"
          f"  tokenizer = AutoTokenizer.from_pretrained({str(folder)!r})\n"
          f"  pipeline('text-generation', model={str(folder)!r})('Every effort moves you', max_new_tokens=20)")
