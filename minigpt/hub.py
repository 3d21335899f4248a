"""A Hugging Face folder, both ways (chapter 6): a minigpt model and its tokenizer written as the
files `transformers` loads whole, and a Hugging Face model (GPT-2, Llama, Qwen2 ...) with its
tokenizer read back as a `GPTModel` and a minigpt tokenizer.

    config.json, model.safetensors   the architecture and the weights (model.py: GPT-2's or Llama's layout)
    generation_config.json           the end-of-text id generation stops at
    tokenizer.json                   the whole tokenizer, as the `tokenizers` library runs it
    vocab.json, merges.txt           a byte-level BPE's vocabulary and merges, in GPT-2's format
    tokenizer_config.json            the tokenizer's class, its special tokens and chat template
    special_tokens_map.json          which special token ends a text

A tokenizer maps onto tokenizer.json exactly or not at all: an export whose tokenizer would
encode differently is refused before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import regex

from minigpt.config import PRETRAINED_MODELS, ConfigError
from minigpt.data import ALPACA_PREAMBLE, CHAT_TOKENS
from minigpt.model import GPTModel, download_hf_model, hf_config, save_hf_model
from minigpt.tokenizer import (GPT2_SPLIT_PATTERN, SENTENCEPIECE_SPACE, BPETokenizer, CharTokenizer,
                               SentencePieceBPE, bytes_to_unicode, get_tokenizer, tokenizer_from_spec)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "generation_config.json")
EXPORT_FILES = {"config.json", "model.safetensors", *TOKENIZER_FILES}  # what an export writes
# One character per piece: how tokenizer.json says "every character is a token" (`.` skips newlines).
EVERY_CHARACTER = r"[\s\S]"


# ---------------------------------------------------------------------------------------
# Writing: a minigpt tokenizer as tokenizer.json and its companions
# ---------------------------------------------------------------------------------------

def exportable(tokenizer) -> BPETokenizer | CharTokenizer | SentencePieceBPE:
    """The tokenizer in a form that maps onto tokenizer.json: tiktoken's GPT-2 becomes minigpt's own
    BPE with GPT-2's files (the same ids); a vocabulary read with pre-tokenized data is refused."""
    if isinstance(tokenizer, (BPETokenizer, CharTokenizer, SentencePieceBPE)):
        return tokenizer
    if tokenizer.name == "gpt2":
        return tokenizer_from_spec({**tokenizer.spec(), "name": "bpe"})
    raise ConfigError(f"the {tokenizer.name} tokenizer (a vocabulary read beside pre-tokenized data, encoding "
                      "prompts by longest match) has no exact form in tokenizer.json, so the export would encode "
                      "text differently from the run. Put the merges.txt of the tool that made the ids beside "
                      "its vocab.json and train again: minigpt then rebuilds that tool's BPE exactly.")


def _added_tokens(special_tokens: dict[str, int]) -> list[dict[str, Any]]:
    """tokenizer.json's special tokens: matched whole, before anything else, never stripped."""
    return [{"id": token_id, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True} for token, token_id in sorted(special_tokens.items(),
                                                                                   key=lambda item: item[1])]


def bpe_vocabulary(tokenizer: BPETokenizer) -> dict[str, int]:
    """Every token as GPT-2's files write it (each byte one printable character), specials as they are.

    Hugging Face's BPE keys its vocabulary by that string, so two ids with the same bytes (a trainer
    can make "ab"+"c" and "a"+"bc" both) cannot both be there: such a tokenizer is refused."""
    char_of = bytes_to_unicode()
    vocabulary: dict[str, int] = {}
    for token_id, token_bytes in sorted(tokenizer.vocab.items()):
        is_special = token_id in tokenizer.special_tokens.values()
        text = token_bytes.decode("utf-8") if is_special else "".join(char_of[b] for b in token_bytes)
        if text in vocabulary:
            raise ConfigError(f"tokens {vocabulary[text]} and {token_id} stand for the same bytes {token_bytes!r}; "
                              "tokenizer.json keys tokens by their text, so it cannot hold both and would encode "
                              "differently. Train the tokenizer again (another vocab_size) before exporting.")
        vocabulary[text] = token_id
    return vocabulary


