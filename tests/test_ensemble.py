"""Ensembles: several models that share a tokenizer decode and are scored as one, through the
weighted mean of their log-probabilities; each checked against the members computed by hand."""

import json

import pytest
import torch

import main
from minigpt.config import GPTConfig
from minigpt.settings import resolve_run_config
from minigpt.evaluate import evaluate_multiple_choice, evaluate_text
from minigpt.generation import Ensemble, beam_search, generate, generate_text, stream_text
from minigpt.model import GPTModel
from minigpt.tokenizer import CharTokenizer
from minigpt.task_pretrain import pretrain

TEXT = "abcabcabdabcaabbccabcabcabdcbaabcabcabcbbacabcabca"


def tiny_model(seed, context_length=16, vocab_size=4):
    torch.manual_seed(seed)
    return GPTModel(GPTConfig(vocab_size=vocab_size, context_length=context_length, emb_dim=16, n_heads=2,
                              n_layers=1, drop_rate=0.0)).eval()


def log_probs(model, idx):
    with torch.no_grad():
        return torch.log_softmax(model(idx).float(), dim=-1)


PROMPT = torch.tensor([[0, 1, 2], [2, 2, 0]])


def test_an_ensemble_of_one_model_is_that_model():
    model = tiny_model(0)
    ensemble = Ensemble([model])
    assert torch.allclose(log_probs(ensemble, PROMPT), log_probs(model, PROMPT), atol=1e-6)
    assert torch.equal(generate(ensemble, PROMPT, 10), generate(model, PROMPT, 10))


def test_two_identical_models_are_one_and_weights_mix_log_probabilities_by_hand():
    a, b = tiny_model(0), tiny_model(1)
    assert torch.allclose(log_probs(Ensemble([a, a]), PROMPT), log_probs(a, PROMPT), atol=1e-6)
    expected = 0.3 * log_probs(a, PROMPT) + 0.7 * log_probs(b, PROMPT)
    with torch.no_grad():
        assert torch.allclose(Ensemble([a, b], [3, 7])(PROMPT), expected, atol=1e-6)  # weights are normalised


def test_cached_decoding_equals_uncached_and_the_context_is_the_smallest_members():
    ensemble = Ensemble([tiny_model(0, context_length=16), tiny_model(1, context_length=12)], [0.4, 0.6])
    assert ensemble.cfg.context_length == 12
    cached = generate(ensemble, PROMPT, 9, use_cache=True)
    assert torch.equal(cached, generate(ensemble, PROMPT, 9, use_cache=False))
    assert torch.equal(beam_search(ensemble, PROMPT, 6, num_beams=3, use_cache=True),
                       beam_search(ensemble, PROMPT, 6, num_beams=3, use_cache=False))


def test_streamed_text_is_the_generated_text():
    tokenizer = CharTokenizer("abcd")
    ensemble = Ensemble([tiny_model(0), tiny_model(1)])
    full = generate_text(ensemble, tokenizer, "abca", max_new_tokens=8)
    assert "".join(stream_text(ensemble, tokenizer, "abca", max_new_tokens=8)) == full[len("abca"):]


def test_members_must_share_a_vocabulary_and_weights_must_be_positive_one_per_model():
    with pytest.raises(ValueError, match="vocabularies differ"):
        Ensemble([tiny_model(0, vocab_size=4), tiny_model(1, vocab_size=5)])
    with pytest.raises(ValueError, match="one per model"):
        Ensemble([tiny_model(0), tiny_model(1)], [1.0])
    with pytest.raises(ValueError, match="positive"):
        Ensemble([tiny_model(0), tiny_model(1)], [1.0, 0.0])


def test_evaluate_text_on_an_ensemble_equals_the_mixture_computed_by_hand():
    tokenizer = CharTokenizer("abcd")
    a, b = tiny_model(0), tiny_model(1)
    single = evaluate_text(a, tokenizer, TEXT, max_length=8)
    assert evaluate_text(Ensemble([a, a]), tokenizer, TEXT, max_length=8)["loss"] == pytest.approx(single["loss"], rel=1e-5)

    result = evaluate_text(Ensemble([a, b], [0.3, 0.7]), tokenizer, TEXT, max_length=8, batch_size=2)
    ids = torch.tensor(tokenizer.encode(TEXT))
    windows = (len(ids) - 1) // 8
    inputs = torch.stack([ids[i * 8:(i + 1) * 8] for i in range(windows)])
    targets = torch.stack([ids[i * 8 + 1:(i + 1) * 8 + 1] for i in range(windows)])
    probs = torch.softmax(0.3 * log_probs(a, inputs) + 0.7 * log_probs(b, inputs), dim=-1)  # (B, T, V)
    loss = -probs.gather(-1, targets.unsqueeze(-1)).log().mean().item()
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["next_token_accuracy"] == pytest.approx((probs.argmax(-1) == targets).float().mean().item())


