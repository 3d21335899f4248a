"""The tokenizers against independent references: tiktoken itself, and hand-checked cases."""

import pytest
import tiktoken

from minigpt.config import ConfigError
from minigpt.tokenizer import CharTokenizer, get_tokenizer, tokenizer_from_spec


def test_gpt2_adapter_matches_tiktoken(verdict_text):
    reference = tiktoken.get_encoding("gpt2")
    tokenizer = get_tokenizer("gpt2")
    sample = verdict_text[:3000] + " Hello<|endoftext|>world  ünïcödé 你好 🙂"
    ids = tokenizer.encode(sample)
    assert ids == reference.encode(sample, allowed_special={"<|endoftext|>"})
    assert tokenizer.decode(ids) == sample
    assert (tokenizer.vocab_size, tokenizer.eos_id) == (50257, 50256)
    assert tokenizer.encode("Hello, world") == [15496, 11, 995]  # published GPT-2 ids


def test_char_tokenizer_round_trips_and_is_sorted():
    tokenizer = CharTokenizer.from_text("hello world")
    assert tokenizer.chars == " dehlorw"
    assert tokenizer.encode("hello") == [3, 2, 4, 4, 5]
    assert tokenizer.decode(tokenizer.encode("world hello")) == "world hello"
    assert tokenizer.vocab_size == 8


def test_char_tokenizer_names_an_unknown_character():
    tokenizer = CharTokenizer.from_text("abc")
    with pytest.raises(ConfigError, match="'z'"):
        tokenizer.encode("abz")


def test_specs_rebuild_the_same_tokenizer():
    char = CharTokenizer.from_text("to be or not to be 你好")
    assert tokenizer_from_spec(char.spec()).encode("not 你") == char.encode("not 你")
    assert tokenizer_from_spec({"name": "gpt2"}).encode("to be") == get_tokenizer("gpt2").encode("to be")