def bpe_tokenizer_json(tokenizer: BPETokenizer) -> dict[str, Any]:
    """A byte-level BPE as tokenizer.json: normalize, cut by each pattern, bytes to characters, merges."""
    vocabulary = bpe_vocabulary(tokenizer)
    text_of = {token_id: text for text, token_id in vocabulary.items()}
    patterns = [tokenizer.pattern] if isinstance(tokenizer.pattern, str) else list(tokenizer.pattern)
    splits = [{"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": False} for p in patterns]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": _added_tokens(tokenizer.special_tokens),
        "normalizer": {"type": tokenizer.normalization} if tokenizer.normalization else None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [*splits, byte_level]},
        "post_processor": None,
        "decoder": {**byte_level, "trim_offsets": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": tokenizer.ignore_merges, "vocab": vocabulary,
                  # In the order they were learned: a merge's place is its priority.
                  "merges": [f"{text_of[left]} {text_of[right]}" for left, right in tokenizer.merges]},
    }


def char_tokenizer_json(tokenizer: CharTokenizer) -> dict[str, Any]:
    """A character tokenizer as tokenizer.json: every character its own piece, looked up in a
    word-level vocabulary, the tokens joined back with nothing between them."""
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": EVERY_CHARACTER}, "behavior": "Isolated",
                          "invert": False},
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        # A character the text never had raises in minigpt; here it meets a missing <unk> and raises too.
        "model": {"type": "WordLevel", "vocab": {ch: i for i, ch in enumerate(tokenizer.chars)}, "unk_token": "<unk>"},
    }


def sentencepiece_tokenizer_json(tokenizer: SentencePieceBPE) -> dict[str, Any]:
    """SentencePiece's BPE as tokenizer.json: "▁" for spaces and before the text, merges over the
    whole text, bytes for what the vocabulary lacks; decoding undoes each step."""
    space = {"type": "Replace", "pattern": {"String": " "}, "content": SENTENCEPIECE_SPACE}
    if tokenizer.prepend == "always":  # before every stretch of text: a normalizer, run after the special tokens
        normalizer = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SENTENCEPIECE_SPACE}, space]}
        pre_tokenizer = None
    else:  # only at the start of the text
        normalizer = None
        pre_tokenizer = {"type": "Metaspace", "replacement": SENTENCEPIECE_SPACE, "prepend_scheme": "first",
                         "split": False}
    unknown = tokenizer.tokens[tokenizer.unk_id] if tokenizer.unk_id is not None else None
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": _added_tokens(tokenizer.special_tokens),
        "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SENTENCEPIECE_SPACE}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": unknown, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {token: i for i, token in enumerate(tokenizer.tokens)},
                  "merges": [list(pair) for pair in tokenizer.merges]},
    }


def tokenizer_json(tokenizer: BPETokenizer | CharTokenizer | SentencePieceBPE) -> dict[str, Any]:
    """tokenizer.json's content for each kind of tokenizer an export can carry."""
    if isinstance(tokenizer, BPETokenizer):
        return bpe_tokenizer_json(tokenizer)
    if isinstance(tokenizer, SentencePieceBPE):
        return sentencepiece_tokenizer_json(tokenizer)
    return char_tokenizer_json(tokenizer)


def chat_template(style: str | None) -> str | None:
    """A Jinja chat template that writes a conversation as the run's prompt style did in training
    (`minigpt.data.format_prompt`), so `apply_chat_template` prompts the export the same way."""
    if style == "chat":
        user, assistant = CHAT_TOKENS
        return ("{% for message in messages %}"
                f"{{% if message['role'] == 'user' %}}{{{{ '{user}\\n' + message['content'] + '\\n' }}}}"
                f"{{% elif message['role'] == 'assistant' %}}{{{{ '{assistant}\\n' + message['content'] + eos_token }}}}"
                "{% endif %}{% endfor %}"
                f"{{% if add_generation_prompt %}}{{{{ '{assistant}\\n' }}}}{{% endif %}}")
    if style == "alpaca":
        return ("{% for message in messages %}"
                f"{{% if message['role'] == 'user' %}}{{{{ '{ALPACA_PREAMBLE}\\n\\n### Instruction:\\n' + "
                "message['content'] + '\\n\\n### Response:\\n' }}"
                "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + '\\n\\n' }}"
                "{% endif %}{% endfor %}")
    return None


