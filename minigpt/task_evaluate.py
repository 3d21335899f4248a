"""The evaluate pipeline behind `python main.py --task evaluate`: a model's loss, perplexity, bits
per byte and next-token accuracy on a text, and multiple-choice accuracy (HellaSwag style),
written to evaluation.json and evaluation.md."""

from __future__ import annotations

import sys
from pathlib import Path

from minigpt.config import RunConfig
from minigpt.data import corpus_path, data_format, hf_evaluation_text, named_split_texts, read_corpus, token_id_chunks
from minigpt.evaluate import evaluate_ids, evaluate_multiple_choice, load_multiple_choice, report_markdown
from minigpt.generation import Ensemble
from minigpt.runs import load_for_generation, write_atomically, write_json


def run_evaluate(run: RunConfig) -> None:
    """Loss, perplexity, bits per byte and next-token accuracy on a text, and multiple-choice accuracy
    (HellaSwag style) if asked; the report goes to evaluation.json and evaluation.md."""
    model, tokenizer, source, _ = load_for_generation(run)  # the models generate reads, ensembles included
    device = next(model.parameters()).device
    where, ids = evaluation_ids(run, tokenizer)
    print(f"minigpt | evaluate | {source} | text {where}", file=sys.stderr)
    items = load_multiple_choice(run.choices)[:run.limit] if run.choices else None
    max_length = min(model.cfg.context_length, 1024)  # an ensemble's members all read the same windows

    def scores(scored) -> dict:
        result = {"text": {"file": where, **evaluate_ids(scored, tokenizer, ids, max_length, batch_size=4,
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
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "evaluation.json", out / "evaluation.md"]  # every number; the table
    write_json(paths[0], report)
    write_atomically(paths[1], lambda tmp: tmp.write_text(report_markdown(report), encoding="utf-8"))
    print(report_markdown(report))
    print(f"wrote {paths[0]} and {paths[1]}")


def evaluation_ids(run: RunConfig, tokenizer) -> tuple[str, list[int]]:
    """The token ids to score, and where they come from: a corpus with splits of its own gives its test
    split (its validation split if it has no test split); any other data, all of its text (or ids)."""
    kind = data_format(run.data, run.data_format)
    if kind == "tokens":
        path = corpus_path(run.data)
        chunks = token_id_chunks(path, tokenizer.vocab_size, tokenizer.eos_id, train_ratio=1.0)
        return f"{path} (token ids)", [i for _, ids, _ in chunks for i in ids]
    if kind == "hf":
        split, text = hf_evaluation_text(run.data, run.text_field)
        return f"{run.data}, its {split} split", tokenizer.encode(text, allowed_special="all")
    splits = named_split_texts(run.data)
    if splits is not None:
        split = "test" if "test" in splits.texts else "val"
        name = {"test": "test", "val": "validation"}[split]
        return f"{splits.name}, its {name} split", tokenizer.encode(splits.text(split), allowed_special="all")
    path = corpus_path(run.data)
    text = read_corpus(path, run.text_field if kind == "json" else None)
    return str(path), tokenizer.encode(text, allowed_special="all")
