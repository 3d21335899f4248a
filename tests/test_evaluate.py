"""Evaluation against hand-worked values: BLEU on textbook examples, perplexity and next-token
accuracy computed another way, and multiple-choice scoring where the answer is forced."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from minigpt.config import ConfigError, GPTConfig
from minigpt.evaluate import (bleu, ending_logprobs, evaluate_multiple_choice, evaluate_text,
                              load_multiple_choice)
from minigpt.model import GPTModel
from minigpt.tokenizer import CharTokenizer


def test_bleu_clips_repeated_words_as_in_the_paper():
    # Papineni et al.'s example: seven "the"s earn two, the most any one reference has.
    result = bleu("the the the the the the the", ["The cat is on the mat.", "There is a cat on the mat."], max_n=1)
    assert result["precisions"] == [pytest.approx(2 / 7)]


def test_bleu_by_hand_with_and_without_smoothing():
    # the cat sat on the mat | the cat is on the mat: p1 = 5/6, p2 = 3/5, p3 = 1/4, p4 = 0/3, same length
    plain = bleu("the cat sat on the mat", "the cat is on the mat", smooth=False)
    assert plain["precisions"] == pytest.approx([5 / 6, 3 / 5, 1 / 4, 0.0]) and plain["bleu"] == 0.0
    smoothed = bleu("the cat sat on the mat", "the cat is on the mat")
    assert smoothed["precisions"] == pytest.approx([5 / 6, 4 / 6, 2 / 5, 1 / 4])
    assert smoothed["bleu"] == pytest.approx((5 / 6 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25)  # 0.4855
    assert bleu("the cat is on the mat", "the cat is on the mat")["bleu"] == pytest.approx(1.0)
    short = bleu("the cat", "the cat is on the mat", max_n=1)  # brevity penalty e^(1 - 6/2)
    assert short["brevity_penalty"] == pytest.approx(math.exp(-2)) and short["bleu"] == pytest.approx(math.exp(-2))


def test_perplexity_and_next_token_accuracy_equal_a_direct_computation():
    torch.manual_seed(0)
    text = "abcabcabcabcabcabcabcabcabcabcabcab"
    tokenizer = CharTokenizer.from_text(text)
    model = GPTModel(GPTConfig(vocab_size=3, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0))
    result = evaluate_text(model, tokenizer, text, max_length=8, batch_size=3)
    ids = torch.tensor(tokenizer.encode(text))
    windows = (len(ids) - 1) // 8
    inputs = torch.stack([ids[i * 8:(i + 1) * 8] for i in range(windows)])
    targets = torch.stack([ids[i * 8 + 1:(i + 1) * 8 + 1] for i in range(windows)])
    with torch.no_grad():
        logits = model(inputs)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert result["next_token_accuracy"] == pytest.approx((logits.argmax(-1) == targets).float().mean().item())
    assert result["tokens"] == windows * 8


class FixedModel(torch.nn.Module):
    """A "model" whose next-token distribution is set by hand: after a token in `preferred`, the
    token it names gets probability `p` and the others share the rest; after any other token,
    every token is equally likely."""

    def __init__(self, vocab_size: int, preferred: dict[int, int], p: float = 0.9) -> None:
        super().__init__()
        self.cfg = GPTConfig(vocab_size=vocab_size, context_length=32, emb_dim=8, n_heads=1, n_layers=1)
        table = torch.full((vocab_size, vocab_size), 1 / vocab_size)
        for token, following in preferred.items():
            table[token] = (1 - p) / (vocab_size - 1)
            table[token, following] = p
        self.logprobs = table.log()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.logprobs[idx]  # (B, T, V): the distribution after each token


def test_multiple_choice_picks_the_ending_the_model_prefers_and_normalises_by_length():
    tokenizer = CharTokenizer(" abcxyz")  # ids: ' ' 0, a 1, b 2, c 3, x 4, y 5, z 6
    # After "a" comes "b", after "b" comes "c", after "c" comes " " and after " " comes "a".
    model = FixedModel(7, {1: 2, 2: 3, 3: 0, 0: 1})
    item = {"context": "abc", "endings": ["xyz", "abc", "zz"], "label": 1}
    scores = ending_logprobs(model, tokenizer, item["context"], item["endings"])
    assert [n for _, n in scores] == [4, 4, 3]  # " xyz", " abc", " zz"
    p_other = math.log(0.1 / 6)
    assert scores[1][0] == pytest.approx(4 * math.log(0.9), rel=1e-5)  # c->' ', ' '->a, a->b, b->c: all preferred
    assert scores[0][0] == pytest.approx(math.log(0.9) + p_other + 2 * math.log(1 / 7), rel=1e-5)  # x, y: uniform
    result = evaluate_multiple_choice(model, tokenizer, [item, {**item, "label": 0}], progress=False)
    assert result == {"acc": 0.5, "acc_norm": 0.5, "items": 2}
    # Length normalisation: a short ending with a poor mean loses on the total but not always on the mean.
    short = {"context": "abc", "endings": [" a", "abcabc"], "label": 1}  # "  a" is 3 tokens, " abcabc" 7
    totals = ending_logprobs(model, tokenizer, short["context"], short["endings"])
    assert totals[0][0] > totals[1][0] and totals[0][0] / totals[0][1] < totals[1][0] / totals[1][1]
    assert evaluate_multiple_choice(model, tokenizer, [short], progress=False) == {"acc": 0.0, "acc_norm": 1.0,
                                                                                  "items": 1}


def test_multiple_choice_files_are_read_and_checked(tmp_path):
    good = tmp_path / "items.jsonl"
    good.write_text(json.dumps({"ctx": "A man", "endings": ["runs.", "sings."], "label": "1"}) + "\n\n"
                    + json.dumps({"context": "B", "endings": ["x", "y", "z"], "label": 0}) + "\n")
    assert load_multiple_choice(str(good)) == [{"context": "A man", "endings": ["runs.", "sings."], "label": 1},
                                               {"context": "B", "endings": ["x", "y", "z"], "label": 0}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "A", "endings": ["x", "y"], "label": 2}) + "\n")
    with pytest.raises(ConfigError, match="line 1: label 2 does not index"):
        load_multiple_choice(str(bad))
    bad.write_text('{"context": "A"}\n')
    with pytest.raises(ConfigError, match="line 1: expected a JSON object with context"):
        load_multiple_choice(str(bad))