def tokenizer_files(tokenizer, context_length: int, prompt_style: str | None = None) -> dict[str, str]:
    """Every tokenizer file of an export, by name: tokenizer.json and its companions."""
    tokenizer = exportable(tokenizer)
    is_bpe = isinstance(tokenizer, BPETokenizer)
    data = tokenizer_json(tokenizer)
    special = {token_id: token for token, token_id in getattr(tokenizer, "special_tokens", {}).items()}
    eos = special.get(tokenizer.eos_id)
    names = {"eos_token": eos, "bos_token": eos, "unk_token": eos} if eos else {}
    if isinstance(tokenizer, SentencePieceBPE):  # Llama's names for them
        names.update({key: special[i] for key, i in (("bos_token", tokenizer.special_tokens.get("<s>")),
                                                     ("unk_token", tokenizer.unk_id)) if i in special})
    config = {"tokenizer_class": "GPT2Tokenizer" if is_bpe and tokenizer.pattern == GPT2_SPLIT_PATTERN
              and not tokenizer.normalization else "PreTrainedTokenizerFast",
              "model_max_length": context_length, "clean_up_tokenization_spaces": False,
              "add_bos_token": False, "add_prefix_space": False, **names,
              "extra_special_tokens": [t for t in special.values() if t not in names.values()],
              # the same special tokens for tools that read them here rather than from tokenizer.json
              "added_tokens_decoder": {str(added["id"]): {key: value for key, value in added.items() if key != "id"}
                                       for added in data["added_tokens"]}}
    template = chat_template(prompt_style)
    if template:
        config["chat_template"] = template
    files = {"tokenizer.json": json.dumps(data, ensure_ascii=False, indent=1),
             "tokenizer_config.json": json.dumps(config, ensure_ascii=False, indent=2),
             "special_tokens_map.json": json.dumps(names, indent=2)}
    if is_bpe:  # GPT-2's two files, for tools that read a byte-level BPE from them
        files["vocab.json"] = json.dumps(data["model"]["vocab"], ensure_ascii=False)
        files["merges.txt"] = "#version: 0.2\n" + "\n".join(data["model"]["merges"]) + "\n"
    return files


# ---------------------------------------------------------------------------------------
# A whole export
# ---------------------------------------------------------------------------------------