def test_multiple_choice_on_an_ensemble_of_identical_models_is_the_models():
    tokenizer = CharTokenizer("abcd ")
    model = tiny_model(2, vocab_size=5)
    items = [{"context": "abc", "endings": ["abc", "dd"], "label": 0}, {"context": "dab", "endings": ["c", "a"], "label": 1}]
    assert (evaluate_multiple_choice(Ensemble([model, model]), tokenizer, items, progress=False)
            == evaluate_multiple_choice(model, tokenizer, items, progress=False))


# ---------------------------------------------------------------------------------------
# The command line: --checkpoint repeated
# ---------------------------------------------------------------------------------------

SETTINGS = dict(
    QUICK_MODE=False, CUSTOM_MODE=True, MODEL="gpt-nano", TOKENIZER="char", LOG_EVERY=1000,
    custom_params=dict(num_epochs=1, batch_size=4, learning_rate=3e-3, eval_freq=1000, eval_iter=1,
                       max_length=16, stride=16, start_context="The ", warmup_steps=1,
                       model_overrides=dict(emb_dim=16, n_heads=2, n_layers=1, context_length=16, drop_rate=0.0)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs on the same text (the same character tokenizer), and one on a text with other characters."""
    folder = tmp_path_factory.mktemp("ensemble")
    texts = {"a": "The cat sat on the mat. " * 20, "b": "The cat sat on the mat. " * 20, "other": "The dog ran far. " * 30}
    paths = {}
    for seed, (name, text) in enumerate(texts.items()):
        data = folder / f"{name}.txt"
        data.write_text(text, encoding="utf-8")
        pretrain(resolve_run_config({**SETTINGS, "SEED": seed}, {"out": str(folder / name), "data": str(data),
                                                                 "max_steps": 2}))
        paths[name] = str(folder / name)
    return paths, str(folder / "a.txt")


def test_evaluate_reports_each_member_and_the_ensemble(runs, tmp_path, capsys):
    paths, text = runs
    out = tmp_path / "evaluation"
    code = main.main(["--task", "evaluate", "--checkpoint", paths["a"], "--checkpoint", paths["b"],
                      "--ensemble-weights", "1", "3", "--data", text, "--out", str(out)])
    assert code == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert [member["model"] for member in report["members"]] == [paths["a"], paths["b"]]
    assert report["weights"] == pytest.approx([0.25, 0.75])
    for entry in [report, *report["members"]]:
        assert entry["text"]["perplexity"] > 1 and entry["text"]["tokens"] == report["text"]["tokens"]
    assert report["members"][0]["text"]["loss"] != report["text"]["loss"]
    table = capsys.readouterr().out
    assert f"| measure | ensemble | {paths['a']} | {paths['b']} |" in table
    assert "| measure | ensemble |" in (out / "evaluation.md").read_text()


def test_generate_from_two_checkpoints_prints_text(runs, capsys):
    paths, _ = runs
    code = main.main(["--task", "generate", "--checkpoint", paths["a"], "--checkpoint", paths["b"],
                      "--prompt", "The ", "--max-new-tokens", "6", "--temperature", "0"])
    captured = capsys.readouterr()
    assert code == 0 and captured.out.startswith("The ") and len(captured.out) > len("The \n")
    assert "ensemble of 2" in captured.err


def test_members_with_different_tokenizers_are_refused(runs, capsys):
    paths, text = runs
    code = main.main(["--task", "evaluate", "--checkpoint", paths["a"], "--checkpoint", paths["other"], "--data", text])
    assert code == 2
    assert f"{paths['a']} and {paths['other']} use different tokenizers" in capsys.readouterr().err


def test_several_checkpoints_only_for_generate_and_evaluate(capsys):
    assert main.main(["--task", "sft", "--checkpoint", "runs/a", "--checkpoint", "runs/b"]) == 2
    assert "--checkpoint once for --task sft; several only for generate and evaluate" in capsys.readouterr().err
    assert main.main(["--task", "generate", "--checkpoint", "runs/a", "--checkpoint", "runs/b",
                      "--ensemble-weights", "1"]) == 2
    assert "--ensemble-weights takes one number per --checkpoint: got 1 for 2" in capsys.readouterr().err
