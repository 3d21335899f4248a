"""Text to token ids and back.

Two tokenizers for now: GPT-2's byte-level BPE through tiktoken (50,257 tokens, what the
pretrained GPT-2 weights expect) and a character-level tokenizer whose vocabulary is the
set of characters in the training text (tiny vocabulary, tiny output head).
Both expose the same small interface: `encode`, `decode`, `vocab_size`, `eos_id` and
`spec()`, a JSON-able description from which `tokenizer_from_spec` rebuilds them.
"""

from __future__ import annotations

from typing import Any

from minigpt.config import ConfigError, TOKENIZERS

END_OF_TEXT = "<|endoftext|>"


class GPT2Tokenizer:
    """GPT-2's tokenizer, loaded through tiktoken (downloads its two files once, then caches).

    Offline, point the environment variable TIKTOKEN_CACHE_DIR at a folder that holds them.
    """

    name = "gpt2"

    def __init__(self) -> None:
        import tiktoken

        try:
            self._encoding = tiktoken.get_encoding("gpt2")
        except Exception as err:  # tiktoken raises plain requests/OS errors when offline
            raise ConfigError(
                "could not load GPT-2's tokenizer files: tiktoken downloads them on first use "
                f"and that failed ({type(err).__name__}). Connect to the internet once, or set "
                "TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached gpt2 files, or use "
                "--tokenizer char.") from None
        self.vocab_size = self._encoding.n_vocab  # 50257
        self.eos_id = self._encoding.eot_token    # 50256, "<|endoftext|>"

    def encode(self, text: str, allowed_special: set[str] | str = frozenset({END_OF_TEXT})) -> list[int]:
        return self._encoding.encode(text, allowed_special=allowed_special)

    def decode(self, ids: list[int]) -> str:
        return self._encoding.decode(list(ids))

    def spec(self) -> dict[str, Any]:
        return {"name": self.name}


class CharTokenizer:
    """One token per character: the vocabulary is the sorted set of characters seen."""

    name = "char"

    def __init__(self, chars: str) -> None:
        if len(set(chars)) != len(chars) or not chars:
            raise ValueError("CharTokenizer needs a non-empty string of distinct characters.")
        self.chars = chars
        self.vocab_size = len(chars)
        self.eos_id = None  # no end-of-text token: the vocabulary is only the characters
        self._id_of = {ch: i for i, ch in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    def encode(self, text: str, allowed_special: Any = None) -> list[int]:
        try:
            return [self._id_of[ch] for ch in text]
        except KeyError as err:
            raise ConfigError(
                f"character {err.args[0]!r} does not occur in the text this character-level "
                "tokenizer was built from; remove it from the prompt, or train with "
                "--tokenizer gpt2, which can encode any text.") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "chars": self.chars}


def get_tokenizer(name: str, text: str | None = None) -> GPT2Tokenizer | CharTokenizer:
    """The tokenizer called `name`; the character-level one is built from `text`."""
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "char":
        if not text:
            raise ValueError("the character-level tokenizer is built from a text; pass text=...")
        return CharTokenizer.from_text(text)
    raise ConfigError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}.")


def tokenizer_from_spec(spec: dict[str, Any]) -> GPT2Tokenizer | CharTokenizer:
    """Rebuild a tokenizer from what `spec()` returned (stored in every checkpoint)."""
    if spec.get("name") == "char":
        return CharTokenizer(spec["chars"])
    return get_tokenizer(spec.get("name", "?"))