def save_pretrained(model: GPTModel, tokenizer, folder: str | Path, prompt_style: str | None = None) -> Path:
    """Write `model` and `tokenizer` as one folder that `transformers` loads whole
    (AutoModelForCausalLM, AutoTokenizer, pipeline("text-generation")).

    Everything is checked first (the architecture has a Hugging Face class, the tokenizer an exact
    tokenizer.json), then written beside `folder` and moved into place in one step: an export that
    fails leaves no half-written folder, and one that succeeds replaces the last.
    """
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                          f"{model.cfg.vocab_size} rows: they do not belong together.")
    eos_id = getattr(tokenizer, "eos_id", None)
    hf_config(model.cfg, eos_id)  # refuses an architecture no Hugging Face class computes
    files = tokenizer_files(tokenizer, model.cfg.context_length, prompt_style)
    files["generation_config.json"] = json.dumps(
        {"bos_token_id": eos_id, "eos_token_id": eos_id} if eos_id is not None else {}, indent=2)
    folder = Path(folder)
    _check_replaceable(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_hf_model(model, staging, eos_id)
        for name, text in files.items():
            (staging / name).write_text(text + ("" if text.endswith("\n") else "\n"), encoding="utf-8")
        check_tokenizer_files(staging, tokenizer)
        _replace_folder(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _check_replaceable(folder: Path) -> None:
    """An export replaces an earlier export, never a folder that holds anything else (a run directory)."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file; give --out a folder for the export.")
    others = sorted(p.name for p in folder.iterdir() if p.name not in EXPORT_FILES) if folder.is_dir() else []
    if others:
        raise ConfigError(f"{folder} holds other files than an export ({', '.join(others[:4])}); an export replaces "
                          "the whole folder, so give a new or empty one (or an earlier export).")


def check_tokenizer_files(folder: Path, tokenizer) -> None:
    """Refuse an export whose tokenizer.json is empty or encodes a probe otherwise than `tokenizer`
    (through the `tokenizers` library where it is installed)."""
    vocabulary = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    if len(vocabulary) != tokenizer.vocab_size:
        raise ConfigError(f"the exported tokenizer has {len(vocabulary)} tokens, the run's {tokenizer.vocab_size}; "
                          "nothing was written.")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return
    probe = "".join(getattr(tokenizer, "chars", "")) or "Every effort moves you 12,345 times: naïve café\n  end"
    theirs = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(probe, add_special_tokens=False).ids
    if theirs != tokenizer.encode(probe, allowed_special="all"):
        raise ConfigError("the exported tokenizer.json encodes a test sentence differently from the run's "
                          "tokenizer; nothing was written. Please report this with the run's config.json.")


def _replace_folder(new: Path, folder: Path) -> None:
    """Put `new` where `folder` is: the old export (if any) moves aside, the new one takes its name."""
    old = None
    if folder.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
        os.replace(folder, old / folder.name)
    os.replace(new, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Reading: a Hugging Face folder as a GPTModel and a minigpt tokenizer
# ---------------------------------------------------------------------------------------

def _split_patterns(step: dict[str, Any] | None) -> list[str]:
    """The patterns a tokenizer.json pre-tokenizer cuts text by, in order; refuses the kinds minigpt's
    BPE does not run (a prefix space, Metaspace's "▁" words, inverted or removing splits)."""
    kind = (step or {}).get("type")
    if kind == "Sequence":
        return [p for inner in step["pretokenizers"] for p in _split_patterns(inner)]
    if kind == "ByteLevel" and not step.get("add_prefix_space", False):
        return [GPT2_SPLIT_PATTERN] if step.get("use_regex", True) else []
    if kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert", False):
        pattern = step["pattern"]
        return [pattern["Regex"] if "Regex" in pattern else regex.escape(pattern["String"])]
    if kind == "Digits":
        return [r"\p{N}" if step.get("individual_digits") else r"\p{N}+"]
    raise ConfigError(f"tokenizer.json cuts text with a {kind} pre-tokenizer ({json.dumps(step)[:160]}), "
                      "which minigpt's byte-level BPE does not run; it reads GPT-2-style tokenizers "
                      "(ByteLevel, Split, Digits): GPT-2's, SmolLM's, Qwen2's and minigpt's own exports.")


def _normalization(step: dict[str, Any] | None) -> str | None:
    """The one Unicode form a tokenizer.json normalizer applies (Qwen2: NFC), or None."""
    kind = (step or {}).get("type")
    if step is None or (kind == "Sequence" and not step["normalizers"]):
        return None
    if kind == "Sequence" and len(step["normalizers"]) == 1:
        return _normalization(step["normalizers"][0])
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return kind
    raise ConfigError(f"tokenizer.json normalizes text with {json.dumps(step)[:160]}, which minigpt's BPE does "
                      "not do; it reads tokenizers that normalize with one Unicode form (NFC ...) or not at all.")


def bpe_from_tokenizer_json(data: dict[str, Any]) -> BPETokenizer:
    """A byte-level BPE tokenizer.json (GPT-2's, SmolLM's, Qwen2's, an export's) as minigpt's `BPETokenizer`."""
    model = data["model"]
    different = {"byte_fallback": model.get("byte_fallback"), "dropout": model.get("dropout"),
                 "continuing_subword_prefix": model.get("continuing_subword_prefix"),
                 "end_of_word_suffix": model.get("end_of_word_suffix")}
    unsupported = [f"{key}={value!r}" for key, value in different.items() if value]
    if unsupported:
        raise ConfigError(f"this BPE tokenizer works otherwise than minigpt's ({', '.join(unsupported)}); minigpt "
                          "reads byte-level BPEs that apply their merges in order and nothing else.")
    patterns = _split_patterns(data.get("pre_tokenizer"))
    pairs = [merge.split(" ") if isinstance(merge, str) else merge for merge in model["merges"]]
    # Added tokens (some beyond the model's vocabulary, as Qwen2's) are neither bytes nor merges: specials.
    vocab = {**model["vocab"], **{added["content"]: added["id"] for added in data.get("added_tokens", [])}}
    return BPETokenizer.from_vocab(vocab, pairs, "tokenizer.json's vocabulary and merges",
                                   pattern=patterns[0] if len(patterns) == 1 else patterns,
                                   normalization=_normalization(data.get("normalizer")),
                                   ignore_merges=bool(model.get("ignore_merges")))


def tokenizer_from_hf(folder: str | Path) -> BPETokenizer | CharTokenizer | SentencePieceBPE:
    """The tokenizer of a Hugging Face folder: tokenizer.json (or GPT-2's vocab.json + merges.txt)."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return BPETokenizer.from_vocab_files(folder / "vocab.json", folder / "merges.txt")
        raise ConfigError(f"{folder} has no tokenizer.json (nor vocab.json and merges.txt): the model's text "
                          "cannot be encoded. Copy the tokenizer files of the model into that folder.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        kind = data["model"]["type"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ConfigError(f"{path} is not a tokenizer.json ({err!r}); download it again.") from None
    if kind == "WordLevel" and (data.get("pre_tokenizer") or {}).get("pattern") == {"Regex": EVERY_CHARACTER}:
        tokens = sorted(data["model"]["vocab"], key=data["model"]["vocab"].get)
        return CharTokenizer("".join(tokens))
    if kind != "BPE":
        raise ConfigError(f"{path} holds a {kind} tokenizer; minigpt reads BPEs (GPT-2's, SmolLM's, Qwen2's "
                          "byte-level ones; Llama 2's and TinyLlama's SentencePiece ones) and its own character exports.")
    prepend = _sentencepiece_prepend(data)
    return sentencepiece_from_tokenizer_json(data, prepend) if prepend else bpe_from_tokenizer_json(data)


def _sentencepiece_prepend(data: dict[str, Any]) -> str | None:
    """Where a SentencePiece BPE's tokenizer.json puts the "▁" before the text ("always": a Prepend
    normalizer, which runs between special tokens; "first": a Metaspace pre-tokenizer), or None for
    any other tokenizer."""
    normalizer, pre_tokenizer = data.get("normalizer") or {}, data.get("pre_tokenizer") or {}
    steps = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    kinds = [(step.get("type"), step.get("prepend", step.get("content"))) for step in steps if step]
    if kinds == [("Prepend", SENTENCEPIECE_SPACE), ("Replace", SENTENCEPIECE_SPACE)] and not pre_tokenizer:
        return "always"
    if pre_tokenizer.get("type") == "Metaspace" and not kinds:
        scheme = pre_tokenizer.get("prepend_scheme", "always" if pre_tokenizer.get("add_prefix_space", True) else "never")
        if pre_tokenizer.get("split", True) or scheme != "first":
            raise ConfigError(f"this SentencePiece tokenizer cuts its text at every space, or puts its \"▁\" before "
                              f"the text otherwise than Llama 2's ({json.dumps(pre_tokenizer)}); minigpt reads Llama "
                              "2's kind: a Prepend normalizer, or a Metaspace with split false and prepend_scheme first.")
        return scheme
    return None


def sentencepiece_from_tokenizer_json(data: dict[str, Any], prepend: str) -> SentencePieceBPE:
    """Llama 2's and TinyLlama's tokenizer.json (SentencePiece's BPE) as minigpt's `SentencePieceBPE`."""
    model = data["model"]
    if model.get("dropout") or model.get("ignore_merges") or model.get("continuing_subword_prefix"):
        raise ConfigError("this SentencePiece tokenizer works otherwise than minigpt's (dropout, ignore_merges or "
                          "a subword prefix); minigpt reads BPEs that apply their merges in order.")
    by_id = {i: token for token, i in model["vocab"].items()}
    by_id.update({added["id"]: added["content"] for added in data.get("added_tokens", [])})
    if sorted(by_id) != list(range(len(by_id))):
        raise ConfigError(f"the tokenizer's ids are not 0..{len(by_id) - 1} without gaps; minigpt cannot index them.")
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in model["merges"]]
    specials = {added["content"]: added["id"] for added in data.get("added_tokens", []) if added.get("special", True)}
    return SentencePieceBPE([by_id[i] for i in range(len(by_id))], merges, specials, prepend)


def load_pretrained(name: str, cache: str | Path | None = None, **download: Any) -> tuple[GPTModel, Any]:
    """A Hugging Face model and its tokenizer: a `PRETRAINED_MODELS` name, a hub repository (owner/name),
    or a folder. GPT-2's named models use the tokenizer minigpt ships (tiktoken's "gpt2")."""
    folder = Path(name)
    gpt2 = name in PRETRAINED_MODELS and PRETRAINED_MODELS[name].architecture == "GPT2LMHeadModel"
    if not folder.is_dir():
        folder = download_hf_model(name, cache, extra_files=() if gpt2 else TOKENIZER_FILES, **download)
    model = GPTModel.from_pretrained(str(folder))
    no_files = not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json"))
    if gpt2 or (no_files and model.cfg.vocab_size == 50257):  # a GPT-2 folder saved without its tokenizer
        return model, get_tokenizer("gpt2")
    tokenizer = tokenizer_from_hf(folder)
    if _same_as_gpt2(tokenizer):
        tokenizer = get_tokenizer("gpt2")
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ConfigError(f"{folder}'s tokenizer has {tokenizer.vocab_size} tokens but its model only "
                          f"{model.cfg.vocab_size}: the two do not belong together.")
    return model, tokenizer


def _same_as_gpt2(tokenizer) -> bool:
    """Whether a BPE read from a folder is GPT-2's own (then tiktoken runs it, and checkpoints name it)."""
    if not isinstance(tokenizer, BPETokenizer) or tokenizer.vocab_size != 50257 or len(tokenizer.merges) != 50000:
        return False
    gpt2 = get_tokenizer("bpe")
    return (tokenizer.merges, tokenizer.byte_ids, tokenizer.special_tokens, tokenizer.pattern) == \
        (gpt2.merges, gpt2.byte_ids, gpt2.special_tokens, gpt2.pattern) and not tokenizer.normalization \
        and not tokenizer.ignore_merges
