"""Decoding rules checked against hand-computed cases and a plain argmax loop."""

from types import SimpleNamespace

import pytest
import torch

from minigpt.config import ConfigError
from minigpt.generation import filter_logits, generate, generate_text
from minigpt.model import GPTModel


class FixedLogits(torch.nn.Module):
    """A stand-in model whose next-token scores are chosen by a function of (row, length)."""

    def __init__(self, score_fn, vocab_size=6, context_length=32):
        super().__init__()
        self.cfg = SimpleNamespace(context_length=context_length, vocab_size=vocab_size)
        self.score_fn = score_fn
        self.vocab_size = vocab_size

    def forward(self, idx):
        batch, num_tokens = idx.shape
        logits = torch.zeros(batch, num_tokens, self.vocab_size)
        for row in range(batch):
            logits[row, -1] = torch.as_tensor(self.score_fn(row, num_tokens), dtype=torch.float)
        return logits


def test_greedy_equals_a_plain_argmax_loop(tiny_cfg):
    model = GPTModel(tiny_cfg).eval()
    start = torch.randint(0, 97, (2, 5))
    out = generate(model, start, max_new_tokens=20)  # 25 tokens > context 16: cropping is exercised
    expected = start.clone()
    for _ in range(20):
        next_id = model(expected[:, -16:])[:, -1].argmax(-1, keepdim=True)
        expected = torch.cat([expected, next_id], dim=1)
    assert torch.equal(out, expected)
    assert torch.equal(generate(model, start, max_new_tokens=20), out)  # deterministic


def test_filter_logits_hand_worked():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    inf = float("-inf")
    assert filter_logits(logits, top_k=2)[0, 2:].tolist() == [inf, inf]
    # top-p 0.7: 0.5 alone is not enough, 0.5 + 0.3 is, so the nucleus is the first two tokens.
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))[0].tolist()
    assert kept == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.5))[0].tolist() == [True, False, False, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.96))[0].tolist() == [True, True, True, True]
    shuffled = logits[:, [2, 0, 3, 1]]  # the rule follows probabilities, not positions
    assert torch.isfinite(filter_logits(shuffled, top_p=0.7))[0].tolist() == [False, True, False, True]


# probabilities 0.4, 0.3, 0.15, ... for tokens 5, 4, 3, ...:
#  top-p 0.6: 0.4 < 0.6 so token 4 joins; 0.4 + 0.3 >= 0.6 so token 3 does not;
#  top-k 2 then top-p 0.3: renormalised 0.4 / 0.7 = 0.57 >= 0.3 already, so only token 5.
@pytest.mark.parametrize("top_k, top_p, allowed", [(3, None, {5, 4, 3}), (None, 0.6, {5, 4}), (2, 0.3, {5})])
def test_sampling_never_leaves_the_allowed_set(top_k, top_p, allowed):
    probs = torch.tensor([0.02, 0.03, 0.1, 0.15, 0.3, 0.4])
    model = FixedLogits(lambda row, n: torch.log(probs))
    generator = torch.Generator().manual_seed(0)
    out = generate(model, torch.zeros(64, 1, dtype=torch.long), max_new_tokens=5, temperature=1.0,
                   top_k=top_k, top_p=top_p, generator=generator)
    assert set(out[:, 1:].flatten().tolist()) == allowed


def test_sampling_is_reproducible_with_a_generator(tiny_cfg):
    model = GPTModel(tiny_cfg)
    start = torch.zeros(2, 1, dtype=torch.long)
    runs = [generate(model, start, 10, temperature=1.0, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert torch.equal(*runs)


def test_eos_stops_each_row_and_pads_finished_rows():
    eos = 0
    # Row 0 says eos when the sequence has 3 tokens, row 1 when it has 5; otherwise token 2 / 3.
    def scores(row, num_tokens):
        choice = eos if num_tokens == (3 if row == 0 else 5) else 2 + row
        return [10.0 if i == choice else 0.0 for i in range(6)]

    out = generate(FixedLogits(scores), torch.ones(2, 1, dtype=torch.long), max_new_tokens=10, eos_id=eos)
    assert out.tolist() == [[1, 2, 2, eos, eos, eos],  # finished at step 3, then padded
                            [1, 3, 3, 3, 3, eos]]      # all rows done: stop before 10 new tokens


def test_generate_text_stops_at_end_of_text_and_keeps_the_prompt():
    class Tok:
        eos_id = 0
        def encode(self, text, allowed_special=()): return [1] * len(text)
        def decode(self, ids): return "".join("x" if i == 1 else "y" for i in ids)

    model = FixedLogits(lambda row, n: [10.0 if i == (2 if n < 4 else 0) else 0.0 for i in range(6)])
    model.weight = torch.nn.Parameter(torch.zeros(1))  # generate_text finds the device from a parameter
    assert generate_text(model, Tok(), "xx", max_new_tokens=10) == "xxyy"


@pytest.mark.parametrize("kwargs, word", [(dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"),
                                          (dict(top_p=1.5), "top_p"), (dict(top_p=0.0), "top_p")])
def test_bad_sampling_settings_are_rejected(tiny_cfg, kwargs, word):
    with pytest.raises(ConfigError, match=word):
        generate(GPTModel(tiny_cfg), torch.zeros(1, 1, dtype=torch.long), 3, **kwargs)
